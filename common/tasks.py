"""The tasks on a checkpoint: --eval-only, --export and --predict.

Imports common.errors, common.files, common.data, common.device, common.evaluation, common.plots, common.report,
common.export, common.settings, common.run."""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from .errors import UnreadableImage, UsageError
from .files import load_checkpoint, prepare_out_dir
from .data import CLASSES, image_files, load_cifar10, load_image
from .device import TrainContext
from .evaluation import FIRST_TEST_IMAGES, predict, test_results
from .plots import plot_image_grid
from .report import environment_info, print_predictions, save_predictions, write_report
from .export import (
    CALIBRATION_IMAGES, export_onnx, export_packages, nhwc, onnx_probabilities, PicturesToProbabilities, quantize_int8)
from .settings import recorded_settings
from .run import ModelBuilder


def model_from_checkpoint(checkpoint: dict, build_model: ModelBuilder, ctx: TrainContext) -> nn.Module:
    """The network a checkpoint holds, rebuilt from its settings and weights, on the device."""
    model = build_model(checkpoint["settings"], initial_weights=False)
    model.load_state_dict(checkpoint["model"])
    return model.to(ctx.device, memory_format=torch.channels_last)


class OpenedCheckpoint(NamedTuple):
    """A checkpoint opened for a task: what the file holds, the settings its run saved, its classes, its network."""
    checkpoint: dict
    settings: dict
    classes: list[str]
    model: nn.Module


def open_checkpoint(script: str, checkpoint_path: Path, out_dir: Path, build_model: ModelBuilder, ctx: TrainContext
                    ) -> OpenedCheckpoint:
    """Load a checkpoint of `script`, make the folder the task writes into, and rebuild the network on the device."""
    checkpoint = load_checkpoint(checkpoint_path, script)
    prepare_out_dir(out_dir)
    return OpenedCheckpoint(checkpoint, checkpoint["settings"], list(checkpoint.get("classes", CLASSES)),
                            model_from_checkpoint(checkpoint, build_model, ctx))


def eval_only(script: str, checkpoint_path: Path, out_dir: Path, data_dir: str, download: bool, tta: bool,
              corruption_images: int | None, build_model: ModelBuilder, ctx: TrainContext) -> dict:
    """Rebuild the model of a checkpoint, evaluate it on the test set in `data_dir` (the corruption benchmark on
    `corruption_images` of the first test images, by default the first 1,000), write metrics.json and the test
    figures in `out_dir`."""
    checkpoint, saved, _, model = open_checkpoint(script, checkpoint_path, out_dir, build_model, ctx)
    data = load_cifar10(data_dir, download=download)
    print(f"evaluating {checkpoint_path} (epoch {checkpoint['epoch']}) on {ctx.device}")
    results = test_results(model, data.test_images, data.test_labels, data.classes, saved["mean"], saved["std"], ctx, tta,
                           FIRST_TEST_IMAGES if corruption_images is None else corruption_images)
    metrics = write_report(results, data, model, ctx.device, recorded_settings(saved), environment_info(ctx.device),
                           out_dir, checkpoint=str(checkpoint_path), epoch=checkpoint["epoch"],
                           best_epoch=checkpoint["best_epoch"], best_val_accuracy=checkpoint["best_val_accuracy"])
    print(f"reports in {out_dir}")
    return metrics


PROBABILITY_SUM_TOLERANCE = 1e-4  # an exported model whose probabilities sum further from 1 is refused


def export_model(script: str, checkpoint_path: Path, path: Path, quantize: str | None, data_dir: str, download: bool,
                 build_model: ModelBuilder) -> int:
    """--export: write the checkpoint's network as an ONNX picture classifier at `path` (int8 with `quantize`), then
    check it: ONNX Runtime against PyTorch on the test set, or on one random batch where no test set is at hand.
    Returns the exit code: 1 when an fp32 export gives other classes than PyTorch, or any export probabilities that do
    not sum to 1 (the file is then removed), else 0."""
    export_packages()
    cpu = TrainContext(torch.device("cpu"), torch.float32)
    checkpoint, saved, classes, model = open_checkpoint(script, checkpoint_path, path.parent, build_model, cpu)
    model.eval()
    try:
        data = load_cifar10(data_dir, download=download)
    except UsageError as e:
        if quantize:
            raise UsageError(f"--quantize int8 calibrates on training images, and there are none at hand: {e}") from None
        data = None
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
    return check_export(model, path, saved["mean"], saved["std"], data, quantize is not None, cpu)


def check_export(model: nn.Module, path: Path, mean: list, std: list, data, quantized: bool, cpu: TrainContext) -> int:
    """The exported model at `path` against PyTorch's `model`: on the test set of `data`, or on one random batch
    without it. Returns 1 (the file removed) when an fp32 export gives other classes or any export probabilities
    that do not sum to 1, else 0."""
    if data is None:
        images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        labels = None
    else:
        images, labels = data.test_images, data.test_labels
    expected = predict(model, images, mean, std, cpu).softmax(1)
    got = onnx_probabilities(path, nhwc(images))
    same = (expected.argmax(1) == got.argmax(1)).sum().item()
    largest = (expected - got).abs().max().item() if len(images) else 0.0
    off_one = (got.sum(1) - 1).abs().max().item() if len(images) else 0.0  # how far a picture's probabilities sum from 1
    if labels is None:
        print(f"check on one random batch of {len(images)} images: the same class for {same}/{len(images)}, largest "
              f"difference in probability {largest:.1e}; the accuracy check was skipped (no test set at hand)")
    else:
        onnx_accuracy = (got.argmax(1) == labels).float().mean().item()
        torch_accuracy = (expected.argmax(1) == labels).float().mean().item()
        print(f"check on the {len(images)} test images: ONNX Runtime ({'int8' if quantized else 'fp32'}) "
              f"{onnx_accuracy:.2%}, PyTorch {torch_accuracy:.2%}; the same class for {same}/{len(images)} "
              f"({same / len(images):.2%}); largest difference in probability {largest:.1e}"
              + (f"; int8 against PyTorch: {(onnx_accuracy - torch_accuracy) * 100:+.2f} points" if quantized else ""))
    print(f"the probabilities of a picture sum to 1 within {off_one:.1e}")
    wrong = [] if quantized or same >= 0.999 * len(images) else \
        [f"gives another class than PyTorch for {len(images) - same} of {len(images)} images"]
    if off_one > PROBABILITY_SUM_TOLERANCE:
        wrong.append(f"gives probabilities that sum to 1 only within {off_one:.1e}")
    if wrong:
        path.unlink()
        print(f"error: the ONNX model {' and '.join(wrong)}; {path} removed", file=sys.stderr)
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
    checkpoint, saved, classes, model = open_checkpoint(script, checkpoint_path, out_dir, build_model, ctx)
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
