"""Shared parts of both exercises, in the order data flows: load -> augment -> train -> evaluate -> report -> export
-> drive (the banners below, one a section).

Below the drive sections, functions take plain values: the drive sections alone read the run's Settings (made once,
never changed). `run_experiment` is the driver both scripts call; everything it uses sits above it in this file.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import math
import os
import pickle
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from torchvision.datasets.utils import download_and_extract_archive
from tqdm import tqdm

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
AUGMENT_OPS = ("flip", "crop", "rotate", "jitter", "gray")
STRENGTH_KEYS = {"crop": "crop_pad", "rotate": "rotate_deg", "jitter": "jitter", "gray": "gray_p"}  # op: its strength's setting
EVAL_BATCH = 500
PLAN_WARMUP, PLAN_STEPS = 5, 20  # a --time-budget run times PLAN_STEPS steps after PLAN_WARMUP to plan its total
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TTA_SHIFT = 2  # pixels of the diagonal translations among the test-time augmentation views


class UsageError(Exception):
    """A problem with the user's input or environment: reported as one message, exit code 2."""


def describe_error(error: BaseException) -> str:
    """'Type: first line of the message', short enough for a one-line error report."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


class SaveError(OSError):
    """Writing a result file failed (a full disk, a lost mount): OSError's errno, strerror and the file's name."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


class UnreadableImage(Exception):
    """An image file that cannot be predicted (not an image, truncated, too large): skipped with this reason."""


# ---------------- load: CIFAR-10 into tensors, the train/validation split, your own pictures

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


# ---------------- augment: batched random ops on the training device

def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def batch_flip_lr(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    flip = torch.rand(len(images), generator=generator, device=generator.device) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def batch_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad` and cut a window of the original size at a random offset per image."""
    n, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad)).flatten(2)
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=generator.device).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=generator.device).to(dev)
    index = (dy + torch.arange(h, device=dev)[:, None]) * (w + 2 * pad) + dx + torch.arange(w, device=dev)
    return padded.gather(2, index.flatten(1)[:, None].expand(n, c, h * w)).view(n, c, h, w)


def batch_rotate(images: torch.Tensor, max_degrees: float, generator: torch.Generator,
                 flip_p: float = 0.0, pad: int = 0) -> torch.Tensor:
    """Rotate each image about its centre by a random angle in [-max_degrees, max_degrees] (zeros fill).

    A mirror (probability flip_p) and a translation by up to `pad` pixels, which batch_flip_lr and batch_crop
    would do before, are folded into the same resampling: one grid_sample for all three.
    """
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
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.lru_cache(maxsize=None)
def _color_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RGB -> YIQ matrix, its inverse, RGB -> grey RGB matrix) on `device`, made once so that no training
    step copies them there. In YIQ the first row gives the luma and a hue shift is a rotation of the (I, Q) plane.
    """
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=device)
    return to_yiq, torch.linalg.inv(to_yiq), torch.ones(3, 1, device=device) * to_yiq[0]


def _luma(images: torch.Tensor) -> torch.Tensor:
    weights = _color_constants(images.device)[0][0].to(images.dtype)
    return (images * weights[:, None, None]).sum(1, keepdim=True)


def batch_color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation in [1-s, 1+s] and hue in [-s, s] turns, per image.

    The four are linear in RGB, so they are composed into one 3x3 matrix and offset per image, applied at once.
    """
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
    luma = to_yiq[0]
    saturate = saturation * torch.eye(3, device=dev) + (1 - saturation) * to_gray
    matrix = hue @ saturate * (brightness * contrast)
    x = images.flatten(2)
    mean_luma = (x.mean(2) @ luma)[:, None, None]  # a grey stays grey under saturation and hue
    offset = ((1 - contrast) * brightness * mean_luma).expand(n, 3, 1)
    return torch.baddbmm(offset.to(images.dtype), matrix.to(images.dtype), x).clamp_(0, 1).view_as(images)


def batch_grayscale(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each image by its grey version with probability p."""
    gray = torch.rand(len(images), generator=generator, device=generator.device).to(images.device) < p
    return torch.where(gray[:, None, None, None], _luma(images).expand_as(images), images)


def augmentation(ops: Sequence[str], strengths: Mapping[str, float]) -> dict[str, float]:
    """The `ops` a run applies with their strengths, e.g. {"flip": 0.5, "crop": 4}: flip's is its probability, the
    others' from `strengths` (by op)."""
    return {op: 0.5 if op == "flip" else strengths[op] for op in ops}


def alternating_flips(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """Which of `n` images to mirror in `epoch` under --alternate-flip: half of them, drawn once from the seed, in odd
    epochs, the other half in even ones, so that every image is seen both ways every two epochs."""
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    return (first ^ (epoch % 2 == 0)).to(device)


def augment_batch(images: torch.Tensor, ops: dict[str, float], generator: torch.Generator,
                  flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images -> float images in [0, 1], augmented with `ops` (see augmentation); `flips`, one bool per image,
    says which to mirror in place of the flip op's random draw."""
    x = images.float().div_(255)
    flip_p, pad = ops.get("flip", 0.0), int(ops.get("crop", 0))
    if flips is not None:
        x, flip_p = torch.where(flips[:, None, None, None], x.flip(-1), x), 0.0
    if "rotate" in ops:
        x = batch_rotate(x, ops["rotate"], generator, flip_p, pad)
    else:
        if flip_p:
            x = batch_flip_lr(x, flip_p, generator)
        if pad:
            x = batch_crop(x, pad, generator)
    if "jitter" in ops:
        x = batch_color_jitter(x, ops["jitter"], generator)
    if "gray" in ops:
        x = batch_grayscale(x, ops["gray"], generator)
    return x


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel, returned in channels_last layout."""
    mean_t = torch.as_tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    std_t = torch.as_tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return ((images - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


# ---------------- train: device, precision, optimizer, schedule, the plan, one epoch, the epoch loop

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda, mps or cpu; refuse devices that do not exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: unknown device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device (use auto, cpu, cuda, cuda:N or mps)")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on GPUs with native bf16 and on CPUs with fast bf16, fp16 on older GPUs, else fp32.

    Native bf16 starts at compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() also counts the slow
    emulation of older GPUs such as the T4 and V100, which train faster in fp16 with a gradient scaler.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def epoch_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """A seed for one random stream of one epoch, so that a resumed run draws what an unbroken one would."""
    return (seed * 1_000_003 + epoch * 10_007 + stream * 101 + rank) % (2 ** 63)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1,
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch, on `device`; each rank takes its interleaved share of every global batch."""
    order = torch.randperm(n, generator=generator).to(device)  # drawn on the CPU: the same order on every device
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start + rank:start + batch_size:world]


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: full batches only (a last partial batch is left out)."""
    return train_images // batch_size


@dataclasses.dataclass
class Plan:
    """How many steps a run trains, owned by the fit loop and read by the learning-rate schedule: epochs x steps per
    epoch, or what a time budget buys (None until the first epoch has timed its steps, then fixed again at the end of
    every epoch from the speed measured so far; see budget_planner and replan)."""
    steps_per_epoch: int
    total_steps: int | None
    images_per_s: float | None = None  # the speed a time budget's plan was last made at

    @property
    def epochs(self) -> int | None:
        """Epochs the plan reaches, the last of them perhaps partial (None before a time budget's plan)."""
        return None if self.total_steps is None else -(-self.total_steps // self.steps_per_epoch)


def epoch_steps(total_steps: int | None, epoch: int, steps_per_epoch: int) -> int:
    """Steps of `epoch`: a full epoch, or what the run's total leaves for its last, partial one."""
    if total_steps is None:
        return steps_per_epoch
    return max(0, min(steps_per_epoch, total_steps - (epoch - 1) * steps_per_epoch))


def lr_factor(step: int, total_steps: int | None, steps_per_epoch: int, schedule: str, warmup: float,
              lr_decay: float | None, lr_end: float) -> float:
    """Learning-rate multiplier at `step`: one-cycle (linear up over the `warmup` fraction, linear down to `lr_end`
    of the peak) or exponential per epoch (`lr_decay` each).

    The one-cycle runs over the run's total steps; before a time budget's plan fixes them, it stays at its first value.
    """
    if schedule == "exp":
        return lr_decay ** (step // steps_per_epoch)
    if total_steps is None:
        return 0.1
    warm = max(1, int(warmup * total_steps))
    return float(np.interp(step, [0, warm, total_steps], [0.1, 1.0, lr_end]))


def plan_total_steps(budget_s: float, elapsed_s: float, step_s: float, val_s: float, steps_done: int,
                     steps_per_epoch: int, epochs_validated: int = 0) -> int:
    """The most steps a time budget holds: those done, then more at `step_s` each, with a validation pass of `val_s`
    for every epoch they reach beyond the `epochs_validated`."""
    left = budget_s - elapsed_s

    def cost(total: int) -> float:
        return (total - steps_done) * step_s + (-(-total // steps_per_epoch) - epochs_validated) * val_s

    low, high = steps_done, steps_done + max(0, int(left / step_s))
    while low < high:  # the cost grows with the total: the largest total it affords
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= left else (low, middle - 1)
    return low


WHITEN_IMAGES = 5000  # training images whose 3x3 patches fix the whitening filters
WHITEN_EPS = 5e-4  # added to the patch covariance's eigenvalues before their square root


def patch_whitening_filters(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Conv filters (54, 3, 3, 3) that whiten the 3x3 patches of uint8 `images` normalized as the network sees
    them: each eigenvector of the patches' covariance over the square root of its eigenvalue, then their negatives
    (a ReLU follows, so each direction needs both signs)."""
    x = normalize(images[:WHITEN_IMAGES].float().div(255), mean, std)
    patches = F.unfold(x, 3).transpose(1, 2).reshape(-1, 27).double()  # (channel, row, column) as in a conv weight
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
    filters = (eigenvectors.T / (eigenvalues + WHITEN_EPS).sqrt()[:, None]).reshape(27, 3, 3, 3)
    return torch.cat([filters, -filters]).float()


def parameter_groups(model: nn.Module, decay_norm_bias: bool, lr: float, norm_bias_lr: float = 1.0) -> list[dict]:
    """The trainable parameters as optimizer groups: all of them at `lr`, except that without `decay_norm_bias` the
    parameters of one dimension (BatchNorm weights and biases, every bias) are free of weight decay, and that
    BatchNorm biases learn at `norm_bias_lr` times `lr` (the first group holds the weights of the layers)."""
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and m.bias is not None} if norm_bias_lr != 1.0 else set()
    groups: dict[tuple, list] = {}
    for p in (p for p in model.parameters() if p.requires_grad):
        key = (p.ndim <= 1 and not decay_norm_bias, id(p) in norm_biases)
        groups.setdefault(key, []).append(p)
    return [{"params": params, "lr": lr * (norm_bias_lr if fast else 1.0), **({"weight_decay": 0.0} if free else {})}
            for (free, fast), params in sorted(groups.items())]


def first_conv_weight(model: nn.Module) -> torch.Tensor:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(params: list[nn.Parameter] | list[dict], name: str, lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """Adam (L2 penalty in the gradient), AdamW (decoupled weight decay) or SGD with Nesterov momentum, by `name`."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


class TrainContext(NamedTuple):
    """Where and how training runs: device, precision, process rank and count."""
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def autocast(ctx: TrainContext):
    return torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=ctx.dtype != torch.float32)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`, so that a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def share_from_rank0(value: int, ctx: TrainContext) -> int:
    """Rank 0's `value` on every process (a plain run returns it unchanged)."""
    if ctx.world == 1:
        return value
    shared = torch.tensor(value, device=ctx.device)
    dist.broadcast(shared, 0)
    return int(shared)


def budget_planner(plan: Plan, budget_minutes: float, batch_size: int, val_images: int, start: float,
                   ctx: TrainContext) -> Callable[[int], bool]:
    """The first epoch's hook under --time-budget: after each step it may time the run, and after PLAN_STEPS steps
    that follow PLAN_WARMUP warm-up steps it sets the plan's total steps from their speed (measured on rank 0,
    shared) and returns True, once. A short first epoch shortens both."""
    budget_s = budget_minutes * 60
    warmup = min(PLAN_WARMUP, plan.steps_per_epoch - 1)
    last = min(warmup + PLAN_STEPS, plan.steps_per_epoch)
    clock = {0: start}

    def after_step(step: int) -> bool:
        if step not in (1, warmup, last):
            return False
        synchronize(ctx.device)
        clock[step] = time.perf_counter()
        if step == 1 and share_from_rank0(int(clock[1] - start > budget_s), ctx):
            raise UsageError(f"--time-budget {budget_minutes:g} minutes is too short for a single training "
                             f"step (the first took {clock[1] - start:.1f} s)")
        if step != last:
            return False
        step_s = (clock[last] - clock[warmup]) / (last - warmup)
        val_s = step_s * ctx.world * val_images / batch_size / 3  # a forward pass: about a third of a step
        total = plan_total_steps(budget_s, clock[last] - start, step_s, val_s, last, plan.steps_per_epoch)
        plan.total_steps = share_from_rank0(total, ctx)
        plan.images_per_s = batch_size / step_s
        if ctx.is_main:
            tqdm.write(f"plan: {budget_minutes:g} min ≈ {plan.total_steps / plan.steps_per_epoch:.1f} epochs "
                       f"({plan.total_steps} steps of {batch_size}) at {plan.images_per_s:.0f} images/s", file=sys.stdout)
        return True

    return after_step


def replan(plan: Plan, budget_minutes: float, batch_size: int, elapsed_s: float, steps_done: int, step_s: float,
           epoch_extra_s: float, ctx: TrainContext) -> None:
    """At the end of an epoch under --time-budget: set the plan's total steps anew from the time used so far, the
    last epoch's seconds per step and the seconds it spent besides its steps (validation, checkpoints), so that a
    machine that slows down or speeds up still ends on time; the schedule follows the new total."""
    total = plan_total_steps(budget_minutes * 60, elapsed_s, step_s, epoch_extra_s, steps_done, plan.steps_per_epoch,
                             epochs_validated=steps_done // plan.steps_per_epoch)
    total = share_from_rank0(total, ctx)
    if total != plan.total_steps and ctx.is_main:
        tqdm.write(f"re-plan: {total / plan.steps_per_epoch:.1f} epochs ({total} steps) at {batch_size / step_s:.0f} "
                   f"images/s, {elapsed_s / 60:.1f} of {budget_minutes:g} min used", file=sys.stdout)
    plan.total_steps = total


def scaled_by_epochs(scaling: dict, epochs: float) -> dict:
    """Settings for a run of `epochs` epochs from a recipe's budget_scaling {"epochs": [few, many], key: [value at few,
    value at many], ...}: each value interpolated on the logarithm of the epochs, held at the ends; crop_pad rounded."""
    few, many = scaling["epochs"]
    t = min(1.0, max(0.0, math.log(max(epochs, 1e-9) / few) / math.log(many / few)))
    chosen = {key: low + t * (high - low) for key, (low, high) in scaling.items() if key != "epochs"}
    return {key: round(value) if key == "crop_pad" else round(value, 3) for key, value in chosen.items()}


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every Dropout layer of `model`."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


LOOKAHEAD_EVERY, LOOKAHEAD_DECAY = 5, 0.95  # --lookahead: steps between pulls; the average's decay per step at the end


def lookahead_decay(step: int, total_steps: int | None) -> float:
    """The weight --lookahead gives the average against the network after `step` of `total_steps` steps: from 0 (the
    network as it is) rising with the cube of the progress to LOOKAHEAD_DECAY per step, over LOOKAHEAD_EVERY steps."""
    return 0.0 if not total_steps else LOOKAHEAD_DECAY ** LOOKAHEAD_EVERY * min(1.0, step / total_steps) ** 3


def lookahead_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each floating-point weight and buffer of `model` (sharing its storage) with a copy of it that --lookahead
    averages into: made once an epoch, not at every pull."""
    return [(value, value.detach().clone()) for value in model.state_dict().values() if value.is_floating_point()]


@torch.no_grad()
def lookahead_pull(pairs: list[tuple[torch.Tensor, torch.Tensor]], decay: float) -> None:
    """Move each running average towards its weight or buffer by 1 - `decay` (see lookahead_pairs), then set the
    model to it."""
    for value, average in pairs:
        average.lerp_(value, 1 - decay)
        value.copy_(average)


def progress_label(epoch: int, plan: Plan, budget_minutes: float | None) -> str:
    """'epoch 2/5', and under a time budget its plan: 'epoch 2/5 (60 min ≈ 4.7 epochs)'."""
    label = f"epoch {epoch}/{plan.epochs or '?'}"
    if budget_minutes is None:
        return label
    if plan.total_steps is None:
        return f"{label} (timing steps for the {budget_minutes:g}-min plan)"
    return f"{label} ({budget_minutes:g} min ≈ {plan.total_steps / plan.steps_per_epoch:.1f} epochs)"


class TrainStep(NamedTuple):
    """What a training step does with its batch besides the network and the optimizer."""
    ops: dict[str, float]  # augmentation ops and their strengths (see augmentation)
    mean: list[float]  # the normalisation after augmentation
    std: list[float]
    label_smoothing: float  # of the training loss
    alternate_flip: bool  # flip each image in every other epoch (see alternating_flips) instead of at random
    lookahead: bool  # pull the weights towards their running average (see lookahead_pull)


def train_one_epoch(model: nn.Module, optimizer, scheduler, scaler, images: torch.Tensor, labels: torch.Tensor,
                    step_with: TrainStep, plan: Plan, epoch: int, seed: int, batch_size: int, ctx: TrainContext,
                    budget_minutes: float | None = None, after_step: Callable[[int], TrainStep | None] | None = None,
                    log_every: int = 25) -> dict:
    """One pass over the shuffled training set (the last epoch of a planned run may stop short); returns loss,
    accuracy, steps and images/s for the epoch. `after_step(steps done)` runs after every step when given; what it
    returns, when not None, is how the steps after it train (a time budget's plan, made in the first epoch, may change
    the augmentation and the loss)."""
    model.train()
    shuffle = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
    augment_gen = torch.Generator(ctx.device).manual_seed(epoch_seed(seed, epoch, 1, ctx.rank))
    torch.manual_seed(epoch_seed(seed, epoch, 2, ctx.rank))
    criterion = nn.CrossEntropyLoss(label_smoothing=step_with.label_smoothing)
    steps = epoch_steps(plan.total_steps, epoch, plan.steps_per_epoch)
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    first_bad_step = torch.full((), -1, device=ctx.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=progress_label(epoch, plan, budget_minutes), unit="batch", disable=not ctx.is_main,
               leave=False, dynamic_ncols=True)
    mean, std = torch.tensor(step_with.mean, device=ctx.device), torch.tensor(step_with.std, device=ctx.device)
    ops = step_with.ops
    flips = alternating_flips(len(images), seed, epoch, ctx.device) if step_with.alternate_flip and "flip" in ops else None
    average = lookahead_pairs(model) if step_with.lookahead else None  # the epoch ends on the average (below): a
    # resumed run starts as this one goes on
    for step, index in enumerate(epoch_batches(len(images), batch_size, shuffle, ctx.rank, ctx.world, ctx.device)):
        if step >= steps:
            break
        x = normalize(augment_batch(images[index], ops, augment_gen, None if flips is None else flips[index]), mean, std)
        y = labels[index]
        with autocast(ctx):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss = loss.detach()
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
        seen += len(y)
        if average is not None and ((step + 1) % LOOKAHEAD_EVERY == 0 or step + 1 == steps):
            done = (epoch - 1) * plan.steps_per_epoch + step + 1
            lookahead_pull(average, lookahead_decay(done, plan.total_steps))
        if after_step is not None:
            changed = after_step(step + 1)
            if changed is not None:
                criterion = nn.CrossEntropyLoss(label_smoothing=changed.label_smoothing)
                ops = changed.ops
            steps = epoch_steps(plan.total_steps, epoch, plan.steps_per_epoch)  # a plan made now may end it early
            bar.total = steps
            bar.set_description(progress_label(epoch, plan, budget_minutes), refresh=False)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            bad = int(first_bad_step)
            if bad >= 0:
                bar.close()
                raise NonFiniteLoss(f"training loss is not finite at epoch {epoch}, step {bad + 1} of {steps}")
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{float(correct) / seen:.3f}",
                            img_s=f"{seen * ctx.world / elapsed:.0f}", refresh=False)
            bar.update((step + 1) - bar.n)
    bar.close()
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=ctx.device)])
    if ctx.world > 1:
        dist.all_reduce(totals)
    seconds = time.perf_counter() - start
    loss_total, correct_total, seen_total = totals.tolist()
    return {"train_loss": loss_total / seen_total, "train_accuracy": correct_total / seen_total, "steps": steps,
            "seconds": seconds, "images_per_s": seen_total / seconds}


class Training(NamedTuple):
    """A run's network and what trains it."""
    model: nn.Module  # the plain network: validated, tested and saved
    train_model: nn.Module  # what the steps run: the network under DistributedDataParallel and torch.compile if asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


class Splits(NamedTuple):
    """The training and validation images (uint8) and labels a run uses."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor


class BestEpoch(NamedTuple):
    """The epoch of the highest validation accuracy so far (epoch None before the first)."""
    epoch: int | None = None
    val_accuracy: float = -1.0


class Fitted(NamedTuple):
    """What the epoch loop leaves: every epoch's row, the best epoch, the seconds this call trained."""
    history: list[dict]
    best: BestEpoch
    seconds: float


# One row of history.json: elapsed_s is the run's wall-clock time (training, validation, saving) at the epoch's end.
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "steps", "seconds",
                "images_per_s", "elapsed_s", "precision")


def fit(training: Training, splits: Splits, plan: Plan, step_with: TrainStep, seed: int, batch_size: int,
        patience: int, budget_minutes: float | None, replans: bool, history: list[dict], best: BestEpoch,
        ctx: TrainContext, on_plan: Callable[[], TrainStep], save_epoch: Callable[[list[dict], BestEpoch, bool], None]
        ) -> Fitted:
    """The epoch loop after `history`: train, validate, keep the best epoch, and on the main process `save_epoch`
    (history, best, improved) after each; ends at the plan's last epoch, or early after `patience` epochs without a
    better one. Under a time budget the first epoch's steps make the plan (see budget_planner; `on_plan` then says how
    the steps train), and with `replans` the end of every full epoch plans again from the speed and the time used so
    far (see replan)."""
    train_images, train_labels = splits.train_images.to(ctx.device), splits.train_labels.to(ctx.device)
    history = list(history)
    start = time.perf_counter()
    earlier_s = history[-1].get("elapsed_s", 0.0) if history else 0.0  # what the calls before this one used
    timing = budget_planner(plan, budget_minutes, batch_size, len(splits.val_images), start, ctx) \
        if budget_minutes is not None and plan.total_steps is None else None

    def after_step(done: int) -> TrainStep | None:  # the first epoch's, while a time budget plans
        return on_plan() if timing(done) else None
    epoch = len(history)
    while plan.epochs is None or epoch < plan.epochs:  # a time budget's plan is made in the first epoch
        epoch += 1
        if patience and best.epoch is not None and epoch - 1 - best.epoch >= patience:
            if ctx.is_main:
                print(f"early stop: no better validation accuracy for {patience} epochs")
            break
        epoch_start = time.perf_counter()
        row = {"epoch": epoch, "lr": training.optimizer.param_groups[0]["lr"]}
        row.update(train_one_epoch(training.train_model, training.optimizer, training.scheduler, training.scaler,
                                   train_images, train_labels, step_with, plan, epoch, seed, batch_size, ctx,
                                   budget_minutes, after_step if epoch == 1 and timing is not None else None))
        val = torch.zeros(2, device=ctx.device, dtype=torch.float64)
        if ctx.is_main:
            result = evaluate(training.model, splits.val_images, splits.val_labels, step_with.mean, step_with.std, ctx)
            val = torch.tensor([result["loss"], result["accuracy"]], device=ctx.device, dtype=torch.float64)
        if ctx.world > 1:
            dist.broadcast(val, 0)
        row["val_loss"], row["val_accuracy"] = val.tolist()
        row["precision"] = str(ctx.dtype).replace("torch.", "")
        row["elapsed_s"] = earlier_s + time.perf_counter() - start
        row = {k: row[k] for k in HISTORY_KEYS}
        history.append(row)
        improved = row["val_accuracy"] > best.val_accuracy
        if improved:
            best = BestEpoch(epoch, row["val_accuracy"])
        if ctx.is_main:
            tqdm.write(f"epoch {epoch:3d}/{plan.epochs}  train loss {row['train_loss']:.4f} acc "
                       f"{row['train_accuracy']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  "
                       f"lr {row['lr']:.2e}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s"
                       + ("  *best" if improved else ""), file=sys.stdout)
            save_epoch(history, best, improved)
        if budget_minutes is not None and replans and row["steps"] == plan.steps_per_epoch and epoch < plan.epochs:
            epoch_s = time.perf_counter() - epoch_start  # training, validation and saving
            replan(plan, budget_minutes, batch_size, earlier_s + time.perf_counter() - start,
                   epoch * plan.steps_per_epoch, row["seconds"] / row["steps"], epoch_s - row["seconds"], ctx)
    return Fitted(history, best, time.perf_counter() - start)


# ---------------- evaluate: predictions (--tta), accuracy, the test results

def tta_views(images: torch.Tensor, pixels: int = TTA_SHIFT, padding: str = "constant") -> list[torch.Tensor]:
    """The views --tta averages over, for float images (N, C, H, W) in [0, 1]: the image and its mirror along the
    width, each as it is and translated by (+2, +2) and (-2, -2) pixels with zero fill (as training's padded crop);
    other `pixels` and F.pad's `padding` modes for benchmarks/tta.py.
    """
    h, w = images.shape[-2:]
    views = []
    for image in (images, images.flip(-1)):
        padded = F.pad(image, (pixels,) * 4, mode=padding)
        for shift in (0, pixels, -pixels):  # view[..., y, x] = image[..., y - shift, x - shift]
            views.append(padded[..., pixels - shift:pixels - shift + h, pixels - shift:pixels - shift + w])
    return views


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], ctx: TrainContext,
            tta: bool = False) -> torch.Tensor:
    """Logits (float32, on the device) for uint8 images normalised with `mean` and `std`, in eval mode and large
    batches. With `tta`, the log of the softmax averaged over tta_views: its softmax is that average, its argmax the
    averaged prediction.
    """
    model.eval()
    outputs = []
    mean, std = torch.tensor(mean, device=ctx.device), torch.tensor(std, device=ctx.device)
    for start in range(0, len(images), EVAL_BATCH):
        x = images[start:start + EVAL_BATCH].to(ctx.device).float().div_(255)
        with autocast(ctx):
            if tta:
                log_probs = torch.stack([model(normalize(v, mean, std)).float().log_softmax(1) for v in tta_views(x)])
                outputs.append(log_probs.logsumexp(0) - math.log(len(log_probs)))
            else:
                outputs.append(model(normalize(x, mean, std)).float())
    return torch.cat(outputs) if outputs else torch.zeros(0, 10, device=ctx.device)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
             ctx: TrainContext, tta: bool = False) -> dict:
    """Loss (plain cross-entropy), accuracy and predictions of `model` on a labelled set (with `tta`: of the averaged views)."""
    logits = predict(model, images, mean, std, ctx, tta)
    labels = labels.to(ctx.device)
    predictions = logits.argmax(1)
    return {"loss": F.cross_entropy(logits, labels).item(), "accuracy": (predictions == labels).sum().item() / max(1, len(labels)),
            "predictions": predictions.cpu()}


def per_class_accuracy(labels: torch.Tensor, predictions: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    counts = torch.bincount(labels, minlength=len(classes)).clamp(min=1)
    hits = torch.bincount(labels[predictions == labels], minlength=len(classes))
    return {name: hits[i].item() / counts[i].item() for i, name in enumerate(classes)}


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, n_classes: int = 10) -> torch.Tensor:
    """Counts with true classes as rows and predicted classes as columns."""
    return torch.bincount(labels * n_classes + predictions, minlength=n_classes ** 2).reshape(n_classes, n_classes)


class TestResults(NamedTuple):
    """A model's results on the test set (the *_tta ones None without test-time augmentation)."""
    accuracy: float
    loss: float
    accuracy_first1000: float  # of the first 1,000 test images, the assignment's figure
    predictions: torch.Tensor
    per_class: dict[str, float]
    confusion: torch.Tensor
    accuracy_tta: float | None = None
    accuracy_first1000_tta: float | None = None


def test_results(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], ctx: TrainContext, tta: bool = False) -> TestResults:
    """Evaluate on the whole test set: accuracies, loss, predictions, per class and confusion (with `tta`, the
    accuracies of test-time augmentation too)."""
    result = evaluate(model, images, labels, mean, std, ctx)
    first = min(1000, len(labels))

    def accuracy_of_first(predicted: torch.Tensor) -> float:
        return (predicted[:first] == labels[:first]).sum().item() / max(1, first)

    predictions = result["predictions"]
    tta_result = evaluate(model, images, labels, mean, std, ctx, tta=True) if tta else None
    return TestResults(result["accuracy"], result["loss"], accuracy_of_first(predictions), predictions,
                       per_class_accuracy(labels, predictions, classes),
                       confusion_matrix(labels, predictions, len(classes)),
                       tta_result and tta_result["accuracy"], tta_result and accuracy_of_first(tta_result["predictions"]))


# ---------------- report: files, checkpoints, pictures, metrics.json, --compare, --seeds, train.log

def current_umask() -> int:
    """The process's umask: os.umask reads it only by setting it, so set a strict one and put it back at once."""
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def atomic_write(path: Path, write: Callable) -> None:
    """Write through `write(file)` to a temporary file beside `path`, fsync it, then rename it over `path`.

    The file gets the mode of any newly created file (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            raise SaveError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def save_json(obj, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def save_checkpoint(obj: dict, path: Path) -> None:
    """torch.save through atomic_write, serialised in memory first: torch's zip writer turns a failed file write
    (a full disk) into a RuntimeError, a plain write keeps the OSError and its errno."""
    def write(f) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        f.write(buffer.getbuffer())

    atomic_write(path, write)


def load_checkpoint(path: Path, script: str) -> dict:
    """Load one of this project's checkpoints (weights_only), refusing other files with a message."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            what = "an empty file"
        elif head != b"PK\x03\x04":
            what = "not a PyTorch checkpoint file"
        elif not zipfile.is_zipfile(path):
            what = "a truncated or corrupt checkpoint"
        elif "Weights only load failed" in str(e):
            what = "it holds objects other than tensors and plain data (refused by weights_only loading)"
        else:
            what = "a corrupt checkpoint"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise UsageError(f"{path}: not a readable checkpoint: {what} ({type(e).__name__}: {detail[:200]})") from None
    if not isinstance(checkpoint, dict) or "kind" not in checkpoint or "model" not in checkpoint:
        raise UsageError(f"{path}: not a checkpoint of this project (a bare state dict or another program's file)")
    if checkpoint["kind"] != script:
        raise UsageError(f"{path}: a checkpoint of {checkpoint['kind']}, not of {script}; use the script that wrote it")
    return checkpoint


TRAINING_STATE = ("optimizer", "scheduler", "scaler")  # what --resume needs beyond the model


def checkpoint_state(script: str, settings: dict, training: Training, history: list[dict], best: BestEpoch,
                     fingerprint: str | None = None, classes: Sequence[str] = CLASSES) -> dict:
    """What last.pt holds after an epoch (best.pt: the same without TRAINING_STATE); `fingerprint` is
    data_fingerprint of the splits the run trains on (None outside a run)."""
    return {"kind": script, "settings": settings, "model": training.model.state_dict(),
            "optimizer": training.optimizer.state_dict(), "scheduler": training.scheduler.state_dict(),
            "scaler": training.scaler.state_dict(), "epoch": len(history), "history": history,
            "best_epoch": best.epoch, "best_val_accuracy": best.val_accuracy, "data_fingerprint": fingerprint,
            "classes": list(classes)}


def save_epoch_files(checkpoint: dict, improved: bool, out_dir: Path) -> None:
    """After an epoch: last.pt, best.pt when the epoch is the best so far, history.json. The first epoch of a new run
    removes the metrics.json an --overwrite replaces."""
    if checkpoint["epoch"] == 1:
        (out_dir / "metrics.json").unlink(missing_ok=True)
    if improved:  # testing needs no optimizer state: best.pt is a third of last.pt's size and write time
        save_checkpoint({k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}, out_dir / "best.pt")
    save_checkpoint(checkpoint, out_dir / "last.pt")
    save_json(checkpoint["history"], out_dir / "history.json")


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def style_axes(ax, xlabel: str, ylabel: str, integer_x: bool = True) -> None:
    """Labels, a light grid and the legend; whole numbers on an epoch axis."""
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_history(history: list[dict], best_epoch: int | None, path: Path) -> None:
    """Loss and accuracy of training and validation per epoch, the best epoch marked."""
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="validation")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], label="train")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], label="validation")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        style_axes(ax, "epoch", name)
    save_figure(fig, path)


def plot_filters(weight: torch.Tensor, path: Path, title: str) -> None:
    """First-layer filters (out, 3, k, k) as colour images on one grid, each scaled to its own range."""
    plt = pyplot()
    w = weight.detach().float().cpu()
    low = w.amin((1, 2, 3), keepdim=True)
    high = w.amax((1, 2, 3), keepdim=True)
    w = ((w - low) / (high - low).clamp(min=1e-8)).permute(0, 2, 3, 1)  # (out, k, k, 3)
    cols = 16
    rows = math.ceil(len(w) / cols)
    k = w.shape[1]
    grid = torch.ones(rows * (k + 1) + 1, cols * (k + 1) + 1, 3)  # white lines between filters
    for i, image in enumerate(w):
        r, c = divmod(i, cols)
        grid[1 + r * (k + 1):1 + r * (k + 1) + k, 1 + c * (k + 1):1 + c * (k + 1) + k] = image
    fig, ax = plt.subplots(figsize=(cols * 0.5, rows * 0.5 + 0.4))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.axis("off")
    ax.set_title(title)
    save_figure(fig, path)


def plot_per_class(accuracy: dict[str, float], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(list(accuracy), list(accuracy.values()), color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in accuracy.values()], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    save_figure(fig, path)


def plot_confusion(matrix: torch.Tensor, classes: Sequence[str], path: Path) -> None:
    plt = pyplot()
    m = matrix.numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(m, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def plot_image_grid(images: Sequence[torch.Tensor], titles: Sequence[str], path: Path, empty_title: str) -> None:
    """uint8 images (3, H, W) enlarged on a grid of 8 columns, each with its title."""
    plt = pyplot()
    cols = 8
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=7)
    if not len(images):
        fig.suptitle(empty_title)
    save_figure(fig, path)


def plot_misclassified(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                       classes: Sequence[str], path: Path, count: int = 32) -> None:
    """A grid of the first `count` wrongly classified images, titled true -> predicted."""
    wrong = (predictions != labels).nonzero().flatten()[:count].tolist()
    plot_image_grid([images[i] for i in wrong], [f"{classes[labels[i]]}\n-> {classes[predictions[i]]}" for i in wrong],
                    path, "no misclassified images")


PREDICTION_COLUMNS = ("path", "label", "probability", "top2_label", "top2_probability", "top3_label", "top3_probability")


def save_predictions(rows: list[dict], out_dir: Path) -> None:
    """predictions.json as it is, and predictions.csv with one row per image, its top 3 flattened into columns."""
    save_json(rows, out_dir / "predictions.json")
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(PREDICTION_COLUMNS)
    for row in rows:
        writer.writerow([row["path"], row["label"], row["probability"],
                         *(value for top in row["top3"][1:] for value in (top["label"], top["probability"]))])
    atomic_write(out_dir / "predictions.csv", lambda f: f.write(text.getvalue().encode()))


def print_predictions(rows: list[dict]) -> None:
    """One line per image: file, predicted class and probability, the next two classes."""
    width = min(60, max([len("file"), *(len(row["path"]) for row in rows)])) + 2
    print(f"{'file':<{width}}{'class':<12}{'prob':>7}   next two")
    for row in rows:
        others = ", ".join(f"{top['label']} {top['probability']:.1%}" for top in row["top3"][1:])
        print(f"{row['path']:<{width}}{row['label']:<12}{row['probability']:>7.1%}   {others}")


def cpu_name() -> str:
    """The processor's model name where Linux tells it (/proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment_info(device: torch.device) -> dict:
    """Versions, git commit and hardware, for metrics.json."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    hardware = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(device)
        hardware["gpu_count"] = torch.cuda.device_count()
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": np.__version__},
            "git_commit": commit, "hardware": hardware}


def write_test_report(results: TestResults, data: CifarData, out_dir: Path) -> None:
    """Draw the test figures (per class, confusion, misclassified) in `out_dir` and print the per-class table."""
    plot_per_class(results.per_class, out_dir / "per_class.png", f"test accuracy per class ({results.accuracy:.2%} overall)")
    plot_confusion(results.confusion, data.classes, out_dir / "confusion.png")
    plot_misclassified(data.test_images, data.test_labels, results.predictions, data.classes, out_dir / "misclassified.png")
    first = min(1000, len(results.predictions))
    print(f"\n{'class':<12}{'accuracy':>9}")
    for name, acc in results.per_class.items():
        print(f"{name:<12}{acc:>9.2%}")
    print(f"{'all':<12}{results.accuracy:>9.2%}   ({len(results.predictions)} test images; first {first}: "
          f"{results.accuracy_first1000:.2%})")
    if results.accuracy_tta is not None:
        print(f"{'all, --tta':<12}{results.accuracy_tta:>9.2%}   (test-time augmentation; first {first}: "
              f"{results.accuracy_first1000_tta:.2%})")


def metrics_record(results: TestResults, model: nn.Module, device: torch.device, classes: Sequence[str],
                   settings: dict, environment: dict, **run) -> dict:
    """metrics.json: the test results, then what `run` adds (training's epochs and speed, or the checkpoint an
    evaluation read), the network's size, where it ran, its classes, its settings (recorded_settings) and the
    environment (versions, commit, hardware)."""
    metrics = {"test_accuracy": results.accuracy, "test_loss": results.loss,
               "test_accuracy_first1000": results.accuracy_first1000, "test_images": len(results.predictions),
               "per_class_accuracy": results.per_class, "confusion_matrix": results.confusion.tolist()}
    if results.accuracy_tta is not None:
        metrics.update(test_accuracy_tta=results.accuracy_tta, test_accuracy_first1000_tta=results.accuracy_first1000_tta)
    return {**metrics, **run, "params": count_parameters(model), "device": str(device), "classes": list(classes),
            "settings": settings, **environment}


SEED_METRICS = ("test_accuracy", "test_accuracy_first1000", "best_val_accuracy")  # what seeds.json spreads


def spread(values: Sequence[float]) -> dict:
    """The values with their mean, sample standard deviation (None for a single value), min and max."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"values": list(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def format_spread(values: dict) -> str:
    """'84.1 ± 0.3%' for a spread of accuracies; '84.1%' when there is no spread (one value)."""
    if values["std"] is None:
        return f"{values['mean']:.1%}"
    return f"{values['mean'] * 100:.1f} ± {values['std'] * 100:.1f}%"


def mean_history(histories: Sequence[list[dict]]) -> list[dict]:
    """Epoch by epoch mean of histories that may differ in length (early stopping): each epoch over the runs that
    reached it."""
    longest = max(histories, key=len)
    return [{key: float(np.mean([h[i][key] for h in histories if len(h) > i])) if key != "epoch" else row["epoch"]
             for key in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")}
            for i, row in enumerate(longest)]


def _load_run(run_dir: Path) -> dict:
    try:
        history = json.loads((run_dir / "history.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{run_dir}: not a finished run (needs history.json and metrics.json, or the seeds.json of "
                         f"--seeds: {e})") from None
    return {"run": str(run_dir), "history": history, "metrics": metrics}


def _load_seeds(run_dir: Path) -> dict:
    """A --seeds folder as one run: the mean history and metrics of its seed<S>/ runs, which it keeps as members."""
    seeds = json.loads((run_dir / "seeds.json").read_text())
    members = [_load_run(run_dir / f"seed{seed}") for seed in seeds["seeds"]]
    history = mean_history([m["history"] for m in members])
    metrics = {**{key: seeds[key]["mean"] for key in SEED_METRICS}, "best_epoch": None, "epochs_run": len(history)}
    return {"run": str(run_dir), "history": history, "metrics": metrics, "members": members, "seeds": seeds}


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    """history.json and metrics.json of finished runs (a --seeds folder gives its mean), with a message for a folder
    that holds neither."""
    return [_load_seeds(d) if (d / "seeds.json").exists() else _load_run(d) for d in map(Path, run_dirs)]


def run_values(run: dict) -> dict[str, list[float]]:
    """The final training and validation accuracies and SEED_METRICS of a loaded run: one value each, or one per
    seed of a --seeds folder."""
    members = run.get("members", [run])
    return {"final_train_accuracy": [m["history"][-1]["train_accuracy"] for m in members],
            "final_val_accuracy": [m["history"][-1]["val_accuracy"] for m in members],
            **{key: [m["metrics"][key] for m in members] for key in SEED_METRICS}}


def compare_runs(run_dirs: Sequence[str | Path], out_dir: Path) -> dict:
    """Overlay the runs' validation curves in compare.png, write compare.json, print their test accuracies.
    A --seeds folder takes part with its mean (and the spread of its test accuracy)."""
    plt = pyplot()
    runs = load_runs(run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        epochs = [r["epoch"] for r in run["history"]]
        label = Path(run["run"]).name + (f" (mean of {len(run['members'])} seeds)" if "members" in run else "")
        ax_loss.plot(epochs, [r["val_loss"] for r in run["history"]], label=label)
        ax_acc.plot(epochs, [r["val_accuracy"] for r in run["history"]], label=label)
    style_axes(ax_loss, "epoch", "validation loss")
    style_axes(ax_acc, "epoch", "validation accuracy")
    save_figure(fig, out_dir / "compare.png")
    summary = {"runs": []}
    for r in runs:
        row = {"run": r["run"], "test_accuracy": r["metrics"]["test_accuracy"],
               "test_accuracy_first1000": r["metrics"]["test_accuracy_first1000"],
               "best_val_accuracy": r["metrics"]["best_val_accuracy"], "best_epoch": r["metrics"]["best_epoch"],
               "epochs_run": r["metrics"]["epochs_run"], "val_accuracy": [h["val_accuracy"] for h in r["history"]],
               "val_loss": [h["val_loss"] for h in r["history"]]}
        if "members" in r:
            row.update(seeds=r["seeds"]["seeds"], test_accuracy_std=r["seeds"]["test_accuracy"]["std"])
        summary["runs"].append(row)
    save_json(summary, out_dir / "compare.json")
    width = max(len(r["run"]) for r in runs) + 2
    print(f"{'run':<{width}}{'test':>8}{'first 1000':>12}{'best val':>10}{'epochs':>8}")
    for run, r in zip(runs, summary["runs"]):
        seeds = f"  mean of {len(r['seeds'])} seeds: {format_spread(run['seeds']['test_accuracy'])}" if "seeds" in r else ""
        print(f"{r['run']:<{width}}{r['test_accuracy']:>8.2%}{r['test_accuracy_first1000']:>12.2%}"
              f"{r['best_val_accuracy']:>10.2%}{r['epochs_run']:>8}{seeds}")
    print(f"wrote {out_dir / 'compare.png'} and {out_dir / 'compare.json'}")
    return summary


def summarize_seeds(seeds: Sequence[int], run_dirs: Sequence[Path], out_dir: Path) -> dict:
    """seeds.json (each run's SEED_METRICS with their spread) and seeds.png (each run's validation curve and their
    mean) for finished runs that differ only in their seed; prints 'test accuracy 84.1 ± 0.3% over 3 seeds'."""
    runs = [_load_run(Path(d)) for d in run_dirs]
    commits = [r["metrics"].get("git_commit") for r in runs]
    summary = {"seeds": list(seeds), "runs": [r["run"] for r in runs], "git_commits": commits,
               **{key: spread([r["metrics"][key] for r in runs]) for key in SEED_METRICS}}
    if len(set(commits)) > 1:
        print(f"note: these runs were trained by {len(set(commits))} different commits of the project "
              f"({', '.join(str(c)[:7] for c in dict.fromkeys(commits))}): their spread is not the seeds' alone")
    save_json(summary, out_dir / "seeds.json")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, run in zip(seeds, runs):
        ax.plot([h["epoch"] for h in run["history"]], [h["val_accuracy"] for h in run["history"]], alpha=0.5,
                linewidth=1, label=f"seed {seed}")
    mean = mean_history([r["history"] for r in runs])
    ax.plot([h["epoch"] for h in mean], [h["val_accuracy"] for h in mean], color="black", linewidth=2, label="mean")
    ax.set_title(f"test accuracy {format_spread(summary['test_accuracy'])} over {len(runs)} seeds")
    style_axes(ax, "epoch", "validation accuracy")
    save_figure(fig, out_dir / "seeds.png")
    print(f"test accuracy {format_spread(summary['test_accuracy'])} over {len(runs)} seed{'s' * (len(runs) != 1)} "
          f"(first 1000: {format_spread(summary['test_accuracy_first1000'])}); seeds.json and seeds.png in {out_dir}")
    return summary


@contextlib.contextmanager
def tee_console(path: Path, enabled: bool = True):
    """Append what the block prints to stdout and stderr to `path` as well, after a line naming the command and the
    time; progress-bar redraws (lines that begin with a carriage return) stay on the console."""
    if not enabled:
        yield
        return

    class Tee:
        def __init__(self, console, log):
            self.console, self.log = console, log

        def write(self, text):
            self.console.write(text)
            if not text.startswith("\r"):
                self.log.write(text)
            return len(text)

        def flush(self):
            self.console.flush()
            self.log.flush()

        def isatty(self):
            return False

    with open(path, "a", encoding="utf-8") as log:
        log.write(f"==== {datetime.datetime.now():%Y-%m-%d %H:%M:%S}  python {shlex.join(sys.argv)}\n")
        original = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = original


# ---------------- export: ONNX and int8 for ONNX Runtime

EXPORT_PACKAGES = "onnx onnxscript onnxruntime"  # the optional packages --export needs
CALIBRATION_IMAGES = 512  # training images that calibrate --quantize int8 (never test images)


class PicturesToProbabilities(nn.Module):
    """A trained network as a picture classifier: uint8 RGB images (N, 32, 32, 3) in, class probabilities (N, 10)
    out; the layout change and the network's own normalisation happen inside."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("scale", 1 / (255 * torch.tensor(std, dtype=torch.float32)).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return self.model(x).softmax(1)


def export_packages():
    """(onnx, onnxruntime) imported, or a UsageError naming the pip command."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as e:
        raise UsageError(f"--export needs the optional packages {EXPORT_PACKAGES} ({e.name} is missing): "
                         f"pip install {EXPORT_PACKAGES}") from None
    return onnx, onnxruntime


def export_onnx(classifier: PicturesToProbabilities, path: Path, metadata: dict[str, str]) -> None:
    """Write `classifier` as an ONNX model (input `images`, output `probabilities`, batch dimension dynamic) with
    `metadata` in its metadata_props, whole or not at all."""
    onnx, _ = export_packages()
    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        raw = Path(folder) / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            torch.onnx.export(classifier.eval(), (example,), raw, input_names=["images"], output_names=["probabilities"],
                              dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, external_data=False,
                              dynamo=True)
        model = onnx.load(str(raw))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


def quantize_int8(fp32_path: Path, path: Path, calibration: torch.Tensor) -> None:
    """Write a statically quantised (int8 weights and activations, QDQ format) copy of the ONNX model at `fp32_path`,
    its activation ranges calibrated on the uint8 images (N, 32, 32, 3) `calibration`."""
    onnx, _ = export_packages()
    from onnxruntime import quantization

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration.split(64))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.numpy()}

    with tempfile.TemporaryDirectory() as folder:
        prepared, out = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quantization.quant_pre_process(str(fp32_path), str(prepared))
            quantization.quantize_static(str(prepared), str(out), Calibration(), quant_format=quantization.QuantFormat.QDQ,
                                         per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                         weight_type=quantization.QuantType.QInt8)
        quantized = out.read_bytes()
    model, source = onnx.load_from_string(quantized), onnx.load(str(fp32_path))
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)  # the quantiser keeps none of them
    model.metadata_props.add(key="quantization", value=f"int8 static, calibrated on {len(calibration)} training images")
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


def onnx_probabilities(path: Path, images: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Class probabilities ONNX Runtime computes for uint8 images (N, 32, 32, 3) with the model at `path`."""
    _, ort = export_packages()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = [session.run(["probabilities"], {"images": batch.numpy()})[0] for batch in images.split(batch_size)]
    return torch.from_numpy(np.concatenate(outputs)) if outputs else torch.zeros(0, 10)


def nhwc(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) as decoded pictures are laid out: (N, H, W, 3)."""
    return images.permute(0, 2, 3, 1).contiguous()


# ---------------- drive: the settings, made once from the flags

@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(Mapping):
    """Every setting of a run, made once by resolve_settings (defaults, then a recipe, then the flags given), checked
    by check_settings, never changed after: --resume, a sweep's runs and a time budget's plan make new ones with
    dataclasses.replace. A script adds the settings of its own network in a subclass (see ex1_convnet.Settings).
    It reads as a mapping too (settings["lr"]), as the settings a checkpoint saves do, so that a script's
    build_model takes either."""
    # where the data comes from and how much of it
    data_dir: str = "data"
    no_download: bool = False
    val_size: int = 1000
    limit_train: int | None = None
    seed: int = 0
    # how long to train: epochs, or a time budget whose plan fills in the planned_* fields, epochs and budget_choice
    recipe: str = "default"
    epochs: int | None
    time_budget: float | None = None
    budget_scaling: dict | None = None  # a recipe's rule for the settings a budget chooses (see scaled_by_epochs)
    planned_steps: int | None = None
    planned_images_per_s: float | None = None
    budget_choice: dict | None = None
    plan_from: str | None = None  # a sweep's run that trains the steps another run planned
    patience: int
    # the optimizer and its schedule
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    decay_norm_bias: bool = True
    norm_bias_lr: float = 1.0
    schedule: str
    warmup: float
    lr_decay: float | None
    lr_end: float = 0.0
    lookahead: bool = False
    label_smoothing: float
    # the input: augmentation and normalisation ('data': the training images' channel mean and std)
    augment: list[str]
    alternate_flip: bool = False
    crop_pad: int
    rotate_deg: float
    jitter: float
    gray_p: float
    mean: str | list[float]
    std: str | list[float]
    # where and how it runs, and the tasks besides training (RUNTIME_KEYS)
    out_dir: str | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    sync_bn: bool = True
    resume: bool = False
    overwrite: bool = False
    eval_only: bool = False
    checkpoint: str | None = None
    predict: list[str] | None = None
    tta: bool = False
    export: str | None = None
    quantize: str | None = None

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


# Flags that say where and how a run executes, not what it computes: free to change on --resume.
RUNTIME_KEYS = {"data_dir", "no_download", "out_dir", "device", "precision", "compile", "sync_bn",
                "resume", "overwrite", "eval_only", "checkpoint", "compare", "predict", "tta", "export", "quantize"}
RESUME_EXTENDABLE = {"epochs", "patience"}


def recorded_settings(settings: Mapping) -> dict:
    """The settings as checkpoints and metrics.json record what a run computes: without RUNTIME_KEYS."""
    return {k: v for k, v in settings.items() if k not in RUNTIME_KEYS}


def settings_from(settings_type: type[Settings], values: Mapping) -> Settings:
    """A script's Settings from saved values (a checkpoint's or metrics.json's): a value for a setting added since
    is its default, one for a setting since removed is left out."""
    fields = {f.name for f in dataclasses.fields(settings_type)}
    return settings_type(**{k: v for k, v in values.items() if k in fields})


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, training, output and device flags both scripts share (all default to None: a flag not given leaves
    the recipe's value or the Settings default)."""
    a = parser.add_argument
    a("--data-dir", help="folder holding cifar-10-batches-py/ (or that folder itself); downloaded there if missing (default: data)")
    a("--no-download", action="store_true", default=None, help="never download CIFAR-10; fail with a message if it is missing")
    a("--out-dir", help="where checkpoints, metrics and figures go (default: runs/<experiment>)")
    a("--recipe", help="hyperparameter set: 'default' (ours), 'original' (the assignment's), or in ex1_convnet.py 'short' "
                       "(for a few epochs, what --time-budget uses unless --recipe is given); explicit flags override it")
    a("--epochs", type=int, help="number of training epochs (default: the recipe's)")
    a("--time-budget", type=float, metavar="MINUTES",
      help="train for this many minutes of wall-clock time instead of --epochs (validation included; loading, "
           "building and the final test not): the speed of the first steps fixes the total steps, the learning-rate "
           "schedule runs over them, and the last epoch may be partial")
    a("--batch-size", type=int, help="global batch size, summed over all processes under torchrun (default: the recipe's)")
    a("--optimizer", choices=["adamw", "adam", "sgd"], help="AdamW, Adam or SGD with Nesterov momentum (default: the recipe's)")
    a("--lr", type=float, help="peak learning rate (default: the recipe's)")
    a("--weight-decay", type=float, help="weight decay (default: the recipe's)")
    a("--label-smoothing", type=float, help="label smoothing of the training loss (default: the recipe's)")
    a("--decay-norm-bias", action=argparse.BooleanOptionalAction,
      help="apply weight decay to BatchNorm and bias parameters too; --no-decay-norm-bias: to weights of more than "
           "one dimension only (default: the recipe's)")
    a("--alternate-flip", action=argparse.BooleanOptionalAction,
      help="flip: mirror each training image in every other epoch (half of them in odd epochs, the others in even "
           "ones) instead of at random (default: the recipe's)")
    a("--lookahead", action=argparse.BooleanOptionalAction,
      help=f"every {LOOKAHEAD_EVERY} steps and at each epoch's end, pull the weights and BatchNorm statistics towards "
           f"their running average and continue from it; the average's weight rises with the cube of the run's "
           f"progress to {LOOKAHEAD_DECAY}^{LOOKAHEAD_EVERY} (default: the recipe's)")
    a("--norm-bias-lr", type=float, metavar="X",
      help="learning rate of the BatchNorm biases: X times --lr (default: the recipe's)")
    a("--lr-end", type=float, metavar="F",
      help="one-cycle schedule: end at F times the peak learning rate instead of 0 (default: the recipe's)")
    a("--augment", help=f"comma-separated augmentation ops from {','.join(AUGMENT_OPS)}, or 'none' (default: the recipe's)")
    a("--no-augment", dest="augment", action="store_const", const="none", help="no augmentation (same as --augment none)")
    a("--crop-pad", type=int, help="crop: zero padding before the random 32x32 crop, in pixels; > 0 turns crop on, 0 off")
    a("--rotate-deg", type=float, help="rotate: largest rotation angle in degrees; > 0 turns rotate on, 0 off")
    a("--jitter", type=float, help="jitter: colour jitter strength (brightness, contrast, saturation, hue); > 0 turns jitter on, 0 off")
    a("--gray-p", type=float, help="gray: probability of turning an image grey; > 0 turns gray on, 0 off")
    a("--patience", type=int, help="stop after this many epochs without a better validation accuracy; 0 never stops early")
    a("--limit-train", type=int, help="train on the first N training images only, for quick runs")
    a("--val-size", type=int, help="validation images, taken from the end of the training set (default: 1000)")
    a("--seed", type=int, help="random seed: two CPU runs with the same seed give the same history (default: 0)")
    a("--seeds", type=int, metavar="N",
      help="train N runs with the seeds --seed, --seed+1, ... in --out-dir/seed<S>/ (finished ones are reused), then "
           "write seeds.json and seeds.png with the mean ± standard deviation of their accuracies")
    a("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"],
      help="auto (default): bf16 on GPUs with native bf16 (compute capability 8.0+) and on CPUs with fast bf16, "
           "fp16 on older GPUs, fp32 elsewhere")
    a("--compile", action="store_true", default=None, help="compile the model with torch.compile")
    a("--no-sync-bn", dest="sync_bn", action="store_false", default=None,
      help="under torchrun on CUDA, keep per-process BatchNorm instead of SyncBatchNorm")
    a("--resume", action="store_true", default=None, help="continue the run in --out-dir from its last.pt")
    a("--overwrite", action="store_true", default=None, help="start over in an --out-dir that already holds a run")
    a("--eval-only", action="store_true", default=None,
      help="evaluate --checkpoint on the test set and write its reports (default --out-dir: eval/ beside the checkpoint)")
    a("--checkpoint", help="checkpoint for --eval-only (default: best.pt in --out-dir) and for --predict "
                           "(default: best.pt of the script's default run folder)")
    a("--predict", nargs="+", metavar="PATH",
      help="predict the class of image files and of the image files in folders (PNG, JPEG, BMP, GIF, WebP, TIFF; "
           "any size: the shorter side is resized to 32, the centre cropped); prints a table and writes "
           "predictions.json, .csv and .png in --out-dir (default: predict/ beside the checkpoint); exit code 1 "
           "when a file could not be read and was skipped")
    a("--tta", action="store_true", default=None,
      help="test-time augmentation for --predict, --eval-only and a training run's final test: the softmax averaged "
           "over 6 views, the image and its left-right mirror, each as it is and shifted by 2 pixels diagonally "
           "both ways (+2,+2 and -2,-2, zero fill); metrics.json then adds test_accuracy_tta and "
           "test_accuracy_first1000_tta")
    a("--export", metavar="FILE.onnx",
      help="write the model of --checkpoint (default: best.pt in --out-dir) as an ONNX file for ONNX Runtime: input "
           "'images', uint8 (N, 32, 32, 3) RGB, output 'probabilities' (N, 10), normalisation inside; then check it "
           f"against PyTorch on the test set. Needs: pip install {EXPORT_PACKAGES}")
    a("--quantize", choices=["int8"],
      help=f"with --export: a statically quantised int8 model instead, calibrated on {CALIBRATION_IMAGES} training images")
    a("--compare", nargs="+", metavar="RUN_DIR",
      help="compare finished runs: compare.png and compare.json in --out-dir (default: runs/compare)")


def explicit_flags(args: argparse.Namespace) -> dict:
    """The flags given on the command line and their values (argparse leaves the others None)."""
    return {k: v for k, v in vars(args).items() if v is not None}


def choose_recipe(recipes: dict[str, dict], name: str) -> dict:
    if name not in recipes:
        raise UsageError(f"--recipe {name}: choose from {', '.join(recipes)}")
    return recipes[name]


def parse_augment(value: str | list) -> list[str]:
    if isinstance(value, list):
        return value
    ops = [] if value.strip() in ("", "none") else [op.strip() for op in value.split(",")]
    unknown = [op for op in ops if op not in AUGMENT_OPS]
    if unknown:
        raise UsageError(f"--augment: unknown op(s) {', '.join(unknown)}; choose from {', '.join(AUGMENT_OPS)} or none")
    return ops


def resolve_settings(flags_given: dict, recipe: dict, settings_type: type[Settings] = Settings) -> Settings:
    """The run's settings: the type's defaults, then the recipe, then the flags given (see explicit_flags)."""
    if "time_budget" in flags_given and "epochs" in flags_given:
        raise UsageError("--time-budget and --epochs both say how long to train: give one of them")
    values = {**recipe, **flags_given}
    if values.get("time_budget") is not None:
        values["epochs"] = None  # the plan made in the first epoch sets it
        if values["patience"]:
            if "patience" in flags_given:
                print(f"note: --patience {flags_given['patience']} is not applied under --time-budget: a budget run "
                      "trains its whole schedule", file=sys.stderr)
            values["patience"] = 0
    fixed = set(flags_given) | ({"crop_pad"} if "augment" in flags_given else set())
    values["budget_scaling"] = {key: value for key, value in (values.get("budget_scaling") or {}).items()
                                if key not in fixed} if values.get("time_budget") is not None else None
    ops = set(parse_augment(values["augment"]))
    for op, key in STRENGTH_KEYS.items():  # an explicit strength turns its op on (> 0) or off (0)
        if key in flags_given:
            ops = ops | {op} if flags_given[key] > 0 else ops - {op}
    on = {op for op in ops if op not in STRENGTH_KEYS or values[STRENGTH_KEYS[op]] > 0}  # a strength of 0 is off
    values["augment"] = [op for op in AUGMENT_OPS if op in on]
    return settings_type(**values)


def check_settings(settings: Settings) -> None:
    """Refuse values that cannot train, before any work starts."""
    for key in ("epochs", "batch_size"):
        if settings[key] is not None and settings[key] <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive (got {settings[key]})")
    budget = settings.time_budget
    if budget is not None and not 0 < budget < math.inf:
        raise UsageError(f"--time-budget must be a positive number of minutes (got {budget:g})")
    if not 0 < settings.lr < math.inf:
        raise UsageError(f"--lr must be positive and finite (got {settings.lr})")
    dropout = settings.get("dropout", 0)
    for p in dropout if isinstance(dropout, list) else [dropout]:
        if not 0 <= p < 1:
            raise UsageError(f"--dropout must be in [0, 1) (got {p})")
    if settings.limit_train is not None and settings.limit_train <= 0:
        raise UsageError(f"--limit-train must be positive (got {settings.limit_train})")
    if settings.weight_decay < 0 or settings.patience < 0 or not 0 <= settings.label_smoothing < 1:
        raise UsageError("--weight-decay and --patience must not be negative, --label-smoothing must be in [0, 1)")


def prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and make sure files can be written there."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a plain run stays single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), world, local_rank


# ---------------- drive: one training run, from set-up to its report

class ModelBuilder(Protocol):
    """How a script builds its network from a run's settings (its Settings, or the dict a checkpoint saved). With
    `initial_weights` False a checkpoint's weights replace the new ones at once, so a builder need not fetch any
    starting weights (ex2's ImageNet download)."""

    def __call__(self, settings: Mapping, *, initial_weights: bool = True) -> nn.Module: ...


def load_training_data(settings: Settings, ctx: TrainContext) -> tuple[CifarData, Splits]:
    """The data set and its training and validation splits, checked to give a full batch."""
    if ctx.world > 1 and ctx.rank != 0:
        dist.barrier()  # rank 0 downloads first
    data = load_cifar10(settings.data_dir, download=not settings.no_download)
    if ctx.world > 1 and ctx.rank == 0:
        dist.barrier()
    splits = Splits(*split_train_val(data, settings.val_size, settings.limit_train))
    if settings.batch_size % ctx.world:
        raise UsageError(f"--batch-size {settings.batch_size} must be divisible by the {ctx.world} processes")
    if len(splits.train_images) < settings.batch_size:
        raise UsageError(f"{len(splits.train_images)} training images (after --val-size/--limit-train) leave no full "
                         f"batch of {settings.batch_size}; lower --batch-size or train on more images")
    return data, splits


def with_data_mean_std(settings: Settings, train_images: torch.Tensor) -> Settings:
    """The settings in which mean and std 'data' became the training images' channel mean and std."""
    if settings.mean != "data":
        return settings
    mean, std = channel_mean_std(train_images)
    return dataclasses.replace(settings, mean=mean, std=std)


def train_step(settings: Settings) -> TrainStep:
    """What each training step applies, from the settings."""
    ops = augmentation(settings.augment, {op: settings[key] for op, key in STRENGTH_KEYS.items()})
    return TrainStep(ops, settings.mean, settings.std, settings.label_smoothing, settings.alternate_flip,
                     settings.lookahead)


def first_plan(settings: Settings, steps_per_epoch: int) -> Plan:
    """The plan a run starts with: its epochs' steps, a resumed time budget's last plan, or none yet (None)."""
    if settings.time_budget is None:
        return Plan(steps_per_epoch, settings.epochs * steps_per_epoch)
    return Plan(steps_per_epoch, settings.planned_steps, settings.planned_images_per_s)


def with_plan(settings: Settings, plan: Plan) -> Settings:
    """The settings as a time budget's run records them: with its plan's steps, speed and epochs."""
    if settings.time_budget is None:
        return settings
    return dataclasses.replace(settings, planned_steps=plan.total_steps, planned_images_per_s=plan.images_per_s,
                               epochs=plan.epochs)


def with_budget_choice(settings: Settings, plan: Plan, ctx: TrainContext) -> Settings:
    """Once a time budget's plan knows how many epochs it buys: the settings with the regularisation the recipe's
    budget_scaling gives for that many (the flags given on the command line were taken out of it), the choice
    recorded in budget_choice, and said."""
    scaling = settings.budget_scaling or {}
    if len(scaling) < 2:
        return settings
    epochs = plan.total_steps / plan.steps_per_epoch
    chosen = scaled_by_epochs(scaling, epochs)
    augment = [op for op in settings.augment if op != "crop" or chosen.get("crop_pad", settings.crop_pad) > 0]
    if ctx.is_main:
        few, many = scaling["epochs"]
        tqdm.write(f"plan: for {epochs:.1f} epochs " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in chosen.items())
                   + f" (the recipe's budget_scaling: its {few:g}-epoch values up to {few:g} epochs, its {many:g}-epoch "
                   f"values from {many:g}, on the logarithm of the epochs between; a flag given keeps its value)",
                   file=sys.stdout)
    return dataclasses.replace(settings, **chosen, augment=augment,
                               budget_choice={"planned_epochs": round(epochs, 2), **chosen})


def set_up_training(settings: Settings, build_model: ModelBuilder, plan: Plan, ctx: TrainContext,
                    resume_from: dict | None, train_images: torch.Tensor) -> Training:
    """The network, optimizer, learning-rate schedule (over the `plan`'s steps, as they stand at each step) and
    gradient scaler: new (with whiten, the first filters whitening the patches of `train_images`), or as the checkpoint
    `resume_from` left them; the network wrapped for several processes and compiled if asked."""
    torch.manual_seed(settings.seed)
    model = build_model(settings, initial_weights=resume_from is None)
    if resume_from is None and settings.get("whiten"):
        whitening = patch_whitening_filters(train_images, settings.mean, settings.std)
        with torch.no_grad():
            first_conv_weight(model)[:len(whitening)] = whitening
    model = model.to(ctx.device)
    if ctx.is_main:
        print(model)
        print(f"parameters: {count_parameters(model):,}  trainable: "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
        print(f"device: {ctx.device}  precision: {str(ctx.dtype).replace('torch.', '')}  processes: {ctx.world}")
        print("settings: " + json.dumps(recorded_settings(settings)))
    model = model.to(memory_format=torch.channels_last)
    groups = parameter_groups(model, settings.decay_norm_bias, settings.lr, settings.norm_bias_lr)
    optimizer = make_optimizer(groups, settings.optimizer, settings.lr, settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, plan.total_steps, plan.steps_per_epoch, settings.schedule, settings.warmup, settings.lr_decay,
        settings.lr_end))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        scaler.load_state_dict(resume_from["scaler"])
    train_model = model
    if ctx.world > 1:
        if ctx.device.type == "cuda" and settings.sync_bn:
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if settings.compile:
        train_model = torch.compile(train_model)
    return Training(model, train_model, optimizer, scheduler, scaler)


class FinalTest(NamedTuple):
    """The final test of a run: the best epoch's model (its weights now in the network), the last epoch's accuracy."""
    results: TestResults
    last_accuracy: float


def final_test(script: str, model: nn.Module, fitted: Fitted, data: CifarData, mean: Sequence[float],
               std: Sequence[float], tta: bool, out_dir: Path, ctx: TrainContext) -> FinalTest:
    """Test the last epoch's model, then load the best epoch's weights from best.pt and test them (once, when the
    last epoch is the best)."""
    last_is_best = fitted.best.epoch == len(fitted.history)  # then best.pt holds these very weights
    last = None if last_is_best else evaluate(model, data.test_images, data.test_labels, mean, std, ctx)["accuracy"]
    model.load_state_dict(load_checkpoint(out_dir / "best.pt", script)["model"])
    results = test_results(model, data.test_images, data.test_labels, data.classes, mean, std, ctx, tta)
    return FinalTest(results, results.accuracy if last_is_best else last)


def write_final_report(settings: Settings, model: nn.Module, plan: Plan, fitted: Fitted, tested: FinalTest,
                       resumed_epochs: int, data: CifarData, out_dir: Path, ctx: TrainContext, environment: dict) -> dict:
    """The trained filters, the history, the test figures and metrics.json of a finished run; returns the metrics."""
    history, best = fitted.history, fitted.best
    plot_filters(first_conv_weight(model), out_dir / "filters_after.png",
                 f"first-layer filters after training (epoch {best.epoch})")
    plot_history(history, best.epoch, out_dir / "history.png")
    write_test_report(tested.results, data, out_dir)
    trained = history[resumed_epochs:]  # the epochs this call trained
    metrics = metrics_record(
        tested.results, model, ctx.device, data.classes, recorded_settings(settings), environment,
        test_accuracy_last=tested.last_accuracy, best_epoch=best.epoch, best_val_accuracy=best.val_accuracy,
        epochs_run=len(history), train_seconds=fitted.seconds, time_budget_minutes=settings.time_budget,
        planned_steps=plan.total_steps, run_steps=sum(r.get("steps", plan.steps_per_epoch) for r in history),
        train_images_per_s=(sum(r["images_per_s"] * r["seconds"] for r in trained)
                            / max(1e-9, sum(r["seconds"] for r in trained))),
        processes=ctx.world,
        precision="+".join(dict.fromkeys(r.get("precision", str(ctx.dtype).replace("torch.", "")) for r in history)))
    save_json(metrics, out_dir / "metrics.json")
    print(f"best epoch {best.epoch} (val {best.val_accuracy:.2%}); test {metrics['test_accuracy']:.2%}, first 1000 "
          f"{metrics['test_accuracy_first1000']:.2%}, last epoch's model {tested.last_accuracy:.2%}; reports in {out_dir}")
    return metrics


def train_and_report(script: str, settings: Settings, data: CifarData, splits: Splits, build_model: ModelBuilder,
                     out_dir: Path, ctx: TrainContext, resume_from: dict | None = None) -> dict:
    """Train with early stopping and checkpoints in `out_dir`, test the best model, write every report."""
    environment = environment_info(ctx.device)  # the commit that trains, even if the tree moves on meanwhile
    fingerprint = data_fingerprint(splits)
    if resume_from is not None and resume_from.get("data_fingerprint") not in (None, fingerprint):
        raise UsageError(f"--data-dir {settings.data_dir}: the data differs from the data the run in {out_dir} was "
                         f"trained on; resume with that data, or start a new run (--overwrite or another --out-dir)")
    settings = with_data_mean_std(settings, splits.train_images)
    plan = first_plan(settings, steps_per_epoch(len(splits.train_images), settings.batch_size))
    training = set_up_training(settings, build_model, plan, ctx, resume_from, splits.train_images)
    history, best = [], BestEpoch()
    if resume_from is None:
        if ctx.is_main:
            plot_filters(first_conv_weight(training.model), out_dir / "filters_before.png",
                         "first-layer filters before training")
    else:
        history, best = resume_from["history"], BestEpoch(resume_from["best_epoch"], resume_from["best_val_accuracy"])
        if ctx.is_main:
            print(f"resuming after epoch {len(history)} of {settings.epochs} (best so far: epoch {best.epoch})")
    chosen = settings  # with the choices a time budget's plan makes (with_budget_choice)

    def on_plan() -> TrainStep:
        nonlocal chosen
        chosen = with_budget_choice(chosen, plan, ctx)
        if "dropout" in (chosen.budget_choice or {}):
            set_dropout(training.model, chosen["dropout"])
        return train_step(chosen)

    def save_epoch(history: list[dict], best: BestEpoch, improved: bool) -> None:
        checkpoint = checkpoint_state(script, dict(with_plan(chosen, plan)), training, history, best, fingerprint,
                                      data.classes)
        save_epoch_files(checkpoint, improved, out_dir)

    fitted = fit(training, splits, plan, train_step(settings), settings.seed, settings.batch_size, settings.patience,
                 settings.time_budget, not settings.plan_from, history, best, ctx, on_plan, save_epoch)
    if not ctx.is_main:
        return {}
    tested = final_test(script, training.model, fitted, data, settings.mean, settings.std, settings.tta, out_dir, ctx)
    return write_final_report(with_plan(chosen, plan), training.model, plan, fitted, tested, len(history), data,
                              out_dir, ctx, environment)


# ---------------- drive: the tasks on a checkpoint (--eval-only, --export, --predict)

def model_from_checkpoint(checkpoint: dict, build_model: ModelBuilder, ctx: TrainContext) -> nn.Module:
    """The network a checkpoint holds, rebuilt from its settings and weights, on the device."""
    model = build_model(checkpoint["settings"], initial_weights=False)
    model.load_state_dict(checkpoint["model"])
    return model.to(ctx.device, memory_format=torch.channels_last)


def eval_only(script: str, checkpoint_path: Path, out_dir: Path, data_dir: str, download: bool, tta: bool,
              build_model: ModelBuilder, ctx: TrainContext) -> dict:
    """Rebuild the model of a checkpoint, evaluate it on the test set in `data_dir`, write metrics.json and the test
    figures in `out_dir`."""
    checkpoint = load_checkpoint(checkpoint_path, script)
    saved = checkpoint["settings"]
    prepare_out_dir(out_dir)
    data = load_cifar10(data_dir, download=download)
    model = model_from_checkpoint(checkpoint, build_model, ctx)
    print(f"evaluating {checkpoint_path} (epoch {checkpoint['epoch']}) on {ctx.device}")
    results = test_results(model, data.test_images, data.test_labels, data.classes, saved["mean"], saved["std"], ctx, tta)
    write_test_report(results, data, out_dir)
    metrics = metrics_record(results, model, ctx.device, data.classes, recorded_settings(saved),
                             environment_info(ctx.device), checkpoint=str(checkpoint_path), epoch=checkpoint["epoch"],
                             best_epoch=checkpoint["best_epoch"], best_val_accuracy=checkpoint["best_val_accuracy"])
    save_json(metrics, out_dir / "metrics.json")
    print(f"reports in {out_dir}")
    return metrics


def export_model(script: str, checkpoint_path: Path, path: Path, quantize: str | None, data_dir: str, download: bool,
                 build_model: ModelBuilder) -> int:
    """--export: write the checkpoint's network as an ONNX picture classifier at `path` (int8 with `quantize`), then
    check it: ONNX Runtime against PyTorch on the test set, or on one random batch where no test set is at hand.
    Returns the exit code: 1 when an fp32 export disagrees with PyTorch (the file is then removed), else 0."""
    export_packages()
    checkpoint = load_checkpoint(checkpoint_path, script)
    saved, classes = checkpoint["settings"], list(checkpoint.get("classes", CLASSES))
    prepare_out_dir(path.parent)
    try:
        data = load_cifar10(data_dir, download=download)
    except UsageError as e:
        if quantize:
            raise UsageError(f"--quantize int8 calibrates on training images, and there are none at hand: {e}") from None
        data = None
    cpu = TrainContext(torch.device("cpu"), torch.float32)
    model = model_from_checkpoint(checkpoint, build_model, cpu).eval()
    classifier = PicturesToProbabilities(model, saved["mean"], saved["std"])
    run_metrics = {}  # the test accuracy its training run measured, where it lies beside the checkpoint
    with contextlib.suppress(OSError, ValueError):
        run_metrics = json.loads((checkpoint_path.parent / "metrics.json").read_text())
    metadata = {"classes": json.dumps(classes), "script": script, "checkpoint": str(checkpoint_path),
                "checkpoint_epoch": str(checkpoint["epoch"]), "test_accuracy": str(run_metrics.get("test_accuracy")),
                "git_commit": str(environment_info(cpu.device)["git_commit"]),
                "input": "images: uint8 (N, 32, 32, 3), RGB", "output": "probabilities: float32 (N, 10), softmax"}
    print(f"exporting {checkpoint_path} (epoch {checkpoint['epoch']}) to {path}" + (" as int8" if quantize else ""))
    if quantize:
        with tempfile.TemporaryDirectory() as folder:
            export_onnx(classifier, Path(folder) / "fp32.onnx", metadata)
            calibration = nhwc(data.train_images[:CALIBRATION_IMAGES])
            quantize_int8(Path(folder) / "fp32.onnx", path, calibration)
        print(f"int8: calibrated on the first {len(calibration)} training images")
    else:
        export_onnx(classifier, path, metadata)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if data is None:
        images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        labels = None
    else:
        images, labels = data.test_images, data.test_labels
    expected = predict(model, images, saved["mean"], saved["std"], cpu).softmax(1)
    got = onnx_probabilities(path, nhwc(images))
    same = (expected.argmax(1) == got.argmax(1)).sum().item()
    largest = (expected - got).abs().max().item() if len(images) else 0.0
    what = "int8" if quantize else "fp32"
    if labels is None:
        print(f"check on one random batch of {len(images)} images: the same class for {same}/{len(images)}, largest "
              f"difference in probability {largest:.1e}; the accuracy check was skipped (no test set at hand)")
    else:
        onnx_accuracy = (got.argmax(1) == labels).float().mean().item()
        torch_accuracy = (expected.argmax(1) == labels).float().mean().item()
        print(f"check on the {len(images)} test images: ONNX Runtime ({what}) {onnx_accuracy:.2%}, PyTorch "
              f"{torch_accuracy:.2%}; the same class for {same}/{len(images)} ({same / len(images):.2%}); largest "
              f"difference in probability {largest:.1e}"
              + (f"; int8 against PyTorch: {(onnx_accuracy - torch_accuracy) * 100:+.2f} points" if quantize else ""))
    if not quantize and same < 0.999 * len(images):
        path.unlink()
        print(f"error: the ONNX model gives another class than PyTorch for {len(images) - same} of {len(images)} "
              f"images; {path} removed", file=sys.stderr)
        return 1
    return 0


PREDICT_BATCH = 256  # images read, held and predicted at a time
PREVIEW_COUNT = 64  # inputs drawn in predictions.png


def predict_images(script: str, paths: Sequence[str], tta: bool, build_model: ModelBuilder, ctx: TrainContext,
                   checkpoint_path: Path, out_dir: Path) -> int:
    """Predict the class of every image file in `paths` (files and folders) with a checkpoint: print a table, write
    predictions.json, .csv and .png in `out_dir`. Returns the exit code: 1 when a file was skipped as unreadable,
    else 0.
    """
    files = image_files(paths)  # a missing path or an empty folder is refused before the model loads
    checkpoint = load_checkpoint(checkpoint_path, script)
    saved, classes = checkpoint["settings"], checkpoint.get("classes", CLASSES)
    prepare_out_dir(out_dir)
    model = model_from_checkpoint(checkpoint, build_model, ctx)
    print(f"predicting {len(files)} file(s) with {checkpoint_path} (epoch {checkpoint['epoch']}) on {ctx.device}"
          + (", test-time augmentation" if tta else ""))
    rows, previews, titles, skipped = [], [], [], 0
    bar = tqdm(total=len(files), unit="image", desc="predict", leave=False, dynamic_ncols=True)
    for start in range(0, len(files), PREDICT_BATCH):
        read, images = [], []
        for path in files[start:start + PREDICT_BATCH]:
            try:
                images.append(load_image(path))
                read.append(path)
            except UnreadableImage as e:
                tqdm.write(f"skipped {path}: {e}", file=sys.stderr)
                skipped += 1
            bar.update()
        if not images:
            continue
        probabilities = predict(model, torch.stack(images), saved["mean"], saved["std"], ctx, tta).softmax(1).cpu()
        top_p, top_i = probabilities.topk(3, dim=1)
        for path, image, p, i in zip(read, images, top_p.tolist(), top_i.tolist()):
            top3 = [{"label": classes[c], "probability": round(q, 6)} for c, q in zip(i, p)]
            rows.append({"path": str(path), "label": top3[0]["label"], "probability": top3[0]["probability"], "top3": top3})
            if len(previews) < PREVIEW_COUNT:
                previews.append(image)
                titles.append(f"{top3[0]['label']} {p[0]:.0%}")
    bar.close()
    print_predictions(rows)
    save_predictions(rows, out_dir)
    plot_image_grid(previews, titles, out_dir / "predictions.png", "no image could be read")
    print(f"{len(rows)} predicted, {skipped} skipped; predictions.json, predictions.csv and predictions.png in {out_dir}")
    return 1 if skipped else 0


# ---------------- drive: start or resume, sweeps, the command line

def resume_settings(flags_given: dict, saved: dict, settings_type: type[Settings]) -> Settings:
    """The saved run's settings with the runtime flags, --epochs and --patience of this call on top."""
    if "epochs" in flags_given and saved.get("time_budget") is not None:
        raise UsageError(f"--epochs: the run being resumed trains for --time-budget {saved['time_budget']:g} minutes, "
                         f"and --resume continues its plan ({saved.get('planned_steps')} steps)")
    for key, value in flags_given.items():
        if key in RUNTIME_KEYS or key in RESUME_EXTENDABLE:
            continue
        if (parse_augment(value) if key == "augment" else value) != saved.get(key):
            raise UsageError(f"--{key.replace('_', '-')} {value} differs from the run being resumed "
                             f"({saved.get(key)}): --resume keeps the run's settings; only --epochs and --patience may change")
    return settings_from(settings_type, {**saved, **{k: v for k, v in flags_given.items()
                                                     if k in RUNTIME_KEYS or k in RESUME_EXTENDABLE}})


def resumed_precision(ctx: TrainContext, resume_from: dict, precision_given: bool) -> TrainContext:
    """The context a resumed run trains in: the precision its last epoch trained in, unless --precision names one
    (then a line says so). Checkpoints from before history rows recorded it resolve the run's own --precision."""
    history = resume_from["history"]
    saved = history[-1].get("precision") if history else None
    if saved is None:
        saved = str(resolve_precision(resume_from["settings"].get("precision", "auto"), ctx.device)).replace("torch.", "")
    dtype = getattr(torch, saved)
    if not precision_given:
        return ctx._replace(dtype=dtype)
    if dtype != ctx.dtype and ctx.is_main:
        print(f"note: epochs 1-{len(history)} trained in {saved}; --precision makes the rest "
              f"{str(ctx.dtype).replace('torch.', '')} (history.json records each epoch's precision)")
    return ctx


@contextlib.contextmanager
def run_dir_lock(out_dir: Path):
    """Hold an exclusive lock on out_dir/.lock (with this process's id in it) while the block runs: a second run into
    the same folder is refused at once. The system drops the lock when the process ends, however it ends."""
    import fcntl  # POSIX only: imported here so that the module loads everywhere
    with open(out_dir / ".lock", "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise UsageError(f"{out_dir} is in use by another run (process {holder}); wait for it to end, or choose "
                             "another --out-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def start_or_resume(script: str, settings: Settings, flags_given: dict, build_model: ModelBuilder, out_dir: Path,
                    ctx: TrainContext) -> dict | None:
    """Train in `out_dir`: fresh, resumed from its last.pt (the flags given checked against its settings), or not
    at all when it already holds a finished run."""
    finished, unfinished = (out_dir / "metrics.json").exists(), (out_dir / "last.pt").exists()
    resume_from = None
    if settings.resume:
        if finished:
            if ctx.is_main:
                print(f"{out_dir} holds a finished run (metrics.json); nothing to resume")
            return None
        if not unfinished:
            raise UsageError(f"nothing to resume in {out_dir}: it has no last.pt (start without --resume)")
        resume_from = load_checkpoint(out_dir / "last.pt", script)
        settings = resume_settings(flags_given, resume_from["settings"], type(settings))
        ctx = resumed_precision(ctx, resume_from, "precision" in flags_given)
    elif (finished or unfinished) and not settings.overwrite:
        what = "a finished run (metrics.json)" if finished else "an unfinished run (last.pt); --resume continues it"
        raise UsageError(f"{out_dir} already holds {what}; pass --overwrite to start over, or choose another --out-dir")
    check_settings(settings)
    prepare_out_dir(out_dir)
    with contextlib.ExitStack() as stack:
        if ctx.is_main:
            stack.enter_context(run_dir_lock(out_dir))
            for stale in out_dir.glob(".*.tmp"):  # temporary files of atomic_write left by a run killed while saving
                stale.unlink(missing_ok=True)
        data, splits = load_training_data(settings, ctx)
        if ctx.world > 1:
            dist.barrier()
        command = shlex.join([*sys.argv, *(["--resume"] if "--resume" not in sys.argv else [])])  # a sweep's too
        try:
            with tee_console(out_dir / "train.log", enabled=ctx.is_main):
                return train_and_report(script, settings, data, splits, build_model, out_dir, ctx, resume_from)
        except KeyboardInterrupt:
            if not (out_dir / "last.pt").exists():
                raise KeyboardInterrupt(f"no epoch had finished: nothing to resume in {out_dir}; start the run again") from None
            raise KeyboardInterrupt(f"{out_dir / 'last.pt'} holds the last finished epoch; resume with: python {command}") from None
        except SaveError as e:
            if (out_dir / "last.pt").exists():
                kept = " and ".join(name for name in ("last.pt", "best.pt") if (out_dir / name).exists())
                intact = f"{kept} in {out_dir} hold the last epochs saved whole; resume with: python {command}"
            elif (out_dir / "best.pt").exists():
                intact = f"best.pt in {out_dir} holds the best epoch saved whole, but no last.pt to resume from"
            else:
                intact = "no epoch was saved"
            raise SaveError(e.errno, f"{e.strerror}; {intact}", e.filename) from None


class Sweep(NamedTuple):
    """Runs that differ in one setting, each in the sub-folder <prefix><value>/ of the output folder."""
    key: str  # the setting that varies
    values: list
    prefix: str  # of the sub-folders: "p" gives p0.1/, "seed" gives seed0/
    changes: dict  # settings every run of the sweep changes besides `key`
    report: Callable[[list, list[Path], Path], object]  # (values, their run folders, the folder): the sweep's summary


PLAN_KEYS = ("planned_steps", "planned_images_per_s", "epochs", "budget_choice")  # what a time budget's plan sets


def differing_settings(asked: Mapping, saved: dict) -> list[str]:
    """The settings a finished run was trained with that differ from those `asked` for now, as 'name: saved -> asked'.
    What the run itself filled in is left out: its plan under a time budget, a mean and std taken from the data."""
    filled = {"plan_from", *PLAN_KEYS, *(saved.get("budget_choice") or {})} if asked.get("time_budget") is not None \
        else {"plan_from"}
    differences = []
    for key, value in asked.items():
        if key in RUNTIME_KEYS or key in filled or key not in saved or (key in ("mean", "std") and value == "data"):
            continue  # a key the run did not record is a setting added since, whose default keeps what it did
        if key == "budget_scaling" and not value:
            value = None
        if saved.get(key) != (parse_augment(value) if key == "augment" else value):
            differences.append(f"{key}: {saved.get(key)} -> {value}")
    return differences


def reusable_run(run_dir: Path, settings: Settings) -> bool:
    """True when `run_dir` holds a finished run trained with `settings` (and not --overwrite); refuses a finished run
    with other settings, naming them."""
    if settings.overwrite or not (run_dir / "metrics.json").exists():
        return False
    saved = _load_run(run_dir)["metrics"].get("settings", {})
    differences = differing_settings(settings, saved)
    if differences:
        raise UsageError(f"{run_dir} holds a finished run trained with other settings ({'; '.join(differences)}); "
                         "pass --overwrite to train it again with these, or choose another --out-dir")
    return True


def shared_plan(run_dir: Path) -> dict:
    """The time budget's plan of the finished run in `run_dir`, for the next runs of a sweep to train the same steps."""
    saved = _load_run(run_dir)["metrics"]["settings"]
    chosen = {key: saved[key] for key in saved.get("budget_choice") or {} if key != "planned_epochs"}
    return {**{key: saved[key] for key in PLAN_KEYS if key in saved}, **chosen, "plan_from": str(run_dir)}


def run_sweeps(sweeps: Sequence[Sweep], script: str, settings: Settings, flags_given: dict, build_model: ModelBuilder,
               out_dir: Path, ctx: TrainContext) -> None:
    """One run per value of the first sweep in out_dir/<prefix><value>/, each swept in turn by the others; a finished
    run is reused when its settings are these, an unfinished one continued with --resume. Under a time budget the
    first run plans and the others train its planned steps. Then the main process writes the sweep's report."""
    sweep, inner = sweeps[0], sweeps[1:]
    run_dirs = []
    for value in sweep.values:
        run_dir = out_dir / f"{sweep.prefix}{value}"
        run_settings = dataclasses.replace(settings, **sweep.changes, **{sweep.key: value})
        if run_settings.budget_scaling:  # the swept setting is the sweep's, not the plan's
            run_settings = dataclasses.replace(run_settings, budget_scaling={
                k: v for k, v in run_settings.budget_scaling.items() if k != sweep.key})
        if inner:
            run_sweeps(inner, script, run_settings, flags_given, build_model, run_dir, ctx)
        elif reusable_run(run_dir, run_settings):
            if ctx.is_main:
                print(f"{run_dir} is finished; using its results")
        else:
            resume = settings.resume and (run_dir / "last.pt").exists()
            start_or_resume(script, dataclasses.replace(run_settings, resume=resume), flags_given, build_model, run_dir, ctx)
        run_dirs.append(run_dir)
        if settings.time_budget is not None and settings.planned_steps is None:
            first = run_dir.joinpath(*(f"{s.prefix}{s.values[0]}" for s in inner))
            settings = dataclasses.replace(settings, **shared_plan(first))
    if ctx.is_main:
        sweep.report(sweep.values, run_dirs, out_dir)


def seeds_sweep(first: int, count: int) -> Sweep:
    """--seeds: the seeds first, first+1, ... in seed<S>/, summarised by seeds.json and seeds.png."""
    if count < 1:
        raise UsageError(f"--seeds must be at least 1 (got {count})")
    return Sweep("seed", list(range(first, first + count)), "seed", {}, summarize_seeds)


def interrupted_outside_training(flags_given: dict, sweep: bool, out_dir: Path) -> str:
    """What Ctrl-C outside an epoch (loading data, between the runs of a sweep, writing a report) leaves, and how to
    go on."""
    command = shlex.join([*sys.argv, *(["--resume"] if sweep and "--resume" not in sys.argv else [])])
    if sweep:
        return (f"the finished runs in {out_dir} are kept, and so is the last epoch of an unfinished one; continue "
                f"with: python {command}")
    if any(flags_given.get(task) for task in TASK_FLAGS):
        return f"no training was affected; run the command again: python {command}"
    return (f"{out_dir} keeps what it held before (a run's last.pt and best.pt are written whole or not at all); "
            f"to go on: python {command}")


TASK_FLAGS = ("compare", "predict", "eval_only", "seeds", "export")  # each one a task of its own: one a command line


def task_checkpoint(flags_given: dict, out_dir: Path) -> Path:
    """The checkpoint --eval-only, --predict and --export read: --checkpoint, else best.pt of the run in --out-dir
    (the script's run folder by default)."""
    return Path(flags_given["checkpoint"]) if "checkpoint" in flags_given else out_dir / "best.pt"


def checkpoint_and_reports(flags_given: dict, out_dir: Path, task: str) -> tuple[Path, Path]:
    """(the checkpoint --eval-only or --predict reads (task_checkpoint), the folder its reports go to): <task>/ beside
    the checkpoint, or --out-dir when --checkpoint names the checkpoint, a folder that must not hold a training run."""
    checkpoint = task_checkpoint(flags_given, out_dir)
    if "checkpoint" not in flags_given or "out_dir" not in flags_given:
        return checkpoint, checkpoint.parent / task
    if any((out_dir / name).exists() for name in ("last.pt", "history.json")):
        raise UsageError(f"--out-dir {out_dir} holds a training run, whose files an evaluation would overwrite: "
                         f"choose another folder, or leave --out-dir out to write into {checkpoint.parent / task}")
    return checkpoint, out_dir


def run_experiment(args: argparse.Namespace, script: str, recipes: dict[str, dict], settings_type: type[Settings],
                   build_model: ModelBuilder, default_out_dir: str, default_recipe: str = "default",
                   sweeps: Sequence[Sweep] = ()) -> int:
    """Everything a script's command line can ask for; returns the exit code. `settings_type` is the script's
    Settings; `sweeps` are its own (ex1's dropout values); --seeds adds one inside them. The settings they vary are
    left out of the flags given."""
    flags_given = explicit_flags(args)
    out_dir = Path(flags_given.get("out_dir", default_out_dir))
    try:
        tasks = [f"--{key.replace('_', '-')}" for key in TASK_FLAGS if flags_given.get(key)]
        if sweeps and "--seeds" not in tasks:  # the script's sweep trains runs as --seeds does, and composes with it
            tasks.append(f"--{sweeps[0].key} with several values")
        if len(tasks) > 1:
            raise UsageError(f"{' and '.join(tasks)} are separate tasks: give one of them")
        if "quantize" in flags_given and "export" not in flags_given:
            raise UsageError("--quantize int8 goes with --export FILE.onnx: it says how to export")
        if "compare" in flags_given:
            compare_runs(flags_given["compare"], Path(flags_given.get("out_dir", "runs/compare")))
            return 0
        if "seeds" in flags_given:
            sweeps = [*sweeps, seeds_sweep(flags_given.pop("seed", settings_type.seed), flags_given.pop("seeds"))]
        flags_given = {k: v for k, v in flags_given.items() if k not in {sweep.key for sweep in sweeps}}
        recipe = choose_recipe(recipes, flags_given.get("recipe", default_recipe))
        settings = resolve_settings(flags_given, recipe, settings_type)
        rank, world, local_rank = init_distributed()
        device = resolve_device(settings.device, local_rank)
        ctx = TrainContext(device, resolve_precision(settings.precision, device), rank, world)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if settings.export:
            return export_model(script, task_checkpoint(flags_given, out_dir), Path(settings.export), settings.quantize,
                                settings.data_dir, not settings.no_download, build_model) if ctx.is_main else 0
        if settings.predict:
            checkpoint, reports = checkpoint_and_reports(flags_given, out_dir, "predict")
            return predict_images(script, settings.predict, settings.tta, build_model, ctx, checkpoint,
                                  reports) if ctx.is_main else 0
        if settings.eval_only:
            checkpoint, reports = checkpoint_and_reports(flags_given, out_dir, "eval")
            if ctx.is_main:  # under torchrun rank 0 alone evaluates, prints and writes
                eval_only(script, checkpoint, reports, settings.data_dir, not settings.no_download, settings.tta,
                          build_model, ctx)
        elif sweeps:
            check_settings(settings)
            for sweep in sweeps:  # every value, before the first run starts
                for value in sweep.values:
                    check_settings(dataclasses.replace(settings, **sweep.changes, **{sweep.key: value}))
            run_sweeps(sweeps, script, settings, flags_given, build_model, out_dir, ctx)
        else:
            start_or_resume(script, settings, flags_given, build_model, out_dir, ctx)
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        kept = "; best.pt and last.pt keep the last good epochs" if (out_dir / "last.pt").exists() else ""
        print(f"error: {e}; stopped{kept}", file=sys.stderr)
        return 3
    except SaveError as e:
        print(f"error: could not write {e.filename}: {e.strerror}", file=sys.stderr)
        return 4
    except KeyboardInterrupt as e:
        print(f"\ninterrupted. {str(e) or interrupted_outside_training(flags_given, bool(sweeps), out_dir)}", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
