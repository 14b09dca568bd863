"""Test-time augmentation (--tta), on the small fixture data set."""
import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import common
import ex1_convnet
from conftest import QUICK, run_script

CPU = ["--device", "cpu", "--precision", "fp32"]
# Two epochs of a small model, its final test with --tta.
TRAIN = [*QUICK, "--batch-size", "16", "--limit-train", "64", "--epochs", "2", "--lr", "0.01", "--tta"]


def call(main, argv, capsys) -> tuple[int, str, str]:
    """Run a script's main() in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(cifar_dir, tmp_path_factory) -> Path:
    """The out-dir of one small training run made with --tta."""
    out = tmp_path_factory.mktemp("ex1-tta")
    result = run_script("ex1_convnet.py", *TRAIN, "--data-dir", cifar_dir, "--out-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- test-time augmentation views

def test_tta_views_mirror_along_the_width_and_translate_with_zero_fill():
    x = torch.rand(2, 3, 8, 10)  # not square and random: a vertical mirror or a transpose cannot pass
    views = common.tta_views(x)
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x)
    assert torch.equal(views[3], x.flip(-1)) and not torch.equal(views[3], x.flip(-2))
    for plain, view in ((x, views[1]), (x.flip(-1), views[4])):  # shifted by (+2, +2): content moves down-right
        assert torch.equal(view[..., 2:, 2:], plain[..., :-2, :-2])
        assert not view[..., :2, :].any() and not view[..., :, :2].any()
    for plain, view in ((x, views[2]), (x.flip(-1), views[5])):  # shifted by (-2, -2)
        assert torch.equal(view[..., :-2, :-2], plain[..., 2:, 2:])
        assert not view[..., -2:, :].any() and not view[..., :, -2:].any()


def test_predict_with_tta_averages_the_softmax_of_the_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    settings = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    ctx = common.TrainContext(torch.device("cpu"), torch.float32)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    expected = torch.stack([model(common.normalize(v, settings["mean"], settings["std"])).softmax(1)
                            for v in common.tta_views(images.float() / 255)]).mean(0)
    got = common.predict(model, images, settings, ctx, tta=True).softmax(1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(common.predict(model, images, settings, ctx).softmax(1), expected, atol=1e-3)


def test_tta_is_a_runtime_flag_that_resume_accepts():
    assert "tta" in common.RUNTIME_KEYS
    saved = {**common.DEFAULTS, "epochs": 2}
    assert common._resume_settings(argparse.Namespace(tta=True, epochs=None), saved)["tta"] is True


# ----------------------------------------------------------------------------- with a trained model

@pytest.mark.slow
def test_a_training_run_with_tta_reports_both_accuracies(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("test_accuracy", "test_accuracy_first1000", "test_accuracy_tta", "test_accuracy_first1000_tta"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["test_images"] == 120 and metrics["test_accuracy_first1000_tta"] == metrics["test_accuracy_tta"]


@pytest.mark.slow
def test_eval_only_with_tta_reports_the_same_accuracies(trained, cifar_dir, tmp_path, capsys):
    code, out, err = call(ex1_convnet.main, ["--eval-only", "--tta", "--checkpoint", trained / "best.pt", "--data-dir",
                                             cifar_dir, "--no-download", "--out-dir", tmp_path, *CPU], capsys)
    assert code == 0, err[-3000:]
    evaluated, reference = (json.loads((folder / "metrics.json").read_text()) for folder in (tmp_path, trained))
    for key in ("test_accuracy", "test_accuracy_first1000", "test_accuracy_tta", "test_accuracy_first1000_tta"):
        assert evaluated[key] == reference[key], key
    assert "all, --tta" in out


