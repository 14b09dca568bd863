"""Evaluation: a model's predictions (with test-time augmentation), loss and accuracy, per class and confusion; the
corruption benchmark (in the spirit of CIFAR-10-C) on uint8 images (N, 3, H, W), computed on the CPU (gaussian_noise
from a CPU generator) so that its result does not depend on the device; the test report and metrics.json."""
from __future__ import annotations

import io
import math
import time
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from .data import CifarData, normalize, Splits
from .device import autocast, share_from_rank0, TrainContext
from .files import save_json
from .plots import plot_confusion, plot_corruption_examples, plot_corruptions, plot_misclassified, plot_per_class

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
# name -> the format of its strength on a label, with the unit.
STRENGTHS = MappingProxyType({"gaussian_noise": "σ {:g}/255", "jpeg": "quality {:g}", "gaussian_blur": "σ {:g} px",
                              "contrast": "×{:g}", "brightness": "×{:g}", "darkness": "×{:g}", "shift": "{:g} px",
                              "downscale": "{0:g}×{0:g} px"})


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8, rounded to the nearest level (torchvision's colour ops truncate)."""
    return (images * 255).round_().clamp_(0, 255).to(torch.uint8)


def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Add normal noise of std `sigma` (0-255 units), drawn image after image from a CPU `generator`, so that the first
    k images get the same noise whatever the batch's length (torch's CPU randn redraws a last incomplete 16)."""
    noise = torch.empty(images.shape)
    for i in range(len(images)):
        noise[i] = torch.randn(images.shape[1:], generator=generator)
    return (images.float() + noise.to(images.device) * sigma).round_().clamp_(0, 255).to(torch.uint8)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image encoded and decoded as JPEG at `quality` (1-100) by Pillow (torchvision 0.29 deprecates its own)."""
    decoded = []
    for image in images.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous().to(images.device)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    size = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(images, [size, size], [float(sigma), float(sigma)])


def contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend each image with its mean grey level: factor 1 leaves it, 0 makes it uniformly grey."""
    return _to_uint8(TF.adjust_contrast(images.float() / 255, factor))


def brightness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply every pixel by `factor`, clipped at 255."""
    return _to_uint8(TF.adjust_brightness(images.float() / 255, factor))


def shift(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """Move the image `pixels` to the right and down, the uncovered border filled by reflection."""
    h, w = images.shape[-2:]
    return TF.pad(images, [pixels, pixels, 0, 0], padding_mode="reflect")[..., :h, :w]


def downscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to size x size (bilinear, antialiased) and back to the original size (bilinear)."""
    h, w = images.shape[-2:]
    small = TF.resize(images.float() / 255, [size, size], antialias=True)
    return _to_uint8(TF.resize(small, [h, w], antialias=True))


_FUNCTIONS = MappingProxyType({"jpeg": jpeg, "gaussian_blur": gaussian_blur, "contrast": contrast,
                               "brightness": brightness, "darkness": brightness, "shift": shift,
                               "downscale": downscale})  # all but gaussian_noise, which takes a generator


def corrupt(images: torch.Tensor, name: str, severity, seed: int) -> torch.Tensor:
    """`images` under corruption `name` at `severity` (of CORRUPTIONS[name]): uint8, same shape and device; the same
    result for the same arguments on any device, and for a prefix of the images the same prefix."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: choose from {', '.join(CORRUPTIONS)}")
    if severity not in CORRUPTIONS[name]:
        raise ValueError(f"{name} has no severity {severity!r}: choose from {CORRUPTIONS[name]}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    x = images.cpu()
    if name == "gaussian_noise":
        out = gaussian_noise(x, severity, torch.Generator().manual_seed(seed))
    else:
        out = _FUNCTIONS[name](x, severity)
    return out.to(images.device)


def _correct(classify: Callable, images: torch.Tensor, labels: torch.Tensor) -> int:
    """How many of `images` classify names as their label."""
    predictions = torch.as_tensor(classify(images)).cpu()
    if predictions.shape != labels.shape:
        raise ValueError(f"classify returned shape {tuple(predictions.shape)} for {len(images)} images")
    return int((predictions == labels).sum())


def corruption_accuracies(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                          labels: torch.Tensor, seed: int = 0) -> dict:
    """Accuracy of `classify` (uint8 batch (N, 3, H, W) -> predicted classes (N,)) on the clean images and under each
    corruption and severity, as fractions (drops exact, from counts); "worst": the largest drop (first of equals)."""
    labels = torch.as_tensor(labels).cpu()
    n = len(images)
    if n == 0 or labels.shape != (n,):
        raise ValueError(f"need one label per image and at least one image: {n} images, labels {tuple(labels.shape)}")
    clean = _correct(classify, images, labels)
    results, counts = [], []
    for name, severities in CORRUPTIONS.items():
        for level, severity in enumerate(severities, 1):
            correct = _correct(classify, corrupt(images, name, severity, seed), labels)
            results.append({"corruption": name, "severity": severity, "level": level, "accuracy": correct / n,
                            "drop": (clean - correct) / n})
            counts.append(correct)
    total = n * len(results)
    return {"images": n, "seed": seed, "clean_accuracy": clean / n, "results": results,
            "mean_accuracy": sum(counts) / total, "mean_drop": (clean * len(results) - sum(counts)) / total,
            "worst": dict(results[counts.index(min(counts))])}


EVAL_BATCH = 500  # images a forward pass takes when a model is evaluated
TTA_SHIFT = 2  # pixels of the diagonal translations among the test-time augmentation views


def tta_views(images: torch.Tensor, pixels: int = TTA_SHIFT) -> list[torch.Tensor]:
    """The views --tta averages over, for float images (N, C, H, W) in [0, 1]: the image and its mirror along the
    width, each as it is and translated by (+2, +2) and (-2, -2) pixels with zero fill (as training's padded crop)."""
    h, w = images.shape[-2:]
    views = []
    for image in (images, images.flip(-1)):
        padded = F.pad(image, (pixels,) * 4)
        for shift in (0, pixels, -pixels):  # view[..., y, x] = image[..., y - shift, x - shift]
            views.append(padded[..., pixels - shift:pixels - shift + h, pixels - shift:pixels - shift + w])
    return views


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], ctx: TrainContext,
            tta: bool = False) -> torch.Tensor:
    """Logits (float32, on the device) of uint8 images normalised with `mean` and `std`, in eval mode and large
    batches; with `tta`, the log of the softmax averaged over tta_views (its argmax the averaged prediction)."""
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
    """Loss (plain cross-entropy), accuracy and predictions of `model` on a labelled set (`tta`: averaged views)."""
    logits = predict(model, images, mean, std, ctx, tta)
    labels = labels.to(ctx.device)
    predictions = logits.argmax(1)
    return {"loss": F.cross_entropy(logits, labels).item(),
            "accuracy": (predictions == labels).sum().item() / max(1, len(labels)), "predictions": predictions.cpu()}


def validate(model: nn.Module, splits: Splits, mean: list[float], std: list[float], ctx: TrainContext
             ) -> tuple[float, float]:
    """(loss, accuracy) on the validation images: the main process's, shared with the others as Python numbers."""
    result = evaluate(model, splits.val_images, splits.val_labels, mean, std, ctx) if ctx.is_main else {}
    return share_from_rank0((result.get("loss"), result.get("accuracy")), ctx)


def per_class_accuracy(labels: torch.Tensor, predictions: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    counts = torch.bincount(labels, minlength=len(classes)).clamp(min=1)
    hits = torch.bincount(labels[predictions == labels], minlength=len(classes))
    return {name: hits[i].item() / counts[i].item() for i, name in enumerate(classes)}


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, n_classes: int = 10) -> torch.Tensor:
    """Counts with true classes as rows and predicted classes as columns."""
    return torch.bincount(labels * n_classes + predictions, minlength=n_classes ** 2).reshape(n_classes, n_classes)


FIRST_TEST_IMAGES = 1000  # the assignment reports the accuracy on the first 1,000 test images


CORRUPTION_SHARE = 0.1  # by default the corruption benchmark takes at most this share of the training time
CORRUPTION_STEP = 100  # ... on a multiple of this many test images (fewer: not run)
CORRUPTION_PASSES = 1 + sum(len(severities) for severities in CORRUPTIONS.values())  # clean, each corrupted copy


def corruption_images(asked: int | None, train_s: float, test_s: float, test_images: int) -> int:
    """How many of the first test images the corruption benchmark takes: `asked` (--corruptions N), else as many of
    1,000 as CORRUPTION_SHARE of `train_s` affords at the test's speed (`test_s` for `test_images`)."""
    if asked is not None:
        return asked
    affordable = int(CORRUPTION_SHARE * train_s / (CORRUPTION_PASSES * test_s / max(1, test_images)))
    count = min(FIRST_TEST_IMAGES, test_images, affordable) // CORRUPTION_STEP * CORRUPTION_STEP
    if count < min(FIRST_TEST_IMAGES, test_images):
        print(f"corruption benchmark: {f'on the first {count} test images' if count else 'not run'}, to take at most "
              f"a tenth of the {train_s:.0f} s of training (--corruptions N sets the number of images)")
    return count


def test_results(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], ctx: TrainContext, tta: bool = False,
                 corruptions: int | None = 0, train_s: float = 0.0) -> tuple[dict, torch.Tensor]:
    """(the test figures as metrics.json names them, the predictions), with the corruption benchmark on `corruptions`
    of the first test images (None: see corruption_images)."""
    start = time.perf_counter()
    result = evaluate(model, images, labels, mean, std, ctx)
    corrupted = corruption_images(corruptions, train_s, time.perf_counter() - start, len(labels))
    first = min(FIRST_TEST_IMAGES, len(labels))

    def accuracy_of_first(predicted: torch.Tensor) -> float:
        return (predicted[:first] == labels[:first]).sum().item() / max(1, first)

    predictions = result["predictions"]
    figures = {"test_accuracy": result["accuracy"], "test_loss": result["loss"],
               "test_accuracy_first1000": accuracy_of_first(predictions), "test_images": len(labels),
               "per_class_accuracy": per_class_accuracy(labels, predictions, classes),
               "confusion_matrix": confusion_matrix(labels, predictions, len(classes)).tolist()}
    if tta:
        tta_result = evaluate(model, images, labels, mean, std, ctx, tta=True)
        figures.update(test_accuracy_tta=tta_result["accuracy"],
                       test_accuracy_first1000_tta=accuracy_of_first(tta_result["predictions"]))
    if corrupted:
        start = time.perf_counter()
        record = corruption_accuracies(lambda x: predict(model, x, mean, std, ctx).argmax(1).cpu(), images[:corrupted],
                                       labels[:corrupted])
        print(f"corruption benchmark: {len(record['results'])} corrupted copies of {record['images']} test images in "
              f"{time.perf_counter() - start:.0f} s")
        figures["corruptions"] = record
    return figures, predictions


def corruption_examples(image: torch.Tensor, seed: int) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """One uint8 image (3, H, W) under every corruption: per corruption, the clean image and each strength, labelled."""
    return [(name, [("clean", image)] + [(STRENGTHS[name].format(s), corrupt(image[None], name, s, seed)[0])
                                        for s in severities]) for name, severities in CORRUPTIONS.items()]


def print_corruptions(record: dict) -> None:
    """The corruption benchmark as a table: a row per corruption, its accuracy and drop at each severity."""
    print(f"\ncorruption benchmark, first {record['images']} test images: clean {record['clean_accuracy']:.2%}")
    for name in dict.fromkeys(r["corruption"] for r in record["results"]):
        cells = [f"{r['severity']:>5g}: {r['accuracy']:7.2%} ({points(-r['drop'], '+')})"
                 for r in record["results"] if r["corruption"] == name]
        print(f"  {name:<15}" + "   ".join(cells))
    worst = record["worst"]
    print(f"  mean corruption accuracy {record['mean_accuracy']:.2%} (drop {points(record['mean_drop'])} points); "
          f"worst {worst['corruption']} {worst['severity']:g} (drop {points(worst['drop'])})")


def points(fraction: float, sign: str = "") -> str:
    """A fraction as percentage points to one decimal, never '-0.0'."""
    return f"{round(fraction * 100, 1) + 0.0:{sign}.1f}"


def write_report(figures: dict, predictions: torch.Tensor, data: CifarData, model: nn.Module, device: torch.device,
                 settings: dict, environment: dict, out_dir: Path, **run) -> dict:
    """A model's test report in `out_dir`: figures, tables and metrics.json (the test figures, what `run` adds:
    training's, or the checkpoint an evaluation read; the network's size, device, classes, settings, environment)."""
    per_class, accuracy = figures["per_class_accuracy"], figures["test_accuracy"]
    corruptions = figures.get("corruptions")
    plot_per_class(per_class, out_dir / "per_class.png",
                   f"Accuracy per class on the {len(predictions):,} test images ({accuracy:.2%} overall)")
    plot_confusion(torch.tensor(figures["confusion_matrix"]), data.classes, out_dir / "confusion.png")
    plot_misclassified(data.test_images, data.test_labels, predictions, data.classes, out_dir / "misclassified.png")
    first = min(FIRST_TEST_IMAGES, len(predictions))
    print(f"\n{'class':<12}{'accuracy':>9}")
    for name, acc in per_class.items():
        print(f"{name:<12}{acc:>9.2%}")
    print(f"{'all':<12}{accuracy:>9.2%}   ({len(predictions)} test images; first {first}: "
          f"{figures['test_accuracy_first1000']:.2%})")
    if "test_accuracy_tta" in figures:
        print(f"{'all, --tta':<12}{figures['test_accuracy_tta']:>9.2%}   (test-time augmentation; first {first}: "
              f"{figures['test_accuracy_first1000_tta']:.2%})")
    if corruptions is not None:
        plot_corruptions(corruptions, out_dir / "corruptions.png", STRENGTHS)
        rows = corruption_examples(data.test_images[0], corruptions["seed"])
        plot_corruption_examples(rows, out_dir / "corruption_examples.png", "First test image under each corruption")
        print_corruptions(corruptions)
    metrics = {**figures, **run, "params": sum(p.numel() for p in model.parameters()), "device": str(device),
               "classes": list(data.classes), "settings": settings, **environment}
    save_json(metrics, out_dir / "metrics.json")
    return metrics


class Estimate(NamedTuple):
    """What the line that says how long a run takes counts besides the speed (see how_long)."""
    steps_left: int
    val_images: int
    test_images: int
    corruptions: int | None


def duration(seconds: float) -> str:
    """'3 h 05 min', '12 min', '40 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def how_long(plan, estimate: Estimate, images_per_s: float) -> str:
    """The line that says how long a run takes at `images_per_s` under its `plan`: steps left, validation, the test
    and corruption benchmark (a forward pass: about a third of a step); over an hour, it names --time-budget."""
    step_s = plan.batch_size / images_per_s
    forward_s = step_s / plan.batch_size / 3  # an image's
    train_s = estimate.steps_left * step_s
    val_s = -(-estimate.steps_left // plan.steps_per_epoch) * estimate.val_images * forward_s
    test_images, corruptions = estimate.test_images, estimate.corruptions
    corrupted = min(FIRST_TEST_IMAGES, test_images) if corruptions is None else min(corruptions, test_images)
    corruption_s = CORRUPTION_PASSES * corrupted * forward_s
    test_s = test_images * forward_s + (min(corruption_s, CORRUPTION_SHARE * train_s) if corruptions is None
                                        else corruption_s)
    total = train_s + val_s + test_s
    return (f"how long: about {duration(total)} at {images_per_s:.0f} images/s (training {duration(train_s)}, "
            f"validation {duration(val_s)}, test and corruption benchmark {duration(test_s)})"
            + ("; --time-budget MINUTES chooses how long instead" if total > 3600 else ""))
