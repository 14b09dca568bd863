"""benchmarks/speed.py runs end to end on the fixture data with tiny settings and writes its figures."""
import json

import pytest
from conftest import call, run_script

from benchmarks import speed


@pytest.mark.slow
def test_speed_smoke(cifar_dir, tmp_path):
    out = tmp_path / "speed.json"
    result = run_script("benchmarks/speed.py", "--data-dir", cifar_dir, "--device", "cpu", "--precision", "fp32",
                        "--batch-size", "32", "--images", "200", "--aug-images", "64", "--warmup", "0",
                        "--workers", "1", "--json", out, timeout=120, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    for key in ("model_img_s", "loop_img_s", "original_img_s", "aug_batched_img_s", "aug_pil_img_s"):
        assert figures[key] > 0, key
    assert figures["loop_vs_model"] == figures["loop_img_s"] / figures["model_img_s"]
    assert (figures["device"], figures["precision"], figures["batch_size"],
            figures["images"]) == ("cpu", "float32", 32, 192)
    assert "2/3 loop vs original pipeline" in result.stdout


def test_speed_refuses_too_few_images(cifar_dir, capsys):
    code, _, err = call(speed.main, ["--data-dir", cifar_dir, "--device", "cpu", "--images", "100"], capsys)
    assert code == 2 and "must hold at least one batch" in err


@pytest.mark.slow
def test_inference_smoke(ex1_run, cifar_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the optional export packages are not installed")
    out = tmp_path / "inference.json"
    code, stdout, err = call(speed.main, ["--data-dir", cifar_dir, "--inference", ex1_run / "best.pt", "--images",
                                          "20", "--json", out], capsys)
    assert code == 0, err[-2000:]
    rows = json.loads(out.read_text())["inference"]
    assert [r["engine"] for r in rows] == ["PyTorch eager fp32", "ONNX Runtime fp32", "ONNX Runtime int8"]
    assert all(r["batch1_img_s"] > 0 and r["batch256_img_s"] > 0 for r in rows)
    assert rows[2]["file_mb"] < rows[1]["file_mb"] / 2
    assert "ONNX Runtime int8" in stdout
