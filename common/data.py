"""CIFAR-10 into uint8 tensors (read from the official batch files, downloaded if allowed), the train/validation
split, the data's fingerprint and channel statistics, and your own pictures read as the network sees them.

Imports common.errors."""
from __future__ import annotations

import hashlib
import pickle
import sys
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.datasets.utils import download_and_extract_archive

from .errors import describe_error, UnreadableImage, UsageError


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CifarData(NamedTuple):
    train_images: torch.Tensor  # (N, 3, 32, 32) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]


# The globals a CIFAR-10 batch needs to rebuild its numpy array, under numpy 1 and 2 module names.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals a CIFAR-10 batch needs."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not part of a CIFAR-10 batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = module.replace("numpy.core.", "numpy._core.", 1)
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    """Read one CIFAR-10 batch file (Python 2 or 3 pickle) into a dict with str keys."""
    try:
        with open(path, "rb") as f:
            record = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path}: not a CIFAR-10 batch file ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError, OverflowError) as e:
        raise UsageError(f"{path}: not a CIFAR-10 batch file: truncated or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path}: not a CIFAR-10 batch file (holds a {type(record).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in record.items()}


def _images_and_labels(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    record = read_batch(path)
    missing = {"data", "labels"} - record.keys()
    if missing:
        raise UsageError(f"{path}: not a CIFAR-10 batch file (missing {', '.join(sorted(missing))})")
    data, labels = record["data"], np.asarray(record["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise UsageError(f"{path}: expected uint8 data of shape (N, 3072), found {getattr(data, 'dtype', type(data))} {shape}")
    if labels.shape != (len(data),):
        raise UsageError(f"{path}: {len(data)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UsageError(f"{path}: labels outside 0..9 (found {labels.min()}..{labels.max()})")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def find_batches_dir(data_dir: str | Path) -> Path:
    """The `cifar-10-batches-py` folder: `data_dir` itself or the one inside it."""
    data_dir = Path(data_dir)
    return data_dir if (data_dir / TEST_FILE).exists() else data_dir / BATCHES_DIR


def load_cifar10(data_dir: str | Path, download: bool) -> CifarData:
    """Read CIFAR-10 from `data_dir`, downloading it there first if missing and allowed."""
    folder = find_batches_dir(data_dir)
    missing = [name for name in TRAIN_FILES + [TEST_FILE] if not (folder / name).exists()]
    if missing and download:
        try:
            download_and_extract_archive(CIFAR_URL, download_root=str(data_dir), md5=CIFAR_MD5)
        except Exception as e:  # any network or archive failure ends in the same advice
            print(f"download failed: {type(e).__name__}: {e}", file=sys.stderr)
        folder = find_batches_dir(data_dir)
        missing = [name for name in TRAIN_FILES + [TEST_FILE] if not (folder / name).exists()]
    if missing:
        raise UsageError(
            f"CIFAR-10 not found in {folder} (missing {', '.join(missing)}). Download and unpack "
            f"{CIFAR_URL} into {Path(data_dir)}, or point --data-dir at a folder that holds "
            f"{BATCHES_DIR}/" + ("" if download else "; or drop --no-download to fetch it"))
    parts = [_images_and_labels(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = _images_and_labels(folder / TEST_FILE)
    classes = CLASSES
    if (folder / "batches.meta").exists():
        names = read_batch(folder / "batches.meta").get("label_names")
        if names is not None and len(names) == 10:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return CifarData(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                     test_images, test_labels, classes)


def split_train_val(data: CifarData, val_size: int, limit_train: int | None) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, val images, val labels): val is the last `val_size` training images."""
    n = len(data.train_images)
    if not 0 < val_size < n:
        raise UsageError(f"--val-size {val_size} must be between 1 and {n - 1} (the data has {n} training images)")
    n_train = n - val_size if limit_train is None else min(limit_train, n - val_size)
    return (data.train_images[:n_train], data.train_labels[:n_train],
            data.train_images[n - val_size:], data.train_labels[n - val_size:])


def data_fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """A hash of the tensors' shapes, types and contents: the same data gives the same value wherever it is stored."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
        digest.update(tensor.cpu().contiguous().numpy())
    return digest.hexdigest()


def channel_mean_std(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    x = images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255
    return x.mean(1).tolist(), x.std(1).tolist()


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files to predict: each file as given, and each folder's image files (by suffix, sorted, not recursive)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UsageError(f"{path}: a folder with no image file ({' '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    return files


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16-bit grey scaled to 8 bits, transparency composited on white."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grey: Pillow's convert would clip at 255
        pixels = np.asarray(image).astype(np.float64) / 257
        image = Image.fromarray(np.rint(pixels.clip(0, 255)).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path) -> torch.Tensor:
    """An image file as the network sees it: (3, 32, 32) uint8 RGB, EXIF orientation applied, the shorter side
    resized to 32 (antialiased) and the centre cropped. A 32x32 image keeps its pixels, unresampled.
    """
    try:
        with warnings.catch_warnings():  # an image over Image.MAX_IMAGE_PIXELS is refused, not only warned about
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.draft(None, (32, 32))  # a large JPEG decodes at a reduced scale, its shorter side still >= 32
                image = _to_rgb(ImageOps.exif_transpose(image))
    except Exception as e:  # Pillow's decoders raise many types: OSError, SyntaxError, ValueError, struct.error...
        raise UnreadableImage(describe_error(e)) from None
    side = min(image.size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    if side == 32:
        image = image.crop((int(left), int(top), int(left) + 32, int(top) + 32))
    else:  # resize the centre square only: about what resizing the whole image and cropping gives, without its size
        image = image.resize((32, 32), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side),
                             reducing_gap=3.0)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


class Splits(NamedTuple):
    """The training and validation images (uint8) and labels a run uses."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
