"""ex1_convnet.py: the ConvNet its flags build, and the session's run (conftest.ex1_run) end to end: its reports,
metrics, history and checkpoints, the corruption benchmark, --eval-only and early stopping."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import assert_png, call, CLASS_NAMES, ex1_settings, QUICK, read_json, run_script, write_cifar

import common
import ex1_convnet
import ex2_transfer

KIND = "ex1_convnet.py"
PARAMS_BN = 7_682_826
PARAMS_NO_BN = PARAMS_BN - 2 * (128 + 4 * 512)
TEST_FIGURES = ["per_class.png", "confusion.png", "misclassified.png"]
RUN_FILES = ["metrics.json", "history.json", "history.png", "filters_before.png", "filters_after.png", *TEST_FIGURES,
             "corruptions.png", "corruption_examples.png", "train.log", "best.pt", "last.pt"]


# ----------------------------------------------------------------------------- the network

def model_for(*argv: str) -> nn.Module:
    """The model ex1_convnet.py builds for these flags."""
    torch.manual_seed(0)
    return ex1_convnet.build_model(ex1_settings(*argv))


def layers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_parameter_count_and_output_shape_with_and_without_batchnorm():
    model, no_bn = model_for().eval(), model_for("--no-bn").eval()
    assert [sum(p.numel() for p in m.parameters()) for m in (model, no_bn)] == [PARAMS_BN, PARAMS_NO_BN]
    assert len(layers(model, nn.BatchNorm2d)) == 5 and not layers(no_bn, nn.modules.batchnorm._BatchNorm)
    assert {m.momentum for m in layers(model, nn.BatchNorm2d)} == {0.1}  # PyTorch's BatchNorm as it is
    assert isinstance(model[-1], nn.Linear)  # the logits come straight from the last layer
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == no_bn(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_original_recipe_dropout_and_linear_init_and_the_dropout_flag():
    """--recipe original: dropout 0.4 in the first block and 0.3 after, Linear weights drawn with std 1e-3;
    --dropout sets every block."""
    model = model_for("--recipe", "original")
    assert [m.p for m in layers(model, nn.Dropout)] == [0.4, 0.3, 0.3, 0.3, 0.3]
    (linear,) = layers(model, nn.Linear)
    assert abs(linear.weight.std().item() - 1e-3) < 1e-4
    assert abs(linear.weight.mean().item()) < 1e-4
    assert [m.p for m in layers(model_for("--recipe", "original", "--dropout", "0.2"), nn.Dropout)] == [0.2] * 5


def test_help_lists_every_flag_and_explains_predict_the_tta_views_the_global_batch_and_bf16(capsys):
    texts = []
    for parse_args in (ex1_convnet.parse_args, ex2_transfer.parse_args):
        with pytest.raises(SystemExit) as done:
            parse_args(["--help"])
        assert done.value.code == 0
        texts.append(" ".join(capsys.readouterr().out.split()))
        assert "--predict PATH [PATH ...]" in texts[-1] and "--tta" in texts[-1] and "6 views" in texts[-1]
        assert "left-right mirror" in texts[-1] and "2 pixels" in texts[-1] and "global batch size" in texts[-1]
        assert "bf16 needs compute capability 8.0+ on CUDA" in texts[-1]
    for flag in ["--data-dir", "--no-download", "--out-dir", "--epochs", "--batch-size", "--lr", "--weight-decay",
                 "--dropout", "--no-bn", "--augment", "--limit-train", "--val-size", "--recipe", "--seed",
                 "--device", "--precision", "--patience", "--eval-only", "--checkpoint"]:
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", texts[0]), flag


# ----------------------------------------------------------------------------- the session's run

@pytest.mark.slow
def test_run_writes_every_report_its_metrics_history_checkpoints_and_train_log(ex1_run):
    for name in RUN_FILES:
        assert (ex1_run / name).is_file(), name
        if name.endswith(".png"):
            assert_png(ex1_run / name)
    m = read_json(ex1_run / "metrics.json")
    for key in ["test_accuracy", "test_accuracy_first1000", "test_accuracy_last", "best_val_accuracy"]:
        assert 0 <= m[key] <= 1, key
    assert list(m["per_class_accuracy"]) == CLASS_NAMES
    assert all(0 <= v <= 1 for v in m["per_class_accuracy"].values())
    assert m["test_accuracy"] > 0.5, "the fixture is learnable: a few epochs reach about 0.9"
    assert m["test_images"] == 120 and m["test_accuracy_first1000"] == m["test_accuracy"]  # only 120 test images
    assert m["params"] == PARAMS_BN and m["epochs_run"] == 3 and 1 <= m["best_epoch"] <= 3
    assert m["train_seconds"] > 0 and m["train_images_per_s"] > 0
    assert m["device"] == "cpu"
    assert m["settings"]["epochs"] == 3 and m["settings"]["lr"] == 0.02 and m["settings"]["limit_train"] == 96
    # the settings once, what they compute
    assert "args" not in m and not common.cli.RUNTIME_KEYS & m["settings"].keys()
    assert m["versions"]["python"] and m["versions"]["torch"] == torch.__version__
    assert m["versions"]["torchvision"] == torchvision.__version__
    assert m["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", m["git_commit"])
    assert isinstance(m["hardware"], dict) and m["hardware"]
    # one history row per epoch over the --limit-train images; best.pt holds the best epoch's weights, last.pt the
    # last epoch with the optimizer state that --resume needs; train.log records every epoch
    history = read_json(ex1_run / "history.json")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for row in history:
        assert all(0 <= row[k] <= 1 for k in ("train_accuracy", "val_accuracy"))
        assert round(row["images_per_s"] * row["seconds"]) == 96
    assert m["best_val_accuracy"] == max(row["val_accuracy"] for row in history)
    assert history[m["best_epoch"] - 1]["val_accuracy"] == m["best_val_accuracy"]
    best, last = (common.files.load_checkpoint(ex1_run / name, KIND) for name in ("best.pt", "last.pt"))
    assert best["epoch"] == m["best_epoch"] and last["epoch"] == 3 and best["classes"] == CLASS_NAMES
    assert not set(common.files.TRAINING_STATE) & best.keys() and set(common.files.TRAINING_STATE) <= last.keys()
    log = (ex1_run / "train.log").read_text()
    for epoch in (1, 2, 3):
        assert f"epoch   {epoch}/3" in log


@pytest.mark.slow
def test_the_report_holds_every_corruption_measured_on_the_same_images(ex1_run):
    record = read_json(ex1_run / "metrics.json")["corruptions"]
    every = [(name, severity) for name, severities in common.evaluation.CORRUPTIONS.items() for severity in severities]
    assert [(r["corruption"], r["severity"]) for r in record["results"]] == every
    assert record["images"] == 20 and record["seed"] == 0
    for r in record["results"]:
        assert 0 <= r["accuracy"] <= 1 and r["drop"] == pytest.approx(record["clean_accuracy"] - r["accuracy"])
        assert (r["accuracy"] * 20) == pytest.approx(round(r["accuracy"] * 20))  # a count of the same 20 images
    assert record["mean_accuracy"] == pytest.approx(sum(r["accuracy"] for r in record["results"]) / len(every))
    assert record["clean_accuracy"] > 0.5  # a trained model, on the first 20 of the 120 test images


# ----------------------------------------------------------------------------- --eval-only

@pytest.mark.slow
def test_eval_only_reproduces_the_runs_test_and_benchmark_into_out_dir(ex1_run, cifar_dir, tmp_path):
    """The one --eval-only through a real process: the plain and --tta test accuracies and the corruption record (the
    same first 20 images, the same seed) that the run measured, the test figures in --out-dir, nothing beside the
    checkpoint. (What the --tta figures measure: tests/test_predict.py.)"""
    out = tmp_path / "evaluated"
    result = run_script("ex1_convnet.py", *QUICK, "--data-dir", cifar_dir, "--eval-only", "--tta", "--checkpoint",
                        ex1_run / "best.pt", "--out-dir", out, "--corruptions", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    m, trained = read_json(out / "metrics.json"), read_json(ex1_run / "metrics.json")
    assert m["params"] == PARAMS_BN and m["corruptions"] == trained["corruptions"]
    for key in ("test_accuracy", "test_accuracy_first1000", "test_accuracy_tta", "test_accuracy_first1000_tta"):
        assert 0 <= trained[key] <= 1 and m[key] == trained[key], key
    assert trained["test_accuracy_first1000_tta"] == trained["test_accuracy_tta"]  # 120 test images
    for name in [*TEST_FIGURES, "corruptions.png"]:
        assert_png(out / name)
    assert "all, --tta" in result.stdout
    assert not (ex1_run / "eval").exists() and "epoch   1/" not in result.stdout


@pytest.mark.slow
def test_eval_only_defaults_to_best_pt_of_the_default_out_dir(ex1_run, tmp_path, monkeypatch, capsys):
    """--eval-only with neither --checkpoint nor --out-dir evaluates runs/ex1/best.pt into runs/ex1/eval/; --corruptions
    without a number benchmarks every test image (of a copy with 20)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ex1").mkdir(parents=True)
    shutil.copy(ex1_run / "best.pt", tmp_path / "runs" / "ex1" / "best.pt")
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=20)
    code, _, err = call(ex1_convnet.main, [*QUICK, "--data-dir", data, "--eval-only", "--corruptions"], capsys)
    assert code == 0, err[-3000:]
    m = read_json(tmp_path / "runs" / "ex1" / "eval" / "metrics.json")
    assert m["params"] == PARAMS_BN and m["test_images"] == m["corruptions"]["images"] == 20


# ----------------------------------------------------------------------------- early stopping, the commit

@pytest.mark.slow
def test_patience_stops_early(cifar_dir, tmp_path, capsys, no_filter_plots):
    """With a learning rate too small to change anything, --patience 1 stops after the second epoch."""
    code, out, err = call(ex1_convnet.main, [*QUICK, "--no-bn", "--batch-size", "16", "--limit-train", "16", "--lr",
                                             "1e-12", "--epochs", "5", "--patience", "1", "--data-dir", cifar_dir,
                                             "--out-dir", tmp_path], capsys)
    assert code == 0, err[-3000:]
    m = read_json(tmp_path / "metrics.json")
    assert m["epochs_run"] == 2 and m["best_epoch"] == 1
    assert len(read_json(tmp_path / "history.json")) == 2
    assert "early stop" in out


def test_metrics_name_the_commit_that_ran_not_one_made_during_the_run(tmp_path):
    """A run reads its git commit when it starts: committing while it trains does not change what it records."""
    shutil.copytree(Path(common.__file__).parent, tmp_path / "common", ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "the code that runs"], check=True)
    started = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    script = ("import subprocess, sys, torch, common.files as report; subprocess.run(sys.argv[1:], check=True); "
              "print(report.environment_info(torch.device('cpu'))['git_commit'])")
    recorded = subprocess.run([sys.executable, "-c", script, *git, "commit", "-q", "--allow-empty", "-m", "later"],
                              cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    later = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert later != started and recorded == started
