"""The tasks on a trained checkpoint: --eval-only, --predict (a table and predictions.json, .csv and .png) and
--export (an ONNX picture classifier, quantised to int8 if asked, checked with ONNX Runtime)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .data import CLASSES, image_files, load_cifar10, load_image
from .device import TrainContext
from .evaluation import EVAL_BATCH, FIRST_TEST_IMAGES, predict, test_results, write_report
from .files import (
    atomic_write,
    environment_info,
    load_checkpoint,
    load_weights,
    prepare_out_dir,
    save_json,
    UnreadableImage,
    UsageError,
)
from .plots import plot_image_grid


def open_checkpoint(script: str, checkpoint_path: Path, build_model, ctx: TrainContext) -> tuple[dict, nn.Module]:
    """(a checkpoint of `script`, its network rebuilt from its settings and weights on the device)."""
    checkpoint = load_checkpoint(checkpoint_path, script)
    model = build_model(checkpoint["settings"], initial_weights=False)
    load_weights(model, checkpoint["model"], checkpoint_path)
    return checkpoint, model.to(ctx.device, memory_format=torch.channels_last)


def eval_only(script: str, checkpoint_path: Path, out_dir: Path, data_dir: str, download: bool, tta: bool,
              corruption_images: int | None, build_model, runtime_keys: set[str], ctx: TrainContext) -> dict:
    """Evaluate a checkpoint's model on the test set in `data_dir` (the corruption benchmark on `corruption_images`
    of the first test images, by default 1,000); its report in `out_dir`, with the settings but `runtime_keys`."""
    checkpoint, model = open_checkpoint(script, checkpoint_path, build_model, ctx)
    prepare_out_dir(out_dir)
    saved = checkpoint["settings"]
    data = load_cifar10(data_dir, download=download)
    print(f"evaluating {checkpoint_path} (epoch {checkpoint['epoch']}) on {ctx.device}")
    figures, predictions = test_results(model, data.test_images, data.test_labels, data.classes, saved["mean"],
                                        saved["std"], ctx, tta,
                                        FIRST_TEST_IMAGES if corruption_images is None else corruption_images)
    recorded = {k: v for k, v in saved.items() if k not in runtime_keys}
    metrics = write_report(figures, predictions, data, model, ctx.device, recorded, environment_info(ctx.device),
                           out_dir, checkpoint=str(checkpoint_path), epoch=checkpoint["epoch"],
                           best_epoch=checkpoint["best_epoch"], best_val_accuracy=checkpoint["best_val_accuracy"])
    print(f"reports in {out_dir}")
    return metrics


PROBABILITY_SUM_TOLERANCE = 1e-4  # an exported model whose probabilities sum further from 1 is refused


def export_model(script: str, checkpoint_path: Path, path: Path, quantize: str | None, data_dir: str, download: bool,
                 build_model) -> int:
    """--export: the checkpoint's network as an ONNX classifier at `path` (int8 with `quantize`), then checked."""
    export_packages()  # missing packages are said before any work
    cpu = TrainContext(torch.device("cpu"), torch.float32)
    checkpoint, model = open_checkpoint(script, checkpoint_path, build_model, cpu)
    prepare_out_dir(path.parent)
    saved, classes = checkpoint["settings"], list(checkpoint.get("classes", CLASSES))
    try:
        data = load_cifar10(data_dir, download=download)
    except UsageError as e:
        if quantize:
            raise UsageError(f"--quantize int8 calibrates on training images, and there are none at hand: {e}"
                             ) from None
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
    """The exported model at `path` against PyTorch's `model` on the test set of `data` (else one random batch).
    Returns 1 (the file removed) when an fp32 export gives other classes or probabilities that do not sum to 1."""
    images = data.test_images if data is not None else \
        torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = predict(model, images, mean, std, cpu).softmax(1)
    _, ort = export_packages()  # ONNX Runtime's probabilities
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = [session.run(["probabilities"], {"images": batch.numpy()})[0] for batch in nhwc(images).split(EVAL_BATCH)]
    got = torch.from_numpy(np.concatenate(outputs)) if outputs else torch.zeros(0, 10)
    same = (expected.argmax(1) == got.argmax(1)).sum().item()
    largest = (expected - got).abs().max().item() if len(images) else 0.0
    off_one = (got.sum(1) - 1).abs().max().item() if len(images) else 0.0  # how far probabilities sum from 1
    if data is None:
        print(f"check on one random batch of {len(images)} images: the same class for {same}/{len(images)}, largest "
              f"difference in probability {largest:.1e}; the accuracy check was skipped (no test set at hand)")
    else:
        onnx_accuracy = (got.argmax(1) == data.test_labels).float().mean().item()
        torch_accuracy = (expected.argmax(1) == data.test_labels).float().mean().item()
        print(f"check on the {len(images)} test images: ONNX Runtime ({'int8' if quantized else 'fp32'}) "
              f"{onnx_accuracy:.2%}, PyTorch {torch_accuracy:.2%}; the same class for {same}/{len(images)} "
              f"({same / len(images):.2%}); largest difference in probability {largest:.1e}"
              + (f"; int8 against PyTorch: {round((onnx_accuracy - torch_accuracy) * 100, 2) + 0.0:+.2f} points"
                 if quantized else ""))
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


def predict_images(script: str, paths: Sequence[str], tta: bool, build_model, ctx: TrainContext,
                   checkpoint_path: Path, out_dir: Path) -> int:
    """Predict the class of every image file in `paths` (files and folders) with a checkpoint: print a table, write
    predictions.json, .csv and .png in `out_dir`. Returns the exit code: 1 when a file was skipped as unreadable."""
    files = image_files(paths)  # a missing path or an empty folder is refused before the model loads
    checkpoint, model = open_checkpoint(script, checkpoint_path, build_model, ctx)
    saved, classes = checkpoint["settings"], list(checkpoint.get("classes", CLASSES))
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
        for path, image, p, i in zip(read, images, top_p.tolist(), top_i.tolist(), strict=False):
            top3 = [{"label": classes[c], "probability": round(q, 6)} for c, q in zip(i, p, strict=False)]
            rows.append({"path": str(path), "label": top3[0]["label"], "probability": top3[0]["probability"],
                         "top3": top3})
            if len(previews) < PREVIEW_COUNT:
                previews.append(image)
                titles.append(f"{path.name}\n{top3[0]['label']} {p[0]:.0%}")
    bar.close()
    if not rows:
        print(f"error: none of the {len(files)} file(s) could be read as an image; nothing written to {out_dir}",
              file=sys.stderr)
        return 1
    width = min(60, max([len("file"), *(len(row["path"]) for row in rows)])) + 2  # a line per image
    print(f"{'file':<{width}}{'class':<12}{'prob':>7}   next two")
    for row in rows:
        others = ", ".join(f"{top['label']} {top['probability']:.1%}" for top in row["top3"][1:])
        print(f"{row['path']:<{width}}{row['label']:<12}{row['probability']:>7.1%}   {others}")
    prepare_out_dir(out_dir)
    save_predictions(rows, out_dir)
    shown = f"The first {len(previews)} pictures read" if len(previews) < len(rows) else "Each picture"
    plot_image_grid(previews, titles, out_dir / "predictions.png", f"{shown}: file, predicted class, probability")
    print(f"{len(rows)} predicted, {skipped} skipped; predictions.json, predictions.csv and predictions.png in "
          f"{out_dir}")
    return 1 if skipped else 0


PREDICTION_COLUMNS = ("path", "label", "probability", "top2_label", "top2_probability", "top3_label",
                      "top3_probability")


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
    """Write `classifier` as an ONNX model (any batch size) with `metadata` in its metadata_props, whole or not."""
    onnx, _ = export_packages()
    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        raw = Path(folder) / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            torch.onnx.export(classifier.eval(), (example,), raw, input_names=["images"],
                              output_names=["probabilities"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                              external_data=False, dynamo=True)
        model = onnx.load(str(raw))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


def quantize_int8(fp32_path: Path, path: Path, calibration: torch.Tensor) -> None:
    """Write a statically quantised (int8, QDQ) copy of the ONNX model at `fp32_path`, calibrated on the uint8 images
    (N, 32, 32, 3) `calibration`; the final Softmax stays fp32, so that the probabilities sum to 1."""
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
            softmax = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Softmax"]
            quantization.quantize_static(str(prepared), str(out), Calibration(),
                                         quant_format=quantization.QuantFormat.QDQ,
                                         per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                         weight_type=quantization.QuantType.QInt8,
                                         nodes_to_exclude=softmax)  # probabilities in fp32, summing to 1
        quantized = out.read_bytes()
    model, source = onnx.load_from_string(quantized), onnx.load(str(fp32_path))
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)  # the quantiser keeps none of them
    model.metadata_props.add(key="quantization", value=f"int8 static, calibrated on {len(calibration)} training images")
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


def nhwc(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) as decoded pictures are laid out: (N, H, W, 3)."""
    return images.permute(0, 2, 3, 1).contiguous()
