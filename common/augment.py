"""Batched random augmentation on the training device (flip, crop, rotate, colour jitter, greyscale) and the
normalisation every input gets.

Imports no other module of common."""
from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


AUGMENT_OPS = ("flip", "crop", "rotate", "jitter", "gray")
FILLS = ("zeros", "reflect")  # what crop and rotate put where they uncover the border
# op: its strength's setting
STRENGTH_KEYS = {"crop": "crop_pad", "rotate": "rotate_deg", "jitter": "jitter", "gray": "gray_p"}


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def flip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The images whose entry of `mask` (one bool per image) is True mirrored left-right, the others as they are."""
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def batch_flip_lr(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    return flip_where(images, torch.rand(len(images), generator=generator, device=generator.device) < p)


def batch_crop(images: torch.Tensor, pad: int, generator: torch.Generator, fill: str = "zeros") -> torch.Tensor:
    """Pad by `pad` (`fill` "zeros", or "reflect": the border mirrored) and cut a window of the original size at a
    random offset per image."""
    n, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad), mode="constant" if fill == "zeros" else "reflect").flatten(2)
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=generator.device).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=generator.device).to(dev)
    index = (dy + torch.arange(h, device=dev)[:, None]) * (w + 2 * pad) + dx + torch.arange(w, device=dev)
    return padded.gather(2, index.flatten(1)[:, None].expand(n, c, h * w)).view(n, c, h, w)


def batch_rotate(images: torch.Tensor, max_degrees: float, generator: torch.Generator,
                 flip_p: float = 0.0, pad: int = 0, fill: str = "zeros") -> torch.Tensor:
    """Rotate each image about its centre by a random angle in [-max_degrees, max_degrees], the corners it uncovers
    filled by `fill` ("zeros", or "reflect": the image mirrored at its edge; unlike batch_crop's, this mirror
    repeats the edge pixels once).

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
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros" if fill == "zeros" else "reflection",
                         align_corners=False)


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


def augment_batch(images: torch.Tensor, ops: dict[str, float], generator: torch.Generator, fill: str = "zeros"
                  ) -> torch.Tensor:
    """uint8 images -> float images in [0, 1], augmented with `ops` (see augmentation); `fill` what crop and rotate
    put where they uncover the border (see batch_crop)."""
    x = images.float().div_(255)
    flip_p, pad = ops.get("flip", 0.0), int(ops.get("crop", 0))
    if "rotate" in ops:
        x = batch_rotate(x, ops["rotate"], generator, flip_p, pad, fill)
    else:
        if flip_p:
            x = batch_flip_lr(x, flip_p, generator)
        if pad:
            x = batch_crop(x, pad, generator, fill)
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
