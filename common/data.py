"""The data: CIFAR-10 as uint8 tensors (the official batch files, downloaded if allowed), the train/validation split,
its fingerprint and channel statistics, your own pictures as the network sees them; batched random augmentation on
the training device (flip, crop, rotate, colour jitter, greyscale) and the normalisation every input gets."""
from __future__ import annotations

import functools
import hashlib
import math
import pickle
import sys
import warnings
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.datasets.utils import download_and_extract_archive

from .device import TrainContext
from .files import CIFAR_CLASSES, describe_error, UnreadableImage, UsageError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
CLASSES = CIFAR_CLASSES
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
        raise UsageError(f"{path}: expected uint8 data of shape (N, 3072), found {getattr(data, 'dtype', type(data))} "
                         f"{getattr(data, 'shape', None)}")
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
    if download and not all((find_batches_dir(data_dir) / name).exists() for name in TRAIN_FILES + [TEST_FILE]):
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


def load_training_data(settings: Mapping, ctx: TrainContext) -> tuple[CifarData, Splits]:
    """The data set and the training and validation splits a run's `settings` ask for, checked to give a full batch."""
    if ctx.world > 1 and ctx.rank != 0:
        dist.barrier()  # rank 0 downloads first
    data = load_cifar10(settings["data_dir"], download=not settings["no_download"])
    if ctx.world > 1 and ctx.rank == 0:
        dist.barrier()
    splits = Splits(*split_train_val(data, settings["val_size"], settings["limit_train"]))
    if settings["batch_size"] % ctx.world:
        raise UsageError(f"--batch-size {settings['batch_size']} must be divisible by the {ctx.world} processes")
    if len(splits.train_images) < settings["batch_size"]:
        raise UsageError(f"{len(splits.train_images)} training images (after --val-size/--limit-train) leave no full "
                         f"batch of {settings['batch_size']}; lower --batch-size or train on more images")
    if ctx.world > 1:
        dist.barrier()
    return data, splits


def split_train_val(data: CifarData, val_size: int, limit_train: int | None) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, val images, val labels): val is the last `val_size` training images."""
    n = len(data.train_images)
    if not 0 < val_size < n:
        raise UsageError(f"--val-size {val_size} must be between 1 and {n - 1} (the data has {n} training images)")
    n_train = n - val_size if limit_train is None else min(limit_train, n - val_size)
    return (data.train_images[:n_train], data.train_labels[:n_train],
            data.train_images[n - val_size:], data.train_labels[n - val_size:])


def epoch_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """A seed for one random stream of one epoch (0: a time budget's timed steps): a resume draws the same."""
    return (seed * 1_000_003 + epoch * 10_007 + stream * 101 + rank) % (2 ** 63)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1,
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch, on `device`; each rank takes its interleaved share of every global batch."""
    order = torch.randperm(n, generator=generator).to(device)  # drawn on the CPU: the same order on every device
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start + rank:start + batch_size:world]


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
    resized to 32 (antialiased) and the centre cropped. A 32x32 image keeps its pixels, unresampled."""
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


FILLS = ("zeros", "reflect")  # what crop and rotate put where they uncover the border


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def flip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The images whose entry of `mask` (one bool per image) is True mirrored left-right, the others as they are."""
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def batch_flip_lr(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    return flip_where(images, torch.rand(len(images), generator=generator, device=generator.device) < p)


def batch_crop(images: torch.Tensor, pad: int, generator: torch.Generator, fill: str = "zeros") -> torch.Tensor:
    """Pad by `pad` (`fill`: zeros, or the border mirrored) and cut the original size at a random offset per image."""
    n, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad), mode="constant" if fill == "zeros" else "reflect").flatten(2)
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=generator.device).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=generator.device).to(dev)
    index = (dy + torch.arange(h, device=dev)[:, None]) * (w + 2 * pad) + dx + torch.arange(w, device=dev)
    return padded.gather(2, index.flatten(1)[:, None].expand(n, c, h * w)).view(n, c, h, w)


def batch_rotate(images: torch.Tensor, max_degrees: float, generator: torch.Generator,
                 flip_p: float = 0.0, pad: int = 0, fill: str = "zeros") -> torch.Tensor:
    """Rotate each image by a random angle in [-max_degrees, max_degrees], corners filled by `fill` (reflect repeats
    the edge pixels); a mirror (probability flip_p) and a shift by up to `pad` pixels in the same grid_sample."""
    n, _, h, w = images.shape
    dev = images.device
    angle = _uniform(n, -max_degrees, max_degrees, generator).to(dev) * (math.pi / 180)
    mirror = 1 - 2 * (torch.rand(n, generator=generator, device=generator.device) < flip_p).to(dev, angle.dtype)
    shift = torch.randint(-pad, pad + 1, (2, n), generator=generator, device=generator.device).to(dev, angle.dtype)
    cos, sin = angle.cos(), angle.sin()
    # output (x, y) -> input: mirror(rotate(x, y) + shift), in grid_sample's [-1, 1] coordinates
    theta = torch.stack([torch.stack([mirror * cos, -mirror * sin, mirror * shift[0] * 2 / w], 1),
                         torch.stack([sin, cos, shift[1] * 2 / h], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), [n, 1, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros" if fill == "zeros" else "reflection",
                         align_corners=False)


@functools.lru_cache(maxsize=None)
def _color_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RGB -> YIQ matrix, its inverse, RGB -> grey RGB matrix) on `device`, made once so that no training
    step copies them there. In YIQ the first row gives the luma and a hue shift is a rotation of the (I, Q) plane."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=device)
    return to_yiq, torch.linalg.inv(to_yiq), torch.ones(3, 1, device=device) * to_yiq[0]


def batch_color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, saturation in [1-s, 1+s] and hue in [-s, s] turns per image: one matrix, offset."""
    n = len(images)
    dev = images.device

    def factor() -> torch.Tensor:
        return _uniform(n, 1 - strength, 1 + strength, generator).to(dev)[:, None, None]

    brightness, contrast, saturation = factor(), factor(), factor()
    turn = _uniform(n, -strength, strength, generator).to(dev) * (2 * math.pi)
    rotation = torch.zeros(n, 3, 3, device=dev)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = turn.cos(), -turn.sin()
    rotation[:, 2, 1], rotation[:, 2, 2] = turn.sin(), turn.cos()
    to_yiq, from_yiq, to_gray = _color_constants(dev)
    hue = from_yiq @ rotation @ to_yiq
    saturate = saturation * torch.eye(3, device=dev) + (1 - saturation) * to_gray
    matrix = hue @ saturate * (brightness * contrast)
    x = images.flatten(2)
    mean_luma = (x.mean(2) @ to_yiq[0])[:, None, None]  # a grey stays grey under saturation and hue
    offset = ((1 - contrast) * brightness * mean_luma).expand(n, 3, 1)
    return torch.baddbmm(offset.to(images.dtype), matrix.to(images.dtype), x).clamp_(0, 1).view_as(images)


def batch_grayscale(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each image by its grey version (its luma) with probability p."""
    gray = torch.rand(len(images), generator=generator, device=generator.device).to(images.device) < p
    luma = (images * _color_constants(images.device)[0][0].to(images.dtype)[:, None, None]).sum(1, keepdim=True)
    return torch.where(gray[:, None, None, None], luma.expand_as(images), images)


# op: (the setting of its strength, the function that applies it to a batch of float images with that strength).
# Flip, crop and rotate are applied together first (a rotation folds the flip and the crop into its one resampling),
# then the others in this order.
AUGMENT_OPS = {"flip": (None, None), "crop": ("crop_pad", None), "rotate": ("rotate_deg", None),
               "jitter": ("jitter", batch_color_jitter), "gray": ("gray_p", batch_grayscale)}
STRENGTH_KEYS = {op: key for op, (key, _) in AUGMENT_OPS.items() if key}


def augmentation(ops: Sequence[str], settings: Mapping) -> dict[str, float]:
    """The `ops` with their strengths, e.g. {"flip": 0.5, "crop": 4}: flip's probability, the others' settings."""
    return {op: 0.5 if op == "flip" else settings[STRENGTH_KEYS[op]] for op in ops}


def parse_augment(value: str | list) -> list[str]:
    """--augment's comma-separated ops (or 'none') as a list, refusing unknown ones."""
    if isinstance(value, list):
        return value
    ops = [] if value.strip() in ("", "none") else [op.strip() for op in value.split(",")]
    unknown = [op for op in ops if op not in AUGMENT_OPS]
    if unknown:
        raise UsageError(f"--augment: unknown op(s) {', '.join(unknown)}; choose from {', '.join(AUGMENT_OPS)} or none")
    return ops


def augment_batch(images: torch.Tensor, ops: dict[str, float], generator: torch.Generator, fill: str = "zeros"
                  ) -> torch.Tensor:
    """uint8 images -> float images in [0, 1], augmented with `ops` (see augmentation), crop and rotate with `fill`."""
    x = images.float().div_(255)
    flip_p, pad = ops.get("flip", 0.0), int(ops.get("crop", 0))
    if "rotate" in ops:
        x = batch_rotate(x, ops["rotate"], generator, flip_p, pad, fill)
    else:
        if flip_p:
            x = batch_flip_lr(x, flip_p, generator)
        if pad:
            x = batch_crop(x, pad, generator, fill)
    for op, (_, apply) in AUGMENT_OPS.items():
        if apply is not None and op in ops:
            x = apply(x, ops[op], generator)
    return x


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
              ) -> torch.Tensor:
    """(x - mean) / std per channel, returned in channels_last layout."""
    mean_t = torch.as_tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    std_t = torch.as_tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return ((images - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
