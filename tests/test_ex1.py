"""ex1_convnet.py end to end on the small fixture data set, on the CPU."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import assert_png, CLASS_NAMES, QUICK, read_json, run_ok

import common
import ex1_convnet

KIND = "ex1_convnet.py"
PARAMS_BN, PARAMS_NO_BN = 7_682_826, 7_678_474
# Three epochs on 96 images in batches of 8 learn the fixture's colours (about 0.9 or more test accuracy); the
# corruption benchmark on the first 40 test images.
TRAIN = [*QUICK, "--batch-size", "8", "--limit-train", "96", "--epochs", "3", "--lr", "0.02", "--corruptions", "40"]
# Two epochs of a small --no-bn model: for reproducibility and --eval-only.
NO_BN = [*QUICK, "--no-bn", "--batch-size", "16", "--limit-train", "32", "--epochs", "2", "--lr", "0.01", "--seed", "5"]
TEST_FIGURES = ["per_class.png", "confusion.png", "misclassified.png"]
RUN_FILES = ["metrics.json", "history.json", "history.png", "filters_before.png", "filters_after.png", *TEST_FIGURES,
             "corruptions.png", "corruption_examples.png", "train.log", "best.pt", "last.pt"]
HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]


@pytest.fixture(scope="module")
def trained(cifar_dir, tmp_path_factory) -> Path:
    """The out-dir of one default-recipe training run, shared by this module's tests."""
    out = tmp_path_factory.mktemp("ex1")
    run_ok(*TRAIN, "--data-dir", cifar_dir, "--out-dir", out)
    return out


@pytest.fixture(scope="module")
def no_bn_runs(cifar_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The out-dirs of two --no-bn runs with the same flags and seed."""
    outs = tmp_path_factory.mktemp("ex1-no-bn-a"), tmp_path_factory.mktemp("ex1-no-bn-b")
    for out in outs:
        run_ok(*NO_BN, "--data-dir", cifar_dir, "--out-dir", out)
    return outs


@pytest.mark.slow
def test_run_writes_every_report(trained):
    for name in RUN_FILES:
        assert (trained / name).is_file(), name
    for name in RUN_FILES:
        if name.endswith(".png"):
            assert_png(trained / name)


@pytest.mark.slow
def test_metrics(trained):
    m = read_json(trained / "metrics.json")
    for key in ["test_accuracy", "test_accuracy_first1000", "test_accuracy_last", "per_class_accuracy", "best_epoch",
                "best_val_accuracy", "params", "epochs_run", "train_seconds", "train_images_per_s", "device",
                "settings", "versions", "git_commit", "hardware"]:
        assert key in m, key
    for key in ["test_accuracy", "test_accuracy_first1000", "test_accuracy_last", "best_val_accuracy"]:
        assert 0 <= m[key] <= 1, key
    assert list(m["per_class_accuracy"]) == CLASS_NAMES
    assert all(0 <= v <= 1 for v in m["per_class_accuracy"].values())
    assert m["test_accuracy"] > 0.5, "the fixture is learnable: a few epochs reach about 0.9"
    assert m["test_accuracy_first1000"] == m["test_accuracy"]  # the fixture has only 120 test images
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


@pytest.mark.slow
def test_the_report_holds_every_corruption_measured_on_the_same_images(trained):
    record = read_json(trained / "metrics.json")["corruptions"]
    every = [(name, severity) for name, severities in common.evaluation.CORRUPTIONS.items() for severity in severities]
    assert [(r["corruption"], r["severity"]) for r in record["results"]] == every
    assert record["images"] == 40 and record["seed"] == 0
    for r in record["results"]:
        assert 0 <= r["accuracy"] <= 1 and r["drop"] == pytest.approx(record["clean_accuracy"] - r["accuracy"])
        assert (r["accuracy"] * 40) == pytest.approx(round(r["accuracy"] * 40))  # a count of the same 40 images
    assert record["mean_accuracy"] == pytest.approx(sum(r["accuracy"] for r in record["results"]) / len(every))
    assert record["clean_accuracy"] > 0.5  # a trained model, on the first 40 of the 120 test images


@pytest.mark.slow
def test_eval_only_corruptions_are_deterministic_and_cover_every_test_image(trained, cifar_dir, tmp_path):
    records = []
    for out in (tmp_path / "a", tmp_path / "b"):
        run_ok(*QUICK, "--data-dir", cifar_dir, "--eval-only", "--checkpoint", trained / "best.pt", "--out-dir", out,
               "--corruptions")
        records.append(read_json(out / "metrics.json")["corruptions"])
        assert_png(out / "corruptions.png")
    assert records[0] == records[1] and records[0]["images"] == 120  # without N: all the test images


@pytest.mark.slow
def test_history_and_checkpoints(trained):
    """history.json has one row per epoch over the --limit-train images; best.pt holds the best epoch's weights,
    last.pt the last epoch with the optimizer state that --resume needs."""
    history = read_json(trained / "history.json")
    m = read_json(trained / "metrics.json")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for row in history:
        assert all(0 <= row[k] <= 1 for k in ("train_accuracy", "val_accuracy"))
        assert round(row["images_per_s"] * row["seconds"]) == 96
    assert m["best_val_accuracy"] == max(row["val_accuracy"] for row in history)
    assert history[m["best_epoch"] - 1]["val_accuracy"] == m["best_val_accuracy"]
    best, last = (common.files.load_checkpoint(trained / "best.pt", KIND),
                  common.files.load_checkpoint(trained / "last.pt", KIND))
    assert best["epoch"] == m["best_epoch"] and last["epoch"] == 3
    assert not set(common.files.TRAINING_STATE) & best.keys() and set(common.files.TRAINING_STATE) <= last.keys()


@pytest.mark.slow
def test_train_log_records_every_epoch(trained):
    log = (trained / "train.log").read_text()
    for epoch in (1, 2, 3):
        assert f"epoch   {epoch}/3" in log


@pytest.mark.slow
def test_same_seed_same_history(no_bn_runs):
    """Two CPU runs with the same --seed give identical losses and accuracies."""
    a, b = (read_json(out / "history.json") for out in no_bn_runs)
    assert len(a) == 2
    assert [[row[k] for k in HISTORY_COLUMNS] for row in a] == [[row[k] for k in HISTORY_COLUMNS] for row in b]


@pytest.mark.slow
def test_eval_only_rebuilds_no_bn_model_into_eval_folder(no_bn_runs, cifar_dir):
    """--eval-only --checkpoint writes beside the checkpoint in eval/, rebuilding --no-bn without the flag."""
    run_dir = no_bn_runs[0]
    stdout = run_ok(*QUICK, "--data-dir", cifar_dir, "--eval-only", "--checkpoint", run_dir / "best.pt")
    out = run_dir / "eval"
    m = read_json(out / "metrics.json")
    assert m["params"] == PARAMS_NO_BN
    assert m["test_accuracy"] == read_json(run_dir / "metrics.json")["test_accuracy"]
    for name in TEST_FIGURES:
        assert_png(out / name)
    assert not any((out / name).exists() for name in ("history.json", "best.pt", "last.pt"))
    assert "epoch   1/" not in stdout


@pytest.mark.slow
def test_eval_only_writes_into_out_dir(trained, cifar_dir, tmp_path):
    out = tmp_path / "evaluated"
    run_ok(*QUICK, "--data-dir", cifar_dir, "--eval-only", "--checkpoint", trained / "best.pt", "--out-dir", out)
    m = read_json(out / "metrics.json")
    assert m["params"] == PARAMS_BN
    assert m["test_accuracy"] == read_json(trained / "metrics.json")["test_accuracy"]
    for name in TEST_FIGURES:
        assert_png(out / name)
    assert not (trained / "eval").exists()


@pytest.mark.slow
def test_eval_only_defaults_to_best_pt_of_the_default_out_dir(no_bn_runs, cifar_dir, tmp_path, monkeypatch):
    """--eval-only with neither --checkpoint nor --out-dir evaluates runs/ex1/best.pt into runs/ex1/eval/."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ex1").mkdir(parents=True)
    (tmp_path / "runs" / "ex1" / "best.pt").write_bytes((no_bn_runs[0] / "best.pt").read_bytes())
    assert ex1_convnet.main([*QUICK, "--data-dir", str(cifar_dir), "--eval-only"]) == 0
    assert read_json(tmp_path / "runs" / "ex1" / "eval" / "metrics.json")["params"] == PARAMS_NO_BN


@pytest.mark.slow
def test_patience_stops_early(cifar_dir, tmp_path):
    """With a learning rate too small to change anything, --patience 1 stops after the second epoch."""
    stdout = run_ok(*QUICK, "--no-bn", "--batch-size", "16", "--limit-train", "16", "--lr", "1e-12", "--epochs", "5",
                    "--patience", "1", "--data-dir", cifar_dir, "--out-dir", tmp_path)
    m = read_json(tmp_path / "metrics.json")
    assert m["epochs_run"] == 2 and m["best_epoch"] == 1
    assert len(read_json(tmp_path / "history.json")) == 2
    assert "early stop" in stdout


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        ex1_convnet.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--data-dir", "--no-download", "--out-dir", "--epochs", "--batch-size", "--lr", "--weight-decay",
                 "--dropout", "--no-bn", "--augment", "--limit-train", "--val-size", "--recipe", "--seed",
                 "--device", "--precision", "--patience", "--eval-only", "--checkpoint"]:
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", text), flag


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
