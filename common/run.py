"""One training run from set-up to report: data, network, optimizer and schedule, the time budget's choices, fit,
the final test and its files.

Imports common.errors, common.files, common.data, common.augment, common.device, common.evaluation, common.budget,
common.train, common.plots, common.report, common.board, common.settings."""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Mapping, NamedTuple, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from .errors import UsageError
from .files import load_checkpoint
from .data import channel_mean_std, CifarData, data_fingerprint, load_cifar10, split_train_val, Splits
from .augment import augmentation, STRENGTH_KEYS
from .device import make_scaler, precision_name, TrainContext
from .evaluation import evaluate, test_results, TestResults
from .budget import make_scheduler, Plan, scaled_by_epochs, steps_per_epoch
from .train import (
    BestEpoch, checkpoint_state, count_parameters, first_conv_weight, fit, Fitted, make_optimizer, parameter_groups,
    patch_whitening_filters, save_epoch_files, set_dropout, Training, TrainStep, WHITEN_EPS)
from .plots import plot_filters, plot_history
from .report import environment_info, write_report
from .board import log_epoch, log_step
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
    return TrainStep(ops, settings.crop_fill, settings.mean, settings.std, settings.label_smoothing,
                     settings.alternate_flip, settings.lookahead)


def first_plan(settings: Settings, steps_per_epoch: int) -> Plan:
    """The plan a run starts with: its epochs' steps, a resumed time budget's last plan, or none yet (None)."""
    if settings.time_budget is None:
        return Plan(steps_per_epoch, settings.epochs * steps_per_epoch)
    return Plan(steps_per_epoch, settings.planned_steps, settings.planned_images_per_s)


def with_plan(settings: Settings, plan: Plan) -> Settings:
    """The settings as a time budget's run records them: with its plan's steps, speed and epochs."""
    if settings.time_budget is None:
        return settings
    return dataclasses.replace(settings, planned_steps=plan.total_steps, planned_images_per_s=plan.images_per_s,
                               epochs=plan.epochs)


def with_budget_choice(settings: Settings, plan: Plan, ctx: TrainContext) -> Settings:
    """Once a time budget's plan knows how many epochs it buys: the settings with the regularisation the recipe's
    budget_scaling gives for that many (the flags given on the command line were taken out of it), the choice
    recorded in budget_choice, and said."""
    scaling = settings.budget_scaling or {}
    if len(scaling) < 2:
        return settings
    epochs = plan.total_steps / plan.steps_per_epoch
    chosen = scaled_by_epochs(scaling, epochs)
    augment = [op for op in settings.augment if op != "crop" or chosen.get("crop_pad", settings.crop_pad) > 0]
    if ctx.is_main:
        few, many = scaling["epochs"]
        tqdm.write(f"plan: for {epochs:.1f} epochs " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in chosen.items())
                   + f" (the recipe's budget_scaling: its {few:g}-epoch values up to {few:g} epochs, its {many:g}-epoch "
                   f"values from {many:g}, on the logarithm of the epochs between; a flag given keeps its value)",
                   file=sys.stdout)
    return dataclasses.replace(settings, **chosen, augment=augment,
                               budget_choice={"planned_epochs": round(epochs, 2), **chosen})


def set_up_training(settings: Settings, build_model: ModelBuilder, plan: Plan, ctx: TrainContext,
                    resume_from: dict | None, train_images: torch.Tensor) -> Training:
    """The network, optimizer, learning-rate schedule (over the `plan`'s steps, as they stand at each step) and
    gradient scaler: new (with whiten, the first filters whitening the patches of `train_images`), or as the checkpoint
    `resume_from` left them; the network wrapped for several processes and compiled if asked."""
    torch.manual_seed(settings.seed)
    model = build_model(settings, initial_weights=resume_from is None)
    if resume_from is None and settings.get("whiten"):
        whitening = patch_whitening_filters(train_images, settings.mean, settings.std,
                                            settings.get("whiten_eps", WHITEN_EPS), settings.get("whiten_directions", 27))
        with torch.no_grad():
            first_conv_weight(model)[:len(whitening)] = whitening
    model = model.to(ctx.device)
    if ctx.is_main:
        print(model)
        print(f"parameters: {count_parameters(model):,}  trainable: "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
        print(f"device: {ctx.device}  precision: {precision_name(ctx.dtype)}  processes: {ctx.world}")
        print("settings: " + json.dumps(recorded_settings(settings)))
    model = model.to(memory_format=torch.channels_last)
    groups = parameter_groups(model, settings.decay_norm_bias, settings.lr, settings.norm_bias_lr)
    optimizer = make_optimizer(groups, settings.optimizer, settings.lr, settings.weight_decay)
    scheduler = make_scheduler(optimizer, plan, settings.schedule, settings.warmup, settings.lr_decay, settings.lr_end)
    scaler = make_scaler(ctx)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        scaler.load_state_dict(resume_from["scaler"])
    train_model = model
    if ctx.world > 1:
        if ctx.device.type == "cuda" and settings.sync_bn:
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if settings.compile:
        train_model = torch.compile(train_model)
    return Training(model, train_model, optimizer, scheduler, scaler)


class FinalTest(NamedTuple):
    """The final test of a run: the best epoch's model (its weights now in the network), the last epoch's accuracy."""
    results: TestResults
    last_accuracy: float


def final_test(script: str, model: nn.Module, fitted: Fitted, data: CifarData, mean: Sequence[float],
               std: Sequence[float], tta: bool, corruption_images: int, out_dir: Path, ctx: TrainContext) -> FinalTest:
    """Test the last epoch's model, then load the best epoch's weights from best.pt and test them (once, when the
    last epoch is the best), with the corruption benchmark on `corruption_images` of the first test images."""
    last_is_best = fitted.best.epoch == len(fitted.history)  # then best.pt holds these very weights
    last = None if last_is_best else evaluate(model, data.test_images, data.test_labels, mean, std, ctx)["accuracy"]
    model.load_state_dict(load_checkpoint(out_dir / "best.pt", script)["model"])
    results = test_results(model, data.test_images, data.test_labels, data.classes, mean, std, ctx, tta,
                           corruption_images)
    return FinalTest(results, results.accuracy if last_is_best else last)


def write_final_report(settings: Settings, model: nn.Module, plan: Plan, fitted: Fitted, tested: FinalTest,
                       resumed_epochs: int, data: CifarData, out_dir: Path, ctx: TrainContext, environment: dict) -> dict:
    """The trained filters, the history, the test figures and metrics.json of a finished run; returns the metrics."""
    history, best = fitted.history, fitted.best
    plot_filters(first_conv_weight(model), out_dir / "filters_after.png",
                 f"first-layer filters after training (epoch {best.epoch})")
    plot_history(history, best.epoch, out_dir / "history.png")
    trained = history[resumed_epochs:]  # the epochs this call trained
    metrics = write_report(
        tested.results, data, model, ctx.device, recorded_settings(settings), environment, out_dir,
        test_accuracy_last=tested.last_accuracy, best_epoch=best.epoch, best_val_accuracy=best.val_accuracy,
        epochs_run=len(history), train_seconds=fitted.seconds, time_budget_minutes=settings.time_budget,
        planned_steps=plan.total_steps, run_steps=sum(r.get("steps", plan.steps_per_epoch) for r in history),
        train_images_per_s=(sum(r["images_per_s"] * r["seconds"] for r in trained)
                            / max(1e-9, sum(r["seconds"] for r in trained))),
        processes=ctx.world,
        precision="+".join(dict.fromkeys(r.get("precision", precision_name(ctx.dtype)) for r in history)))
    print(f"best epoch {best.epoch} (val {best.val_accuracy:.2%}); test {metrics['test_accuracy']:.2%}, first 1000 "
          f"{metrics['test_accuracy_first1000']:.2%}, last epoch's model {tested.last_accuracy:.2%}; reports in {out_dir}")
    return metrics


def train_and_report(script: str, settings: Settings, data: CifarData, splits: Splits, build_model: ModelBuilder,
                     out_dir: Path, ctx: TrainContext, resume_from: dict | None = None, board=None) -> dict:
    """Train with early stopping and checkpoints in `out_dir`, test the best model, write every report; log the
    steps and epochs to the SummaryWriter `board` when given (see common.board)."""
    environment = environment_info(ctx.device)  # the commit that trains, even if the tree moves on meanwhile
    fingerprint = data_fingerprint(splits)
    if resume_from is not None and resume_from.get("data_fingerprint") not in (None, fingerprint):
        raise UsageError(f"--data-dir {settings.data_dir}: the data differs from the data the run in {out_dir} was "
                         f"trained on; resume with that data, or start a new run (--overwrite or another --out-dir)")
    settings = with_data_mean_std(settings, splits.train_images)
    plan = first_plan(settings, steps_per_epoch(len(splits.train_images), settings.batch_size))
    training = set_up_training(settings, build_model, plan, ctx, resume_from, splits.train_images)
    history, best = [], BestEpoch()
    if resume_from is None:
        if ctx.is_main:
            plot_filters(first_conv_weight(training.model), out_dir / "filters_before.png",
                         "first-layer filters before training")
    else:
        history, best = resume_from["history"], BestEpoch(resume_from["best_epoch"], resume_from["best_val_accuracy"])
        if ctx.is_main:
            print(f"resuming after epoch {len(history)} of {settings.epochs} (best so far: epoch {best.epoch})")
    chosen = settings  # with the choices a time budget's plan makes (with_budget_choice)

    def on_plan() -> TrainStep:
        nonlocal chosen
        chosen = with_budget_choice(chosen, plan, ctx)
        if "dropout" in (chosen.budget_choice or {}):
            set_dropout(training.model, chosen["dropout"])
        return train_step(chosen)

    def save_epoch(history: list[dict], best: BestEpoch, improved: bool) -> None:
        checkpoint = checkpoint_state(script, dict(with_plan(chosen, plan)), training, history, best, fingerprint,
                                      data.classes)
        save_epoch_files(checkpoint, improved, out_dir)
        if board is not None:
            log_epoch(board, history)

    fitted = fit(training, splits, plan, train_step(settings), settings.seed, settings.batch_size, settings.patience,
                 settings.time_budget, not settings.plan_from, history, best, ctx, on_plan, save_epoch,
                 functools.partial(log_step, board) if board is not None else None)
    if not ctx.is_main:
        return {}
    tested = final_test(script, training.model, fitted, data, settings.mean, settings.std, settings.tta,
                        settings.corruptions, out_dir, ctx)
    return write_final_report(with_plan(chosen, plan), training.model, plan, fitted, tested, len(history), data,
                              out_dir, ctx, environment)
