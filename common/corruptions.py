"""A corruption benchmark in the spirit of CIFAR-10-C: the table of corruptions and their severities (CORRUPTIONS),
one function per corruption (any strength), `corrupt` (one corruption at one of the table's severities) and
`corruption_accuracies` (a classifier's accuracy on clean and on every corrupted copy of the same images).

Images are uint8 tensors (N, 3, H, W), RGB. Every corruption is computed on the CPU, so that its result does not
depend on the device the images came from; the only random one, gaussian_noise, draws from a CPU generator.
torchvision's transforms.v2.functional does blur, contrast, brightness, padding and resizing; Pillow does JPEG.

Imports no other module of common."""
from __future__ import annotations

import io
import math
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

# name -> severities, mild to strong: the value each corruption's function takes as its strength.
CORRUPTIONS: Mapping[str, tuple] = MappingProxyType({
    "gaussian_noise": (2, 4, 8),     # sigma of the added noise, in 0-255 pixel units
    "jpeg": (90, 75, 50),            # JPEG quality (a copy of CIFAR-10 saved at 75 barely changes at 75)
    "gaussian_blur": (0.5, 1.0),     # sigma in pixels; kernel 2 * ceil(3 sigma) + 1 wide, reflected border
    "contrast": (0.6, 0.3),          # factor that pulls each pixel towards the image's mean grey (1 = unchanged)
    "brightness": (1.3, 1.6),        # factor multiplying every pixel, brighter; highlights clip at 255
    "darkness": (0.7, 0.5),          # the same factor below 1: a darker, underexposed image
    "shift": (1, 2),                 # pixels the image moves right and down; the gap filled by reflection
    "downscale": (24, 16),           # side the image is shrunk to (antialiased) before its return to full size
})


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8, rounded to the nearest level (torchvision's colour ops truncate)."""
    return (images * 255).round_().clamp_(0, 255).to(torch.uint8)


def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Add normal noise of standard deviation `sigma` (0-255 units), drawn image after image from a CPU `generator`:
    the first k images get the same noise whatever the batch's length. (One draw for the whole batch would not
    ensure it: torch's CPU randn makes its values 16 at a time and redraws a last incomplete 16.)"""
    noise = torch.empty(images.shape)
    for i in range(len(images)):
        noise[i] = torch.randn(images.shape[1:], generator=generator)
    return (images.float() + noise.to(images.device) * sigma).round_().clamp_(0, 255).to(torch.uint8)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode each image as JPEG at `quality` (1-100), by Pillow: the same pixels as torchvision's
    v2.functional.jpeg, whose JPEG encoder and decoder torchvision 0.29 deprecates (a warning at every call)."""
    decoded = []
    for image in images.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous().to(images.device)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return images.clone()
    size = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(images, [size, size], [float(sigma), float(sigma)])


def contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend each image with its mean grey level: factor 1 leaves it, 0 makes it uniformly grey."""
    return _to_uint8(TF.adjust_contrast(_to_float(images), factor))


def brightness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply every pixel by `factor`, clipped at 255."""
    return _to_uint8(TF.adjust_brightness(_to_float(images), factor))


def shift(images: torch.Tensor, pixels: int, padding: str = "reflect") -> torch.Tensor:
    """Move the image `pixels` to the right and down, the uncovered border filled by `padding`
    ("reflect", "edge" or "constant" for zeros)."""
    if pixels < 0:
        raise ValueError(f"shift takes a number of pixels >= 0, got {pixels}")
    h, w = images.shape[-2:]
    return TF.pad(images, [pixels, pixels, 0, 0], padding_mode=padding)[..., :h, :w]


def downscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to size x size (bilinear, antialiased) and back to the original size (bilinear)."""
    h, w = images.shape[-2:]
    small = TF.resize(_to_float(images), [size, size], antialias=True)
    return _to_uint8(TF.resize(small, [h, w], antialias=True))


_FUNCTIONS = MappingProxyType({"jpeg": jpeg, "gaussian_blur": gaussian_blur, "contrast": contrast,
                               "brightness": brightness, "darkness": brightness, "shift": shift,
                               "downscale": downscale})  # all but gaussian_noise, which takes a generator


def _apply(images: torch.Tensor, name: str, strength, seed: int) -> torch.Tensor:
    """Corruption `name` at any strength, computed on the CPU and returned on the images' device."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: choose from {', '.join(CORRUPTIONS)}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    x = images.cpu()
    if name == "gaussian_noise":
        out = gaussian_noise(x, strength, torch.Generator().manual_seed(seed))
    else:
        out = _FUNCTIONS[name](x, strength)
    return out.to(images.device)


def corrupt(images: torch.Tensor, name: str, severity, seed: int) -> torch.Tensor:
    """`images` under corruption `name` at `severity`, one of CORRUPTIONS[name]: uint8, same shape and device. The
    same (images, name, severity, seed) give the same result on any device, and a prefix of the images the same
    prefix of the result."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: choose from {', '.join(CORRUPTIONS)}")
    severities = CORRUPTIONS[name]
    if severity not in severities:
        raise ValueError(f"{name} has no severity {severity!r}: choose from {severities}")
    return _apply(images, name, severities[severities.index(severity)], seed)  # the table's 90, not a 90.0


def _correct(classify: Callable, images: torch.Tensor, labels: torch.Tensor) -> int:
    """How many of `images` classify names as their label."""
    predictions = torch.as_tensor(classify(images)).cpu()
    if predictions.shape != labels.shape:
        raise ValueError(f"classify returned shape {tuple(predictions.shape)} for {len(images)} images")
    return int((predictions == labels).sum())


def corruption_accuracies(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                          labels: torch.Tensor, seed: int = 0,
                          corruptions: Mapping[str, tuple] = CORRUPTIONS) -> dict:
    """Accuracy of `classify` (uint8 batch (N, 3, H, W) -> predicted classes (N,)) on the clean images and on each
    corruption and severity of the same images, as a JSON-ready record:

    {"images": N, "seed": seed, "clean_accuracy": a,
     "results": [{"corruption": name, "severity": value, "level": 1.., "accuracy": x, "drop": a - x}, ...],
     "mean_accuracy": mean of the results' accuracies, "mean_drop": a - mean_accuracy,
     "worst": the result with the largest drop (the first of equals)}.

    `corruptions` may name fewer corruptions than CORRUPTIONS, or other strengths. Accuracies are fractions, each
    drop computed from counts on the same images, so that it is exact.
    """
    labels = torch.as_tensor(labels).cpu()
    n = len(images)
    if n == 0 or labels.shape != (n,):
        raise ValueError(f"need one label per image and at least one image: {n} images, labels {tuple(labels.shape)}")
    clean = _correct(classify, images, labels)
    results, counts = [], []
    for name, severities in corruptions.items():
        for level, severity in enumerate(severities, 1):
            correct = _correct(classify, _apply(images, name, severity, seed), labels)
            results.append({"corruption": name, "severity": severity, "level": level, "accuracy": correct / n,
                            "drop": (clean - correct) / n})
            counts.append(correct)
    if not results:
        raise ValueError("no corruption to measure")
    total = n * len(results)
    return {"images": n, "seed": seed, "clean_accuracy": clean / n, "results": results,
            "mean_accuracy": sum(counts) / total, "mean_drop": (clean * len(results) - sum(counts)) / total,
            "worst": dict(results[counts.index(min(counts))])}
