"""Interrupt anywhere: SIGINT or SIGTERM inside an epoch saves the run at that step and --resume goes on from it; a
SIGKILL loses at most the steps since the last in-epoch save, also one while that state is written; the resumed
runs end with the history and test figures of the unbroken run."""
import itertools
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import call, EX1_TRAIN, history_of, QUICK, read_json, ROOT

import common
import ex1_convnet

pytestmark = pytest.mark.slow  # each test trains end to end

# The session's run (conftest.ex1_run) is the unbroken run: 12 steps an epoch.
ARGS = [*EX1_TRAIN, "--no-tensorboard"]
FIGURES = ("test_accuracy", "test_accuracy_first1000", "test_loss", "best_epoch", "best_val_accuracy", "epochs_run")
# A run in a process of its own whose in-epoch saves come after every step (no minute between them, at any cost) and
# which kills itself with SIGKILL half-way through writing the second: last.pt keeps the first.
KILLED_WHILE_SAVING = """
import os, signal, sys
sys.path.insert(0, ".")
import common, ex1_convnet
common.train.IN_EPOCH_SAVE_S, common.train.SAVE_SHARE = 0.0, 1.0
real, writes = common.files.atomic_write, []
def atomic_write(path, write):
    if path.name == "last.pt":
        writes.append(path)
        if len(writes) == 2:
            def half(f):
                f.write(b"PK\\x03\\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, half)
    return real(path, write)
common.files.atomic_write = atomic_write
sys.exit(ex1_convnet.main(sys.argv[1:]))
"""


def figures_of(run_dir) -> dict:
    metrics = read_json(run_dir / "metrics.json")
    return {k: pytest.approx(metrics[k], rel=1e-4) if "loss" in k else metrics[k] for k in FIGURES}


def signal_at_step(monkeypatch, signum: int, step: int) -> None:
    """The training loss, as train_one_epoch computes it, sends `signum` to this process at its `step`-th call, as
    Ctrl-C or `kill` would (the handler the run installs receives it)."""
    real, calls = torch.nn.functional.cross_entropy, itertools.count(1)

    def loss(*args, **kwargs):
        if next(calls) == step:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(common.train.F, "cross_entropy", loss)


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_inside_an_epoch_saves_that_step_and_the_resume_ends_as_if_unbroken(
        signum, exit_code, ex1_run, cifar_dir, tmp_path, monkeypatch, capsys):
    argv = [*ARGS, "--data-dir", cifar_dir, "--out-dir", tmp_path]
    handler = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; ignored in a shell's background job
    with monkeypatch.context() as patches:
        signal_at_step(patches, signum, 5)
        code, _, err = call(ex1_convnet.main, argv, capsys)
    assert code == exit_code, err[-3000:]
    assert "stopped at epoch 1, step 5 of 12" in err and "resume with: python" in err
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["in_epoch"]["step"] == 5 and saved["history"] == []  # no epoch had finished
    assert signal.getsignal(signal.SIGINT) is handler  # the run gave the signals back
    code, out, err = call(ex1_convnet.main, [*argv, "--resume"], capsys)
    assert code == 0, err[-3000:]
    assert "resuming at epoch 1 of 3, step 5 of 12" in out
    assert history_of(tmp_path) == history_of(ex1_run) and figures_of(tmp_path) == figures_of(ex1_run)


def test_a_kill_while_the_in_epoch_state_is_written_resumes_from_the_one_before(ex1_run, cifar_dir, tmp_path, capsys):
    argv = [str(a) for a in [*ARGS, "--data-dir", cifar_dir, "--out-dir", tmp_path]]
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in tmp_path.glob(".last.pt.*.tmp")]  # the write the kill cut short
    assert torch.load(tmp_path / "last.pt", weights_only=True)["in_epoch"]["step"] == 1
    # the settings and the data folder from last.pt
    code, out, err = call(ex1_convnet.main, ["--resume", "--out-dir", tmp_path], capsys)
    assert code == 0, err[-3000:]
    assert "resuming at epoch 1 of 3, step 1 of 12" in out
    assert history_of(tmp_path) == history_of(ex1_run) and figures_of(tmp_path) == figures_of(ex1_run)
    assert not list(tmp_path.glob(".*.tmp"))  # the resumed run cleared what the kill left


def test_a_time_budget_stopped_inside_an_epoch_keeps_its_plan_and_its_clock(cifar_dir, tmp_path, monkeypatch, capsys,
                                                                           narrow_ex1):
    argv = [*QUICK, "--limit-train", "256", "--batch-size", "16", "--time-budget", "0.1", "--no-tensorboard",
            "--data-dir", cifar_dir, "--out-dir", tmp_path]
    with monkeypatch.context() as patches:
        signal_at_step(patches, signal.SIGTERM, 16 + 3)  # the timed steps (5 + 11: an epoch's), then epoch 1's 3rd
        assert call(ex1_convnet.main, argv, capsys)[0] == 143
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    code, _, err = call(ex1_convnet.main, [*argv, "--resume"], capsys)
    assert code == 0, err[-3000:]
    history, metrics = read_json(tmp_path / "history.json"), read_json(tmp_path / "metrics.json")
    assert history[0]["elapsed_s"] > saved["in_epoch"]["elapsed_s"]  # the clock went on from where it stopped
    assert metrics["plan"]["budget_minutes"] == 0.1 and metrics["plan"]["spent_s"] == saved["plan"]["spent_s"]
    assert metrics["run_steps"] == metrics["planned_steps"]  # the plan it kept, re-made after each full epoch
    assert history[-1]["elapsed_s"] <= 0.1 * 60 + history[-1]["seconds"]  # its end: the budget, within an epoch
