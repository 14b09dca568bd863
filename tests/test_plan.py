"""A time budget's plan that buys more than 10 epochs: every epoch after it trains with the settings the run records
(the short recipe's crop padding and label smoothing scaled towards the 30-epoch recipe's), unbroken, resumed, and
for every seed of a sweep. The plan is fixed (plan_total_steps stands in for the clock), so runs can be compared."""
import contextlib

import pytest
import torch
from conftest import interrupt_validation, QUICK, read_json

import common
import ex1_convnet

STEPS_PER_EPOCH = 4  # the fixture's 320 training images, less 64 for validation, in batches of 64
PLANNED = 16 * STEPS_PER_EPOCH  # 16 epochs: crop padding 3 (from 2), label smoothing 0.157 (from 0.2)


@contextlib.contextmanager
def observed_steps(monkeypatch):
    """Every training step's (label smoothing, crop padding), as the loss and the augmentation are called with
    them, in order; the time budget's plan fixed at PLANNED steps."""
    steps, cross_entropy, rotate = [], torch.nn.functional.cross_entropy, common.data.batch_rotate
    pads = []

    def loss(logits, target, *args, **kwargs):
        if logits.requires_grad:  # a training step's, not validation's or the test's
            steps.append((round(kwargs.get("label_smoothing", 0.0), 6), pads[-1] if pads else None))
        return cross_entropy(logits, target, *args, **kwargs)

    def rotated(images, max_degrees, generator, flip_p=0.0, pad=0, fill="zeros"):
        pads.append(pad)
        return rotate(images, max_degrees, generator, flip_p, pad, fill)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", loss)
    monkeypatch.setattr(common.data, "batch_rotate", rotated)  # the short recipe crops inside the rotation
    monkeypatch.setattr(common.train, "plan_total_steps", lambda *args, **kwargs: PLANNED)
    monkeypatch.setattr(common.train, "plot_filters", lambda *args, **kwargs: None)
    yield steps


def budget_flags(cifar_dir, out_dir) -> list:
    return [*QUICK, "--batch-size", "64", "--data-dir", cifar_dir, "--out-dir", out_dir, "--time-budget", "5",
            "--no-tensorboard"]


def recorded(run_dir) -> tuple[float, int]:
    settings = read_json(run_dir / "metrics.json")["settings"]
    return round(settings["label_smoothing"], 6), settings["crop_pad"]


@pytest.fixture(scope="module")
def unbroken(cifar_dir, tmp_path_factory):
    """One budget run, unbroken: its folder and the steps it trained."""
    out_dir = tmp_path_factory.mktemp("unbroken")
    with pytest.MonkeyPatch.context() as monkeypatch, observed_steps(monkeypatch) as steps:
        assert ex1_convnet.main([str(a) for a in budget_flags(cifar_dir, out_dir)]) == 0
    return out_dir, steps


@pytest.mark.slow
def test_every_epoch_after_the_plan_trains_with_the_settings_the_run_records(unbroken):
    out_dir, steps = unbroken
    metrics = read_json(out_dir / "metrics.json")
    assert metrics["run_steps"] == PLANNED  # the stand-in took effect
    assert recorded(out_dir) == (0.157, 3)  # scaled from the short recipe's 0.2 and 2
    assert len(steps) >= PLANNED and steps[-PLANNED:] == [recorded(out_dir)] * PLANNED


@pytest.mark.slow
def test_a_budget_run_stopped_after_epoch_3_and_resumed_gives_the_figures_of_the_unbroken_run(
        unbroken, cifar_dir, tmp_path, monkeypatch, capsys):
    with observed_steps(monkeypatch):
        interrupt_validation(monkeypatch, call=4)  # epoch 4's validation
        assert ex1_convnet.main([str(a) for a in budget_flags(cifar_dir, tmp_path)]) == 130
        assert common.files.load_checkpoint(tmp_path / "last.pt", "ex1_convnet.py")["epoch"] == 3
        assert ex1_convnet.main([str(a) for a in [*budget_flags(cifar_dir, tmp_path), "--resume"]]) == 0
    assert "resuming after epoch 3" in capsys.readouterr().out
    (expected_dir, _), keys = unbroken, ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "steps")
    expected, resumed = read_json(expected_dir / "metrics.json"), read_json(tmp_path / "metrics.json")
    assert [[row[k] for k in keys] for row in read_json(tmp_path / "history.json")] == \
        [[row[k] for k in keys] for row in read_json(expected_dir / "history.json")]
    assert (resumed["test_accuracy"], resumed["test_loss"]) == (expected["test_accuracy"], expected["test_loss"])
    assert resumed["settings"] == expected["settings"]


@pytest.mark.slow
def test_each_seed_of_a_budget_sweep_trains_with_the_settings_it_records(cifar_dir, tmp_path, monkeypatch):
    with observed_steps(monkeypatch) as steps:
        assert ex1_convnet.main([str(a) for a in [*budget_flags(cifar_dir, tmp_path), "--seeds", "2"]]) == 0
    first, second = tmp_path / "seed0", tmp_path / "seed1"
    assert read_json(first / "metrics.json")["run_steps"] == read_json(second / "metrics.json")["run_steps"] == PLANNED
    assert recorded(first) == recorded(second) == (0.157, 3)
    assert steps[-2 * PLANNED:] == [recorded(first)] * PLANNED + [recorded(second)] * PLANNED
