"""--time-budget: the plan made from the speed of the first steps, the schedule over it, the partial last epoch,
--resume keeping the plan, and the refusals. A fake clock stands in for time: no assertion depends on real speed.
Last, a plan that buys more than 10 epochs: every epoch after it trains with the settings the run records."""
import contextlib
import functools
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import call, interrupt_validation, narrow, NARROW_PARAMETERS, QUICK, read_json

import common
import ex1_convnet

STEPS_PER_EPOCH = 8  # the fixture's 320 training images, less 64 for validation, in batches of 32
CPU = common.device.TrainContext(torch.device("cpu"), torch.float32)
pytestmark = pytest.mark.usefixtures("narrow_ex1")  # the plan and the schedule are the point here, not the network


def fake_clock(monkeypatch, readings) -> None:
    """The training clock (time.perf_counter() as common.train reads it) returns `readings` one after the other."""
    clock = SimpleNamespace(perf_counter=functools.partial(next, iter(readings)))
    monkeypatch.setattr(common.train, "time", clock)


def test_plan_fills_the_time_left_after_the_validation_passes_and_a_re_plan_counts_only_those_ahead():
    assert common.train.plan_total_steps(60, 12, 1.0, 0.0, 12, 25) == 60
    # 48 s left hold 48 more steps at most, 60 in all: 3 epochs, whose 3 validation passes of 3 s leave 39
    assert common.train.plan_total_steps(60, 12, 1.0, 3.0, 12, 25) == 51
    assert common.train.plan_total_steps(60, 70, 1.0, 0.0, 12, 25) == 12  # already over: no step more
    # after 2 of 10-step epochs, 10 s used, 1 s a step and 2 s of validation and saving an epoch: 50 s left hold
    # 4 more epochs and their passes (48 s), not a step more
    assert common.train.plan_total_steps(60, 10, 1.0, 2.0, 20, 10, epochs_validated=2) == 60
    assert common.train.plan_total_steps(60, 10, 1.0, 2.0, 20, 10) == 58  # epochs 1 and 2 still to validate
    # one step of 1 s in an epoch of 100 steps, validation 30 s: 100 s left hold the validation of the epoch the run
    # is in and 70 steps; a plan that counted the passes of the most steps it could ever take would allow none
    assert common.train.plan_total_steps(100, 0, 1.0, 30.0, 0, 100) == 70


def test_the_timed_steps_time_the_steps_after_the_warm_up_on_a_network_of_their_own(monkeypatch):
    images, labels = torch.zeros(25 * 32, 3, 32, 32, dtype=torch.uint8), torch.zeros(25 * 32, dtype=torch.long)
    settings = common.cli.Settings(augment=[], mean=[0.5] * 3, std=[0.5] * 3)
    built, epochs = [], []

    def build_model(settings, initial_weights=True):
        built.append(initial_weights)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))

    def train_one_epoch(training, images, labels, settings, plan, epoch, ctx, steps=None):
        epochs.append((epoch, steps, training.optimizer.param_groups[0]["lr"]))
        return {"seconds": 2.0 * steps, "steps": steps}

    monkeypatch.setattr(common.train, "train_one_epoch", train_one_epoch)
    fake_clock(monkeypatch, [0.0, 60.0])  # read before the first step and after the last
    plan = common.train.Plan(32, 25, None, budget_minutes=1.0)
    assert common.train.time_steps(settings, build_model, images, labels, plan, CPU) == (2.0, 60.0)
    assert epochs == [(0, 5, 2e-3), (0, 20, 2e-3)]  # 5 warm-up steps, then 20 timed, epoch 0's random streams
    assert built == [False]  # a network of their own, with no starting weights to fetch
    assert common.train.lr_factor(5, plan) == 0.1  # before the plan, the schedule's first value


def test_the_plan_fills_the_budget_left_after_the_timed_steps_and_none_left_is_refused():
    plan = common.train.Plan(32, 25, None, budget_minutes=1.0)
    planned = common.train.budget_plan(plan, step_s=1.0, spent_s=25.0, val_images=96, scaling=None, ctx=CPU)
    # 1 s a step, so a validation pass of 96 images is 1 s (a third of 3 steps of 32); the 35 s left hold 33 steps
    # and the validation of the 2 epochs they reach
    assert planned.total_steps == 33 and planned.epochs == 2 and planned.images_per_s == 32
    assert planned.spent_s == 25.0 and planned.chosen == {} and plan.total_steps is None  # a new plan
    with pytest.raises(common.files.UsageError, match="too short for the 25 steps that time it"):
        common.train.budget_plan(plan, step_s=2.0, spent_s=61.0, val_images=96, scaling=None, ctx=CPU)


SCALING = ex1_convnet.RECIPES["short"]["budget_scaling"]


def test_the_regularisation_follows_the_planned_epochs_and_the_plan_sets_it_in_the_settings_and_the_model():
    short = ex1_convnet.RECIPES["short"]
    default = common.cli.resolve_settings({}, ex1_convnet.RECIPES["default"], ex1_convnet.Settings)
    keys = ("dropout", "crop_pad", "label_smoothing")
    assert SCALING["epochs"] == [10, 30]
    assert common.train.choose_settings(SCALING, 10) == {k: short[k] for k in keys}
    assert common.train.choose_settings(SCALING, 3) == {k: short[k] for k in keys}  # held at the ends
    assert common.train.choose_settings(SCALING, 30) == {k: default[k] for k in keys}
    assert common.train.choose_settings(SCALING, 100) == {k: default[k] for k in keys}
    middle = common.train.choose_settings(SCALING, math.sqrt(10 * 30))  # halfway on the logarithm
    assert middle == {"dropout": 0.05, "crop_pad": 3, "label_smoothing": 0.15}
    # the plan sets the scaled regularisation in the settings and the model
    settings = common.cli.resolve_settings({"time_budget": 60.0}, ex1_convnet.RECIPES["short"], ex1_convnet.Settings)
    # 30 epochs of 100 steps
    plan = common.train.budget_plan(common.train.Plan(64, 100, None, budget_minutes=60.0), step_s=1.2, spent_s=0.0,
                                     val_images=0, scaling=settings["budget_scaling"], ctx=CPU)
    assert plan.chosen == {"dropout": 0.1, "crop_pad": 4, "label_smoothing": 0.1}
    settings = common.train.settings_for_plan(settings, plan)
    model = ex1_convnet.build_model(settings)  # built after the plan, with the dropout it chose
    assert (settings["dropout"], settings["crop_pad"], settings["label_smoothing"]) == (0.1, 4, 0.1)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_a_flag_given_keeps_its_value_under_the_budget_no_budget_scales_nothing_and_patience_is_off(capsys):
    given = {"time_budget": 60.0, "dropout": 0.3}
    settings = common.cli.resolve_settings(given, ex1_convnet.RECIPES["short"], ex1_convnet.Settings)
    assert set(settings["budget_scaling"]) == {"epochs", "crop_pad", "label_smoothing"}
    settings = common.cli.resolve_settings({"time_budget": 60.0, "augment": "flip,crop"}, ex1_convnet.RECIPES["short"],
                                       ex1_convnet.Settings)
    assert set(settings["budget_scaling"]) == {"epochs", "dropout", "label_smoothing"}  # --augment fixes the crop
    assert common.cli.resolve_settings({}, ex1_convnet.RECIPES["short"], ex1_convnet.Settings)["budget_scaling"] is None
    capsys.readouterr()
    settings = common.cli.resolve_settings({"time_budget": 60.0, "patience": 3}, ex1_convnet.RECIPES["short"],
                                       ex1_convnet.Settings)
    assert settings["patience"] == 0
    assert "--patience 3 is not applied under --time-budget" in capsys.readouterr().err
    settings = common.cli.resolve_settings({"time_budget": 60.0}, ex1_convnet.RECIPES["short"], ex1_convnet.Settings)
    assert settings["patience"] == 0 and capsys.readouterr().err == ""


def budget_run(cifar_dir, out_dir, minutes: str = "0.1") -> list:
    return [*QUICK, "--data-dir", cifar_dir, "--out-dir", out_dir, "--time-budget", minutes]


@pytest.mark.slow
def test_a_budget_run_trains_the_planned_steps_the_last_epoch_what_is_left(cifar_dir, tmp_path, capsys, monkeypatch,
                                                                        no_filter_plots):
    fake_clock(monkeypatch, itertools.count(0.0, 0.1))  # every reading a tenth of a second later
    code, out, err = call(ex1_convnet.main, budget_run(cifar_dir, tmp_path, "0.2"), capsys)
    assert code == 0, err[-3000:]
    assert NARROW_PARAMETERS in out  # the narrow network took effect
    assert not list(tmp_path.glob("filters_*.png"))  # no_filter_plots took effect
    metrics, history = read_json(tmp_path / "metrics.json"), read_json(tmp_path / "history.json")
    planned = metrics["planned_steps"]
    assert metrics["time_budget_minutes"] == 0.2 and planned > STEPS_PER_EPOCH \
        and metrics["plan"]["total_steps"] == planned
    assert metrics["run_steps"] == planned == sum(row["steps"] for row in history)
    assert len(history) == metrics["epochs_run"] == math.ceil(planned / STEPS_PER_EPOCH)
    assert 0 < history[-1]["steps"] == planned - STEPS_PER_EPOCH * (len(history) - 1) <= STEPS_PER_EPOCH
    last = common.files.load_checkpoint(tmp_path / "last.pt", "ex1_convnet.py")
    plan = common.train.Plan(**last["plan"])
    assert plan.total_steps == planned and common.train.lr_factor(planned, plan) == 0.0  # the schedule's end
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(  # the lr of the last step trained
        2e-3 * common.train.lr_factor(planned - 1, plan))


@pytest.mark.slow
def test_resume_continues_the_plan_without_timing_again_and_counts_the_time_used_before(cifar_dir, tmp_path, capsys,
                                                                                         monkeypatch, no_filter_plots):
    fake_clock(monkeypatch, itertools.count(0.0, 0.1))
    interrupt_validation(monkeypatch, call=2)  # in epoch 2
    code, _, err = call(ex1_convnet.main, budget_run(cifar_dir, tmp_path), capsys)
    assert code == 130, err[-3000:]
    saved = common.files.load_checkpoint(tmp_path / "last.pt", "ex1_convnet.py")
    assert saved["epoch"] == 1 and saved["plan"]["total_steps"] > 2 * STEPS_PER_EPOCH
    used = saved["history"][0]["elapsed_s"]
    assert 0 < used < 6

    resume = [*QUICK, "--data-dir", cifar_dir, "--out-dir", tmp_path, "--resume"]
    code, _, err = call(ex1_convnet.main, [*resume, "--epochs", "5"], capsys)
    assert code == 2 and "--resume continues its plan" in err

    # (interrupt_validation passes every later call on to evaluate) every reading 5 s later: epoch 2 ends past the
    # 6-second budget, which the re-plan sees
    fake_clock(monkeypatch, itertools.count(0.0, 5.0))
    code, out, err = call(ex1_convnet.main, resume, capsys)
    assert code == 0, err[-3000:]
    assert "\nplan: " not in out and not out.startswith("plan: ")  # the saved plan, not a new timing
    assert "re-plan: 2.0 epochs (16 steps)" in out
    metrics, history = read_json(tmp_path / "metrics.json"), read_json(tmp_path / "history.json")
    assert metrics["planned_steps"] == metrics["run_steps"] == 2 * STEPS_PER_EPOCH
    # counted on from the first call's time: the new call's readings are whole multiples of 5 s, `used` is not
    assert (history[1]["elapsed_s"] - used) % 5 == pytest.approx(0, abs=1e-6) and used % 5 > 1e-6


@pytest.mark.parametrize("flags, words", [
    *[(["--time-budget", budget], "--time-budget must be a positive number of minutes") for budget in ("0", "-1",
                                                                                                     "nan", "inf")],
    (["--time-budget", "5", "--epochs", "3"], "--time-budget and --epochs both say how long to train")])
def test_a_budget_that_is_not_a_positive_number_or_comes_with_epochs_is_refused_before_any_work(flags, words, cifar_dir,
                                                                                               tmp_path, capsys):
    argv = [*QUICK, "--data-dir", cifar_dir, "--out-dir", tmp_path / "run", *flags]
    code, _, err = call(ex1_convnet.main, argv, capsys)
    assert code == 2 and words in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_budget_too_short_for_one_step_exits_2_and_overwrite_keeps_the_previous_run(cifar_dir, tmp_path, capsys,
                                                                                      no_filter_plots):
    """0.6 ms: refused once the steps are timed, before anything is written."""
    previous = {"metrics.json": b'{"test_accuracy": 0.5}', "last.pt": b"last", "best.pt": b"best",
                "history.json": b"[]"}
    for name, content in previous.items():
        (tmp_path / name).write_bytes(content)
    code, _, err = call(ex1_convnet.main, [*budget_run(cifar_dir, tmp_path, "0.00001"), "--overwrite"], capsys)
    assert code == 2 and "too short for the 25 steps that time it" in err
    assert {name: (tmp_path / name).read_bytes() for name in previous} == previous


@pytest.mark.parametrize("flags, recipe", [(["--time-budget", "60"], "short"),
                                           (["--time-budget", "60", "--recipe", "default"], "default"),
                                           ([], "default")])
def test_a_budget_trains_the_short_recipe_unless_another_is_named(flags, recipe, tmp_path, fake_runs, capsys):
    # the real driver up to the training
    code, _, err = call(ex1_convnet.main, [*QUICK, "--out-dir", tmp_path, *flags], capsys)
    assert code == 0, err[-3000:]
    seen = fake_runs[0]
    assert seen["recipe"] == recipe  # the name metrics.json records
    assert (seen["dropout"], seen["norm_bias_lr"]) == ((0.0, 8.0) if recipe == "short" else (0.1, 1.0))
    # a budget's model also rotates its pictures a little, which makes it lose less to blur, darkness, downscaling
    assert (seen["augment"], seen["rotate_deg"]) == ((["flip", "crop", "rotate"], 5.0) if recipe == "short"
                                                      else (["flip", "crop"], 15.0))
    assert seen["crop_fill"] == ("reflect" if recipe == "short" else "zeros")  # mirrored borders: 1.1 points more
    assert bool(seen["budget_scaling"]) == (recipe == "short")  # only a budget on the short recipe scales it


# ----------------------------------------------------------------------------- a plan of more than 10 epochs
# The short recipe's crop padding and label smoothing scaled towards the 30-epoch recipe's, for every seed of a sweep,
# unbroken and resumed. The plan is fixed (plan_total_steps stands in for the clock), so runs can be compared.

# 16 epochs of one step (16 training images in one batch): crop padding 3 (from 2), label smoothing 0.157 (from 0.2)
PLANNED = 16


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
    return [*QUICK, "--limit-train", "16", "--batch-size", "16", "--val-size", "16", "--data-dir", cifar_dir,
            "--out-dir", out_dir, "--time-budget", "5", "--no-tensorboard"]


def recorded(run_dir) -> tuple[float, int]:
    settings = read_json(run_dir / "metrics.json")["settings"]
    return round(settings["label_smoothing"], 6), settings["crop_pad"]


@pytest.fixture(scope="module")
def sweep(cifar_dir, tmp_path_factory):
    """A budget sweep of two seeds: its folder and the steps it trained, seed 0's then seed 1's."""
    out_dir = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as monkeypatch, observed_steps(monkeypatch) as steps:
        narrow(monkeypatch)
        assert ex1_convnet.main([str(a) for a in [*budget_flags(cifar_dir, out_dir), "--seeds", "2"]]) == 0
    return out_dir, steps


@pytest.mark.slow
def test_every_epoch_after_the_plan_trains_with_the_settings_each_seed_records(sweep):
    """Seed 0 plans (as a run without --seeds does), seed 1 trains its plan."""
    steps, first, second = sweep[1], sweep[0] / "seed0", sweep[0] / "seed1"
    assert read_json(first / "metrics.json")["run_steps"] == read_json(second / "metrics.json")["run_steps"] == PLANNED
    assert recorded(first) == recorded(second) == (0.157, 3)  # scaled from the short recipe's 0.2 and 2
    assert steps[-2 * PLANNED:] == [recorded(first)] * PLANNED + [recorded(second)] * PLANNED


@pytest.mark.slow
def test_a_budget_run_stopped_after_epoch_3_and_resumed_gives_the_figures_of_the_unbroken_run(
        sweep, cifar_dir, tmp_path, monkeypatch, capsys):
    with observed_steps(monkeypatch):
        interrupt_validation(monkeypatch, call=4)  # epoch 4's validation
        assert ex1_convnet.main([str(a) for a in budget_flags(cifar_dir, tmp_path)]) == 130
        assert common.files.load_checkpoint(tmp_path / "last.pt", "ex1_convnet.py")["epoch"] == 3
        assert ex1_convnet.main([str(a) for a in [*budget_flags(cifar_dir, tmp_path), "--resume"]]) == 0
    assert "resuming after epoch 3" in capsys.readouterr().out
    expected_dir, keys = sweep[0] / "seed0", ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "steps")
    expected, resumed = read_json(expected_dir / "metrics.json"), read_json(tmp_path / "metrics.json")
    assert [[row[k] for k in keys] for row in read_json(tmp_path / "history.json")] == \
        [[row[k] for k in keys] for row in read_json(expected_dir / "history.json")]
    assert (resumed["test_accuracy"], resumed["test_loss"]) == (expected["test_accuracy"], expected["test_loss"])
    assert resumed["settings"] == expected["settings"]
