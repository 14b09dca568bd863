"""One training run from set-up to report, top to bottom: data, network and optimizer, the plan (a time budget's
made from its first steps), the settings every epoch trains with, fit, the final test and its files.

Imports common.errors, common.files, common.data, common.augment, common.device, common.evaluation,
common.budget, common.train, common.plots, common.report, common.board, common.settings."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Mapping, NamedTuple, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UsageError
from .files import load_checkpoint, save_checkpoint, save_json
from .data import channel_mean_std, CifarData, data_fingerprint, load_cifar10, split_train_val, Splits
from .augment import augmentation, STRENGTH_KEYS
from .device import make_scaler, precision_name, TrainContext
from .evaluation import CORRUPTION_PASSES, CORRUPTION_SHARE, evaluate, first_test_images, test_results, TestResults
from .budget import budget_plan, Plan, say
from .train import (
    BestEpoch, checkpoint_state, count_parameters, first_conv_weight, fit, Fitted, make_optimizer, parameter_groups,
    set_dropout, timed_steps, Training, TRAINING_STATE, TrainStep)
from .plots import plot_filters, plot_history
from .report import environment_info, write_report
from .board import log_epoch, log_step, trained_steps
from .settings import recorded_settings, Settings


class ModelBuilder(Protocol):
    """How a script builds its network from a run's settings (its Settings, or the dict a checkpoint saved). With
    `initial_weights` False a checkpoint's weights replace the new ones at once, so a builder need not fetch any
    starting weights (ex2's ImageNet download)."""

    def __call__(self, settings: Mapping, *, initial_weights: bool = True) -> nn.Module: ...


def load_training_data(settings: Settings, ctx: TrainContext) -> tuple[CifarData, Splits]:
    """The data set and its training and validation splits, checked to give a full batch."""
    if ctx.world > 1 and ctx.rank != 0:
        dist.barrier()  # rank 0 downloads first
    data = load_cifar10(settings.data_dir, download=not settings.no_download)
    if ctx.world > 1 and ctx.rank == 0:
        dist.barrier()
    splits = Splits(*split_train_val(data, settings.val_size, settings.limit_train))
    if settings.batch_size % ctx.world:
        raise UsageError(f"--batch-size {settings.batch_size} must be divisible by the {ctx.world} processes")
    if len(splits.train_images) < settings.batch_size:
        raise UsageError(f"{len(splits.train_images)} training images (after --val-size/--limit-train) leave no full "
                         f"batch of {settings.batch_size}; lower --batch-size or train on more images")
    return data, splits


def with_data_mean_std(settings: Settings, train_images: torch.Tensor) -> Settings:
    """The settings in which mean and std 'data' became the training images' channel mean and std."""
    if settings.mean != "data":
        return settings
    mean, std = channel_mean_std(train_images)
    return dataclasses.replace(settings, mean=mean, std=std)


def train_step(settings: Settings) -> TrainStep:
    """What each training step applies, from the settings."""
    ops = augmentation(settings.augment, {op: settings[key] for op, key in STRENGTH_KEYS.items()})
    return TrainStep(ops, settings.crop_fill, settings.mean, settings.std, settings.label_smoothing)


def first_plan(settings: Settings, steps_per_epoch: int, saved: dict | Plan | None) -> Plan:
    """The plan a run starts with: its epochs' steps; under a time budget the `saved` one (a resumed run's own, or
    another run's that a sweep hands on), else one still to make (its total None)."""
    plan = Plan(settings.batch_size, steps_per_epoch, None, settings.lr_decay, settings.time_budget)
    if settings.time_budget is None:
        return plan._replace(total_steps=settings.epochs * steps_per_epoch)
    return Plan(**saved) if isinstance(saved, dict) else saved or plan


def settings_for_plan(settings: Settings, plan: Plan) -> Settings:
    """The settings every epoch of the run trains with and records: with the values a time budget's plan chose
    (crop off where its padding became 0)."""
    if not plan.chosen:
        return settings
    crop_pad = plan.chosen.get("crop_pad", settings.crop_pad)
    augment = [op for op in settings.augment if op != "crop" or crop_pad]
    return dataclasses.replace(settings, **plan.chosen, augment=augment)


def set_up_training(settings: Settings, build_model: ModelBuilder, ctx: TrainContext, resume_from: dict | None
                    ) -> Training:
    """The network, optimizer and gradient scaler: new, or as the checkpoint `resume_from` left them (its scaler's
    state only where both runs scale: fp16); the network wrapped for several processes and compiled if asked."""
    torch.manual_seed(settings.seed)
    model = build_model(settings, initial_weights=resume_from is None).to(ctx.device)
    if ctx.is_main:
        print(model)
        print(f"parameters: {count_parameters(model):,}  trainable: "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
        print(f"device: {ctx.device}  precision: {precision_name(ctx.dtype)}  processes: {ctx.world}")
        print("settings: " + json.dumps(recorded_settings(settings)))
    model = model.to(memory_format=torch.channels_last)
    groups = parameter_groups(model, settings.lr, settings.norm_bias_lr)
    optimizer = make_optimizer(groups, settings.optimizer, settings.lr, settings.weight_decay)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    scaler = make_scaler(ctx)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        if resume_from.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(resume_from["scaler"])
    train_model = model
    if ctx.world > 1:
        if ctx.device.type == "cuda":
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if settings.compile:
        train_model = torch.compile(train_model)
    return Training(model, train_model, optimizer, scaler, peak_lrs)


SAVE_EVERY_S = 30.0  # the most wall-clock seconds between two writes of a run's checkpoints


class EpochFiles:
    """A training run's last.pt, best.pt and history.json as of its latest epoch: written after the first epoch and
    when SAVE_EVERY_S have passed since the last write, else held in memory until then or until flush (the run's
    end, an early stop, Ctrl-C, an error), so that a fast GPU does not wait for the disk and a crash loses about
    SAVE_EVERY_S at most. The first epoch of a new run removes the metrics.json an --overwrite replaces."""

    def __init__(self, script: str, settings: dict, training: Training, fingerprint: str, classes: Sequence[str],
                 out_dir: Path, board=None):
        self.checkpoint = functools.partial(checkpoint_state, script, settings, training)
        self.fingerprint, self.classes, self.out_dir, self.board = fingerprint, list(classes), out_dir, board
        self.last = self.best = None  # what is not written yet
        self.written_at = -math.inf  # the first epoch is written: a run can be resumed from early on

    def epoch(self, history: list[dict], best: BestEpoch, improved: bool, plan: Plan) -> None:
        if history[-1]["epoch"] == 1:
            (self.out_dir / "metrics.json").unlink(missing_ok=True)
        if self.board is not None:
            log_epoch(self.board, history)
        checkpoint = self.checkpoint(history, best, plan, self.fingerprint, self.classes)
        due = time.perf_counter() - self.written_at >= SAVE_EVERY_S
        self.last = checkpoint if due else copy.deepcopy(checkpoint)  # its tensors no longer follow the training
        if improved:  # testing needs no optimizer state: best.pt is a third of last.pt's size and write time
            self.best = {k: v for k, v in self.last.items() if k not in TRAINING_STATE}
        if due:
            self.flush()

    def flush(self) -> float:
        """Write what is held; returns the seconds it took."""
        start, (last, best), self.last, self.best = time.perf_counter(), (self.last, self.best), None, None
        if best is not None:
            save_checkpoint(best, self.out_dir / "best.pt")
        if last is not None:
            save_checkpoint(last, self.out_dir / "last.pt")
            save_json(last["history"], self.out_dir / "history.json")
        self.written_at = time.perf_counter()
        return self.written_at - start


class FinalTest(NamedTuple):
    """The final test of a run: the best epoch's model (its weights now in the network), the last epoch's accuracy."""
    results: TestResults
    last_accuracy: float


def final_test(script: str, model: nn.Module, fitted: Fitted, data: CifarData, mean: Sequence[float],
               std: Sequence[float], tta: bool, corruptions: int | None, out_dir: Path, ctx: TrainContext) -> FinalTest:
    """Test the last epoch's model, then load the best epoch's weights from best.pt and test them (once, when the
    last epoch is the best), with the corruption benchmark on `corruptions` of the first test images (None: as
    many as a tenth of the training time affords, see corruption_images)."""
    last_is_best = fitted.best.epoch == len(fitted.history)  # then best.pt holds these very weights
    last = None if last_is_best else evaluate(model, data.test_images, data.test_labels, mean, std, ctx)["accuracy"]
    model.load_state_dict(load_checkpoint(out_dir / "best.pt", script)["model"])
    results = test_results(model, data.test_images, data.test_labels, data.classes, mean, std, ctx, tta, corruptions,
                           sum(row["seconds"] for row in fitted.history))
    return FinalTest(results, results.accuracy if last_is_best else last)


def write_final_report(settings: Settings, model: nn.Module, fitted: Fitted, tested: FinalTest, resumed_epochs: int,
                       data: CifarData, out_dir: Path, ctx: TrainContext, environment: dict) -> dict:
    """The trained filters, the history, the test figures and metrics.json of a finished run; returns the metrics."""
    history, best, plan = fitted.history, fitted.best, fitted.plan
    plot_filters(first_conv_weight(model), out_dir / "filters_after.png",
                 f"first-layer filters after training (epoch {best.epoch})")
    plot_history(history, best.epoch, out_dir / "history.png")
    save_json(history, out_dir / "history.json")  # with the last epoch's seconds of saving
    trained = history[resumed_epochs:]  # the epochs this call trained
    metrics = write_report(
        tested.results, data, model, ctx.device, recorded_settings(settings), environment, out_dir,
        test_accuracy_last=tested.last_accuracy, best_epoch=best.epoch, best_val_accuracy=best.val_accuracy,
        epochs_run=len(history), train_seconds=fitted.seconds, time_budget_minutes=settings.time_budget,
        planned_steps=plan.total_steps, run_steps=sum(r.get("steps", plan.steps_per_epoch) for r in history),
        train_images_per_s=(sum(r["images_per_s"] * r["seconds"] for r in trained)
                            / max(1e-9, sum(r["seconds"] for r in trained))),
        save_seconds=sum(r.get("save_s", 0.0) for r in history), processes=ctx.world, plan=plan._asdict(),
        peak_memory_mb=torch.cuda.max_memory_allocated(ctx.device) / 2 ** 20 if ctx.device.type == "cuda" else None,
        precision="+".join(dict.fromkeys(r.get("precision", precision_name(ctx.dtype)) for r in history)))
    print(f"best epoch {best.epoch} (val {best.val_accuracy:.2%}); test {metrics['test_accuracy']:.2%}, first 1000 "
          f"{metrics['test_accuracy_first1000']:.2%}, last epoch's model {tested.last_accuracy:.2%}; reports in {out_dir}")
    return metrics


def duration(seconds: float) -> str:
    """'3 h 05 min', '12 min', '40 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def how_long(plan: Plan, steps_left: int, images_per_s: float, val_images: int, test_images: int,
             corruptions: int | None) -> str:
    """The line that says how long a run of epochs takes at `images_per_s`: its `steps_left`, a validation pass
    after each epoch, the test and the corruption benchmark (a forward pass: about a third of a step); over an hour,
    it names --time-budget."""
    step_s = plan.batch_size / images_per_s
    forward_s = step_s / plan.batch_size / 3  # an image's
    train_s = steps_left * step_s
    val_s = -(-steps_left // plan.steps_per_epoch) * val_images * forward_s
    corrupted = first_test_images(test_images) if corruptions is None else min(corruptions, test_images)
    corruption_s = CORRUPTION_PASSES * corrupted * forward_s
    test_s = test_images * forward_s + (min(corruption_s, CORRUPTION_SHARE * train_s) if corruptions is None
                                        else corruption_s)
    total = train_s + val_s + test_s
    return (f"how long: about {duration(total)} at {images_per_s:.0f} images/s (training {duration(train_s)}, "
            f"validation {duration(val_s)}, test and corruption benchmark {duration(test_s)})"
            + ("; --time-budget MINUTES chooses how long instead" if total > 3600 else ""))


def step_logger(board, plan: Plan, steps_done: int, splits: Splits, data: CifarData, corruptions: int | None,
                ctx: TrainContext):
    """log_step for train_one_epoch: the steps' figures to TensorBoard's `board` (when given), and once, after about
    50 steps or 20 seconds of a run of epochs, how long it will take (how_long)."""
    told = [plan.budget_minutes is not None or not ctx.is_main]  # a time budget's plan line says it

    def log(step: int, values: dict) -> None:
        if board is not None:
            log_step(board, step, values)
        trained = step - steps_done
        if not told[0] and (trained >= 50 or trained * plan.batch_size / values["images_per_s"] >= 20):
            told[0] = True
            say(ctx, how_long(plan, plan.total_steps - steps_done, values["images_per_s"], len(splits.val_images),
                              len(data.test_labels), corruptions))
    return log


def resumed_state(resume_from: dict | None, model: nn.Module, plan: Plan, out_dir: Path, ctx: TrainContext
                  ) -> tuple[list[dict], BestEpoch]:
    """(history, best epoch) a run starts from: a resumed run's, said; a new run's empty ones, its filters drawn."""
    if resume_from is None:
        if ctx.is_main:
            plot_filters(first_conv_weight(model), out_dir / "filters_before.png",
                         "first-layer filters before training")
        return [], BestEpoch()
    best = BestEpoch(resume_from["best_epoch"], resume_from["best_val_accuracy"])
    say(ctx, f"resuming after epoch {len(resume_from['history'])} of {plan.epochs} (best so far: epoch {best.epoch})")
    return resume_from["history"], best


def train_and_report(script: str, settings: Settings, data: CifarData, splits: Splits, build_model: ModelBuilder,
                     out_dir: Path, ctx: TrainContext, resume_from: dict | None = None, board=None,
                     plan: Plan | None = None) -> dict:
    """Train with early stopping and checkpoints in `out_dir`, test the best model, write every report; log the
    steps and epochs to the SummaryWriter `board` when given (see common.board). Under a time budget `plan` is
    another run's (a sweep's first) to train as it is, else its first steps make one."""
    environment = environment_info(ctx.device)  # the commit that trains, even if the tree moves on meanwhile
    fingerprint = data_fingerprint(splits)
    if resume_from is not None and resume_from.get("data_fingerprint") not in (None, fingerprint):
        raise UsageError(f"--data-dir {settings.data_dir}: the data differs from the data the run in {out_dir} was "
                         f"trained on; resume with that data, or start a new run (--overwrite or another --out-dir)")
    settings = with_data_mean_std(settings, splits.train_images)
    splits = splits._replace(train_images=splits.train_images.to(ctx.device),
                             train_labels=splits.train_labels.to(ctx.device))
    saved_plan = plan or (resume_from or {}).get("plan")
    plan = first_plan(settings, len(splits.train_images) // settings.batch_size, saved_plan)
    training = set_up_training(settings, build_model, ctx, resume_from)
    start = resumed_state(resume_from, training.model, plan, out_dir, ctx)
    if plan.total_steps is None:  # a time budget: time its first steps, then plan
        step_s, spent_s = timed_steps(training, (splits.train_images, splits.train_labels), train_step(settings),
                                      plan, settings.seed, ctx)
        plan = budget_plan(plan, step_s, spent_s, len(splits.val_images), settings.budget_scaling, ctx)
    settings = settings_for_plan(settings, plan)  # what every epoch trains with, and what the run records
    if "dropout" in (plan.chosen or {}):
        set_dropout(training.model, settings["dropout"])
    files = EpochFiles(script, dict(settings), training, fingerprint, data.classes, out_dir, board)
    try:
        fitted = fit(training, splits, plan, train_step(settings), settings.seed, settings.patience, start, ctx,
                     files.epoch, step_logger(board, plan, trained_steps(start[0]), splits, data, settings.corruptions,
                                              ctx))
    finally:
        flushed = files.flush()
    fitted.history[-1]["save_s"] = fitted.history[-1].get("save_s", 0.0) + flushed  # the last epoch's last write
    if not ctx.is_main:
        return {}
    tested = final_test(script, training.model, fitted, data, settings.mean, settings.std, settings.tta,
                        settings.corruptions, out_dir, ctx)
    return write_final_report(settings, training.model, fitted, tested, len(start[0]), data, out_dir, ctx, environment)
