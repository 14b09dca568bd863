"""--export: the ONNX model of the session's run (conftest.ex1_run) against PyTorch (classes, probabilities, uint8
NHWC input with a dynamic batch, metadata), the int8 model, the check without a test set, and the refusals."""
import builtins
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call, CLASS_NAMES, error_line, in_process, metrics, ROOT
from PIL import Image

import common
import ex1_convnet

onnx = pytest.importorskip("onnx", reason="the optional export packages are not installed (make test installs them)")
ort = pytest.importorskip("onnxruntime", reason="the optional export packages are not installed")

CPU = ["--no-download", "--device", "cpu", "--precision", "fp32"]


def export(*argv) -> str:
    """ex1_convnet.py with these flags, in-process; exit code 0; its stdout."""
    code, out = in_process(ex1_convnet.main, *argv, *CPU)
    assert code == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def exported(ex1_run, cifar_dir, tmp_path_factory) -> dict:
    """The session's run exported in fp32 and in int8: the folders and the exports' stdout."""
    base = tmp_path_factory.mktemp("export")
    fp32 = export("--export", base / "model.onnx", "--out-dir", ex1_run, "--data-dir", cifar_dir)
    int8 = export("--export", base / "model-int8.onnx", "--quantize", "int8", "--out-dir", ex1_run, "--data-dir",
                  cifar_dir)
    return {"run": ex1_run, "fp32": base / "model.onnx", "int8": base / "model-int8.onnx", "fp32_out": fp32,
            "int8_out": int8}


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def pytorch_probabilities(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    ctx = common.device.TrainContext(torch.device("cpu"), torch.float32)
    checkpoint, model = common.tasks.open_checkpoint("ex1_convnet.py", run_dir / "best.pt",
                                                     ex1_convnet.build_model, ctx)
    return common.evaluation.predict(model, images, checkpoint["settings"]["mean"], checkpoint["settings"]["std"],
                                     ctx).softmax(1)


@pytest.mark.slow
def test_the_fp32_model_takes_uint8_pictures_in_any_batch_and_gives_pytorchs_classes_and_probabilities(exported,
                                                                                                       cifar_dir):
    model = session(exported["fp32"])
    (images,), (probabilities,) = model.get_inputs(), model.get_outputs()
    assert (images.name, images.type, images.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert isinstance(images.shape[0], str) and probabilities.name == "probabilities"  # a named, dynamic batch
    data = common.data.load_cifar10(cifar_dir, download=False)
    expected = pytorch_probabilities(exported["run"], data.test_images)
    pictures = data.test_images.permute(0, 2, 3, 1).numpy()  # what a decoder gives: (N, 32, 32, 3) uint8 RGB
    got = torch.from_numpy(np.concatenate([model.run(["probabilities"], {"images": pictures[:1]})[0],
                                           model.run(["probabilities"], {"images": pictures[1:]})[0]]))
    assert got.shape == expected.shape and torch.equal(got.argmax(1), expected.argmax(1))
    assert (got - expected).abs().max().item() < 1e-4
    accuracy = (expected.argmax(1) == data.test_labels).float().mean().item()
    assert accuracy > 0.5  # a trained model, so that agreeing means something
    n = len(data.test_images)
    assert f"check on the {n} test images: ONNX Runtime (fp32) {accuracy:.2%}, PyTorch {accuracy:.2%}; " \
           f"the same class for {n}/{n} (100.00%)" in exported["fp32_out"]


@pytest.mark.slow
def test_the_int8_model_is_smaller_runs_and_says_its_accuracy_and_the_metadata_names_the_checkpoint(exported,
                                                                                                       cifar_dir):
    assert exported["int8"].stat().st_size < exported["fp32"].stat().st_size / 2
    data = common.data.load_cifar10(cifar_dir, download=False)
    out = session(exported["int8"]).run(None, {"images": data.test_images.permute(0, 2, 3, 1).numpy()})[0]
    assert out.shape == (len(data.test_images), 10)
    assert np.abs(out.sum(1) - 1).max() < 1e-5  # the Softmax stays in fp32: a quantised one sums to 1 only within 2%
    assert "the probabilities of a picture sum to 1 within" in exported["int8_out"]
    accuracy = (torch.from_numpy(out).argmax(1) == data.test_labels).float().mean().item()
    assert f"ONNX Runtime (int8) {accuracy:.2%}" in exported["int8_out"] \
        and "int8 against PyTorch:" in exported["int8_out"]
    props = {p.key: p.value for p in onnx.load(str(exported["int8"])).metadata_props}
    assert json.loads(props["classes"]) == CLASS_NAMES
    # the fixture's 320, not test images
    assert props["quantization"] == "int8 static, calibrated on 320 training images"
    # the fp32 model's metadata names the classes, the script and the checkpoint
    props = {p.key: p.value for p in onnx.load(str(exported["fp32"])).metadata_props}
    assert json.loads(props["classes"]) == CLASS_NAMES
    assert props["script"] == "ex1_convnet.py"
    best = common.files.load_checkpoint(exported["run"] / "best.pt", "ex1_convnet.py")
    assert props["checkpoint_epoch"] == str(best["epoch"])
    assert props["test_accuracy"] == str(metrics(exported["run"])["test_accuracy"])
    assert props["git_commit"] == str(metrics(exported["run"])["git_commit"])


@pytest.mark.slow
def test_the_docs_example_classifies_a_picture_without_torch(exported, cifar_dir, tmp_path):
    page = (ROOT / "docs" / "export.md").read_text()
    example = page.split("Classifying a picture with the exported model needs only")[1]
    example = example.split("```python\n", 1)[1].split("```", 1)[0]
    data = common.data.load_cifar10(cifar_dir, download=False)
    picture = tmp_path / "picture.png"
    Image.fromarray(common.tasks.nhwc(data.test_images[:1])[0].numpy()).save(picture)
    code = example.replace("runs/ex1/model.onnx", str(exported["fp32"])).replace("cat.jpg", str(picture))
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None  # no torch\n" + code],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = pytorch_probabilities(exported["run"], data.test_images[:1])[0]
    assert result.stdout.strip() == f"{CLASS_NAMES[expected.argmax()]} {expected.max().item():.1%}"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.slow
def test_without_a_test_set_it_checks_one_random_batch_and_bad_exports_leave_nothing_behind(ex1_run, ex2_checkpoint,
                                                                                             tmp_path, capsys):
    """Bad: an output folder it cannot make, and a checkpoint not of this script (the other refusals of a checkpoint
    are --eval-only's, tests/test_robustness.py: the same function reads it)."""
    code, out, err = call(ex1_convnet.main, ["--export", tmp_path / "model.onnx", "--checkpoint", ex1_run / "best.pt",
                                             "--data-dir", tmp_path / "no-data", *CPU], capsys)
    assert code == 0, err[-3000:]
    assert "check on one random batch of 16 images: the same class for 16/16" in out
    assert "the accuracy check was skipped (no test set at hand)" in out
    assert (tmp_path / "model.onnx").stat().st_size > 1e6
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    out = tmp_path / "out"
    cases = [(["--export", a_file / "model.onnx", "--checkpoint", ex1_run / "best.pt"],
              "cannot write to output folder"),
             (["--export", out / "model.onnx", "--checkpoint", ex2_checkpoint], "a checkpoint of ex2_transfer.py")]
    for flags, words in cases:
        code, _, err = call(ex1_convnet.main, [*CPU, "--data-dir", tmp_path / "no-data", *flags], capsys)
        assert code == 2 and words in error_line(err), (flags, err[-2000:])
        assert "Traceback" not in err
    assert leftovers(out) == [] and leftovers(tmp_path) == ["a-file", "model.onnx"]


def test_a_missing_export_package_names_the_pip_command_and_quantize_needs_export(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    code, _, err = call(ex1_convnet.main, [*CPU, "--export", tmp_path / "m.onnx", "--checkpoint", tmp_path / "x.pt"],
                        capsys)
    assert code == 2
    assert "onnxruntime is missing" in error_line(err) and "pip install onnx onnxscript onnxruntime" in error_line(err)
    assert leftovers(tmp_path) == []
    code, _, err = call(ex1_convnet.main, [*CPU, "--quantize", "int8", "--out-dir", tmp_path / "run"], capsys)
    assert code == 2 and "--quantize int8 goes with --export" in error_line(err)
