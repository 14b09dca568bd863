"""A model's predictions (with test-time augmentation), loss and accuracy, and its results on the test set.

Imports common.augment, common.corruptions, common.device."""
from __future__ import annotations

import math
import time
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import normalize
from .corruptions import corruption_accuracies, CORRUPTIONS
from .device import autocast, TrainContext


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


FIRST_TEST_IMAGES = 1000  # the assignment reports the accuracy on the first 1,000 test images


def first_test_images(n: int) -> int:
    """How many of `n` test images the first-1,000 figure counts."""
    return min(FIRST_TEST_IMAGES, n)


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
    corruptions: dict | None = None  # the corruption benchmark's record (see corruption_record), None when not run


def corruption_record(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                      std: Sequence[float], ctx: TrainContext, seed: int = 0) -> dict:
    """The corruption benchmark of `model` on uint8 `images` (see corruption_accuracies): its accuracy on them clean
    and under every corruption and severity of CORRUPTIONS, drawn from `seed`."""
    start = time.perf_counter()
    record = corruption_accuracies(lambda x: predict(model, x, mean, std, ctx).argmax(1).cpu(), images, labels, seed)
    print(f"corruption benchmark: {len(record['results'])} corrupted copies of {len(images)} test images in "
          f"{time.perf_counter() - start:.0f} s")
    return record


CORRUPTION_SHARE = 0.1  # by default the corruption benchmark takes at most this share of the training time
CORRUPTION_STEP = 100  # ... on a multiple of this many test images (fewer: not run)
CORRUPTION_PASSES = 1 + sum(len(severities) for severities in CORRUPTIONS.values())  # clean, each corrupted copy


def corruption_images(asked: int | None, train_s: float, test_s: float, test_images: int) -> int:
    """How many of the first test images the corruption benchmark takes: `asked` (--corruptions N) when given, else
    as many of the first 1,000 as CORRUPTION_SHARE of the `train_s` seconds of training affords, a pass over each
    corrupted copy costing what the test's pass over its `test_images` took (`test_s`); fewer than CORRUPTION_STEP:
    none. Said in one line when not all 1,000."""
    if asked is not None:
        return asked
    affordable = int(CORRUPTION_SHARE * train_s / (CORRUPTION_PASSES * test_s / max(1, test_images)))
    count = min(first_test_images(test_images), affordable) // CORRUPTION_STEP * CORRUPTION_STEP
    if count < first_test_images(test_images):
        print(f"corruption benchmark: {f'the first {count} test images' if count else 'not run'}, as a tenth of the "
              f"{train_s:.0f} s of training affords {affordable}; --corruptions N chooses")
    return count


def test_results(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], ctx: TrainContext, tta: bool = False,
                 corruptions: int | None = 0, train_s: float = 0.0) -> TestResults:
    """Evaluate on the whole test set: accuracies, loss, predictions, per class and confusion (with `tta`, the
    accuracies of test-time augmentation too), and the corruption benchmark on `corruptions` of the first test
    images (None: after `train_s` seconds of training, see corruption_images)."""
    start = time.perf_counter()
    result = evaluate(model, images, labels, mean, std, ctx)
    corrupted = corruption_images(corruptions, train_s, time.perf_counter() - start, len(labels))
    first = first_test_images(len(labels))

    def accuracy_of_first(predicted: torch.Tensor) -> float:
        return (predicted[:first] == labels[:first]).sum().item() / max(1, first)

    predictions = result["predictions"]
    tta_result = evaluate(model, images, labels, mean, std, ctx, tta=True) if tta else None
    return TestResults(result["accuracy"], result["loss"], accuracy_of_first(predictions), predictions,
                       per_class_accuracy(labels, predictions, classes),
                       confusion_matrix(labels, predictions, len(classes)),
                       tta_result and tta_result["accuracy"], tta_result and accuracy_of_first(tta_result["predictions"]),
                       corruption_record(model, images[:corrupted], labels[:corrupted], mean, std, ctx)
                       if corrupted else None)
