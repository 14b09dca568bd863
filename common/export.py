"""--export: a trained network as an ONNX picture classifier, quantised to int8 if asked, run by ONNX Runtime.

Imports common.errors, common.files, common.evaluation."""
from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .errors import UsageError
from .files import atomic_write
from .evaluation import EVAL_BATCH


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
    its activation ranges calibrated on the uint8 images (N, 32, 32, 3) `calibration`; the final Softmax stays in fp32,
    so that the probabilities sum to 1 (quantised, they come in steps of 1/255)."""
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
            quantization.quantize_static(str(prepared), str(out), Calibration(), quant_format=quantization.QuantFormat.QDQ,
                                         per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                         weight_type=quantization.QuantType.QInt8,
                                         nodes_to_exclude=softmax)  # probabilities in fp32, summing to 1
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
