"""What a new user meets first: the console of a run, --predict that never loses a result, one sentence for a broken
checkpoint or weights file, and no folder or lock left by a start that failed."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from conftest import call, error_line, QUICK, save_untrained_checkpoint
from PIL import Image

import common
import ex1_convnet
import ex2_transfer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An ex1 best.pt as a run writes it (untrained)."""
    settings = dataclasses.replace(common.cli.resolve_settings({}, ex1_convnet.RECIPES["default"],
                                                               ex1_convnet.Settings), mean=[0.5] * 3, std=[0.25] * 3,
                                   val_size=64, batch_size=32)
    return save_untrained_checkpoint("ex1_convnet.py", settings, ex1_convnet.build_model(settings),
                                     tmp_path_factory.mktemp("run") / "best.pt")


def test_the_console_shows_what_the_run_is_and_train_log_the_network(tmp_path, cifar_dir, capsys, monkeypatch,
                                                                      no_filter_plots):
    """One line says what the run is; the network's listing and every setting go to train.log only. The progress bar
    counts every step, and the line that says how long comes after the first timed steps, before the epoch ends."""
    counts, lines = [], []
    monkeypatch.setattr(common.train, "ESTIMATE_AFTER_S", 0.0, raising=False)
    monkeypatch.setattr(common.train.tqdm, "update", lambda bar, n=1: counts.append(bar.n + n) or
                        setattr(bar, "n", bar.n + n))
    say = common.train.say
    monkeypatch.setattr(common.train, "say", lambda ctx, line: lines.append((line, len(counts))) or say(ctx, line))
    code, out, err = call(ex1_convnet.main, [*QUICK, "--epochs", "1", "--limit-train", "48", "--batch-size", "8",
                                             "--data-dir", cifar_dir, "--out-dir", tmp_path / "run", "--lr", "0.01"],
                          capsys)
    assert code == 0, err[-2000:]
    assert "Conv2d(" not in out and "settings: {" not in out
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Conv2d(3, 128" in log and '"lr": 0.01' in log
    summary = next(line for line in out.splitlines() if line.startswith("ex1_convnet.py: "))
    assert summary.startswith("ex1_convnet.py: recipe default, 1 epoch, 7,682,826 parameters, cpu, float32; given: ")
    assert "--lr 0.01" in summary and "--limit-train 48" in summary and "--device" not in summary
    assert counts[:6] == [1, 2, 3, 4, 5, 6]  # 48 images in batches of 8: 6 steps, every one counted
    estimate = [steps for line, steps in lines if line.startswith("how long")]
    assert estimate == [2], lines
    assert "acc 0." not in out and "%  val loss" in out  # accuracies in percent


def test_predict_without_a_readable_image_keeps_the_earlier_result(tmp_path, checkpoint, capsys):
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    argv = ["--checkpoint", checkpoint, "--out-dir", tmp_path / "out", "--device", "cpu"]
    assert call(ex1_convnet.main, ["--predict", image, *argv], capsys)[0] == 0
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert set(written) == {"predictions.json", "predictions.csv", "predictions.png"}
    code, _, err = call(ex1_convnet.main, ["--predict", notes, *argv], capsys)
    assert code == 1 and "could be read" in error_line(err)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == written
    code, _, err = call(ex1_convnet.main, ["--predict", notes, *argv[:2], "--out-dir", tmp_path / "new"], capsys)
    assert code == 1 and not (tmp_path / "new").exists()


def broken_files(folder, checkpoint) -> dict:
    """name -> a file that is no usable ex1 checkpoint."""
    good = checkpoint.read_bytes()
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["0.weight"] = torch.zeros(64, 3, 3, 3)  # a narrower first layer than its settings build
    files = {"random": os.urandom(4096), "truncated": good[:len(good) // 2], "cut end": good[:-100],
             "text": b"my notes\n" * 100}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    torch.save(state, folder / "wrong shape")
    return {name: folder / name for name in [*files, "wrong shape"]}


def one_sentence(err: str, path) -> bool:
    """The error names the file, has no library detail (error types, pickle opcodes, keys) and ends whole."""
    line = error_line(err)
    return (str(path) in line and "Error" not in line and "Unsupported" not in line and "Traceback" not in err
            and line.rstrip().endswith((")", "shape", "file", "weights")))


def test_a_broken_checkpoint_is_one_sentence_for_every_task(tmp_path, checkpoint, cifar_dir, capsys):
    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    for name, path in broken_files(tmp_path, checkpoint).items():
        for task in (["--eval-only"], ["--predict", image], ["--export", tmp_path / "m.onnx"]):
            code, _, err = call(ex1_convnet.main, [*task, "--checkpoint", path, "--data-dir", cifar_dir,
                                                   "--no-download", "--device", "cpu", "--out-dir", tmp_path / "o"],
                                capsys)
            assert code == 2 and one_sentence(err, path), (name, task, err[-800:])
        run = tmp_path / f"resume {name}"
        run.mkdir()
        (run / "last.pt").write_bytes(path.read_bytes())
        code, _, err = call(ex1_convnet.main, ["--resume", "--out-dir", run, "--data-dir", cifar_dir,
                                               "--no-download", "--device", "cpu"], capsys)
        assert code == 2 and one_sentence(err, run / "last.pt"), (name, err[-800:])
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("content, words", [
    (b"not weights\n", "not a PyTorch weights file"), ("truncated", "a truncated or corrupt weights file"),
    ("ex1 weights", "its weights do not fit VGG-11-bn"), ("ex1 best.pt", "a training checkpoint of ex1_convnet.py"),
    ("missing", "no such file")])
def test_weights_that_are_not_vgg11_bn_are_one_sentence(tmp_path, cifar_dir, checkpoint, capsys, content, words):
    weights = tmp_path / "vgg.pth"
    if content == "truncated":
        content = checkpoint.read_bytes()[:5000]
    elif content == "ex1 best.pt":
        content = checkpoint.read_bytes()
    elif content == "ex1 weights":
        torch.save(torch.load(checkpoint, weights_only=True)["model"], weights)
    if isinstance(content, bytes):
        weights.write_bytes(content)
    code, _, err = call(ex2_transfer.main, ["--weights", weights, "--epochs", "1", "--data-dir", cifar_dir,
                                            "--out-dir", tmp_path / "run", *QUICK], capsys)
    assert code == 2 and one_sentence(err, weights) and words in error_line(err), err[-800:]
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_no_folder_and_no_lock(tmp_path, cifar_dir, capsys, narrow_ex1):
    """No data: a new run folder goes again; an existing one keeps no .lock, and its train.log ends with the error."""
    argv = ["--epochs", "1", "--data-dir", tmp_path / "nowhere", *QUICK]
    code, _, err = call(ex1_convnet.main, [*argv, "--out-dir", tmp_path / "new"], capsys)
    assert code == 2 and not (tmp_path / "new").exists()
    code, _, err = call(ex1_convnet.main, ["--time-budget", "0.0001", "--data-dir", cifar_dir, *QUICK[1:],
                                           "--out-dir", tmp_path / "kept"], capsys)
    assert code == 2 and not (tmp_path / "kept").exists(), err[-500:]
    (tmp_path / "old").mkdir()
    code, _, err = call(ex2_transfer.main, ["--weights", tmp_path / "missing.pth", "--data-dir", cifar_dir,
                                            "--out-dir", tmp_path / "old", *QUICK], capsys)
    assert code == 2 and [p.name for p in (tmp_path / "old").iterdir()] == ["train.log"]
    assert (tmp_path / "old" / "train.log").read_text().splitlines()[-1] == error_line(err)
