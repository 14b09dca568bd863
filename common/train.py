"""The training run in the order it happens (train_run): the run folder, the data, the plan (steps, learning rate; a
time budget's from its first timed steps), the network and optimizer, then epoch after epoch train_one_epoch (shuffle,
augment, forward, loss, backward; a pause to save every minute or on a signal), validate, save; the test and reports."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Mapping, NamedTuple, TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import files
from .board import log_end, log_epoch, open_board, trained_steps
from .data import (
    augment_batch,
    augmentation,
    channel_mean_std,
    data_fingerprint,
    epoch_batches,
    epoch_seed,
    load_training_data,
    normalize,
    parse_augment,
)
from .device import autocast, precision_name, resumed_precision, say, share_from_rank0, synchronize, TrainContext
from .evaluation import Estimate, evaluate, how_long, test_results, validate, write_report
from .files import UsageError
from .plots import plot_filters, plot_history

if TYPE_CHECKING:
    from .cli import Settings

PLAN_WARMUP, PLAN_STEPS = 5, 20  # a --time-budget run times PLAN_STEPS steps after PLAN_WARMUP to plan its total
WARMUP = 0.2  # the one-cycle schedule's rise: this fraction of the steps
LOG_EVERY = 25  # steps between the progress bar's readings of the device's sums (and TensorBoard's step scalars)
ESTIMATE_AFTER_S = 10.0  # the line that says how long a run takes: from this many seconds of steps after the first
SAVE_EVERY_S = 30.0  # the most wall-clock seconds between two writes of a run's checkpoints at the end of epochs
IN_EPOCH_SAVE_S = 60.0  # the most seconds of training lost to a kill: last.pt is written inside an epoch this often,
SAVE_SHARE = 0.02  # ... or less often where writing it would take more than this share of the time (a fast GPU)
# One row of history.json: elapsed_s is the run's wall-clock time (training, validation, saving) at the epoch's end.
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "steps", "seconds",
                "images_per_s", "elapsed_s", "precision")


# How long a run trains, and at what learning rate.

class Plan(NamedTuple):
    """How long a run trains and at what learning rate: epochs x steps per epoch, or what a time budget buys (its
    total None until its first steps are timed). Never changed: a re-plan is a new Plan."""
    batch_size: int
    steps_per_epoch: int  # full batches only (a last partial batch is left out)
    total_steps: int | None
    lr_decay: float | None = None  # the learning rate x lr_decay after every epoch; None: the one-cycle schedule
    budget_minutes: float | None = None
    images_per_s: float | None = None  # the speed a time budget's plan was last made at
    spent_s: float = 0.0  # the seconds of the timed steps before the first epoch
    chosen: dict | None = None  # the settings a time budget's plan chose for its epochs (see choose_settings)
    fixed: bool = False  # another run's plan, trained as it is: never re-planned

    @property
    def epochs(self) -> int | None:
        """Epochs the plan reaches, the last of them perhaps partial (None before a time budget's plan)."""
        return None if self.total_steps is None else -(-self.total_steps // self.steps_per_epoch)

    def epoch_steps(self, epoch: int) -> int:
        """Steps of `epoch`: a full epoch, or what the total leaves for its last, partial one."""
        if self.total_steps is None:
            return self.steps_per_epoch
        return max(0, min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch))


def lr_factor(step: int, plan: Plan) -> float:
    """Learning-rate multiplier at `step`: one-cycle over the plan's total steps (linear from 0.1 up to 1 over the
    first WARMUP of them, then down to 0), or lr_decay per epoch. Before a time budget's plan: the first value."""
    if plan.lr_decay is not None:
        return plan.lr_decay ** (max(0, step) // plan.steps_per_epoch)
    if plan.total_steps is None:
        return 0.1
    warm = max(1, int(WARMUP * plan.total_steps))
    return float(np.interp(step, [0, warm, plan.total_steps], [0.1, 1.0, 0.0]))


def plan_total_steps(budget_s: float, elapsed_s: float, step_s: float, val_s: float, steps_done: int,
                     steps_per_epoch: int, epochs_validated: int = 0) -> int:
    """The most steps a budget holds: those done, then `step_s` each, plus `val_s` per epoch past `epochs_validated`."""
    left = budget_s - elapsed_s

    def cost(total: int) -> float:
        return (total - steps_done) * step_s + (-(-total // steps_per_epoch) - epochs_validated) * val_s

    low, high = steps_done, steps_done + max(0, int(left / step_s))
    while low < high:  # the cost grows with the total: the largest total it affords
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= left else (low, middle - 1)
    return low


def choose_settings(scaling: dict | None, epochs: float) -> dict:
    """The settings for `epochs` epochs from a recipe's budget_scaling {"epochs": [few, many], key: [value at few, at
    many], ...}: interpolated on log(epochs), held at the ends, crop_pad rounded; none without a key besides epochs."""
    if not scaling or len(scaling) < 2:
        return {}
    few, many = scaling["epochs"]
    t = min(1.0, max(0.0, math.log(max(epochs, 1e-9) / few) / math.log(many / few)))
    chosen = {key: low + t * (high - low) for key, (low, high) in scaling.items() if key != "epochs"}
    return {key: round(value) if key == "crop_pad" else round(value, 3) for key, value in chosen.items()}


def budget_plan(plan: Plan, step_s: float, spent_s: float, val_images: int, scaling: dict | None,
                ctx: TrainContext) -> Plan:
    """A time budget's plan, said, from its timed steps (`step_s` each, `spent_s` in all; rank 0's): the total steps
    it holds with a validation pass after every epoch, and the settings `scaling` gives for that many epochs."""
    budget_s = plan.budget_minutes * 60
    step_s = share_from_rank0(step_s, ctx)
    val_s = step_s * ctx.world * val_images / plan.batch_size / 3  # a forward pass: about a third of a step
    total = share_from_rank0(plan_total_steps(budget_s, spent_s, step_s, val_s, 0, plan.steps_per_epoch), ctx)
    if total == 0:
        raise UsageError(f"--time-budget {plan.budget_minutes:g} minutes is too short for the "
                         f"{PLAN_WARMUP + PLAN_STEPS} steps that time it (they took {spent_s:.1f} s) and one step of "
                         "training with its validation")
    epochs = total / plan.steps_per_epoch
    planned = plan._replace(total_steps=total, images_per_s=plan.batch_size / step_s, spent_s=spent_s,
                            chosen=choose_settings(scaling, epochs))
    say(ctx, f"plan: {plan.budget_minutes:g} min ≈ {epochs:.1f} epochs ({total} steps of {plan.batch_size}) at "
             f"{planned.images_per_s:.0f} images/s" + "".join(
                 f", {key.replace('_', ' ')} {value:g}" for key, value in planned.chosen.items()))
    return planned


def replan(plan: Plan, elapsed_s: float, steps_done: int, step_s: float, epoch_extra_s: float,
           ctx: TrainContext) -> Plan:
    """After an epoch under a time budget: the total steps set anew from the time used and the last epoch's speed and
    extra seconds (validation, saving), so that the run ends on time; the schedule follows, the chosen settings stay."""
    total = share_from_rank0(plan_total_steps(
        plan.budget_minutes * 60, elapsed_s, step_s, epoch_extra_s, steps_done, plan.steps_per_epoch,
        epochs_validated=steps_done // plan.steps_per_epoch), ctx)
    if total != plan.total_steps:
        say(ctx, f"re-plan: {total / plan.steps_per_epoch:.1f} epochs ({total} steps) at "
                 f"{plan.batch_size / step_s:.0f} images/s, {elapsed_s / 60:.1f} of {plan.budget_minutes:g} min used")
    return plan._replace(total_steps=total)


def settings_for_plan(settings: Settings, plan: Plan) -> Settings:
    """The settings the run trains with and records: with its plan's choices (crop off where its padding is 0)."""
    if not plan.chosen:
        return settings
    crop_pad = plan.chosen.get("crop_pad", settings.crop_pad)
    augment = [op for op in settings.augment if op != "crop" or crop_pad]
    return dataclasses.replace(settings, **plan.chosen, augment=augment)


# The training run.

def train_run(script: str, settings: Settings, flags_given: dict, build_model, out_dir: Path, ctx: TrainContext,
              plan: Plan | None = None) -> dict | None:
    """Train in `out_dir`: a new run, or continue the unfinished one from its last.pt (--resume; with more --epochs,
    a finished one). Under a time budget `plan` is a sweep's first run's, else the first steps make one. Returns the
    metrics (empty on torchrun's other processes, None when there was nothing to train)."""
    # The run folder: what it holds decides between a new run and a resumed one.
    finished, unfinished = (out_dir / "metrics.json").exists(), (out_dir / "last.pt").exists()
    if finished and unfinished and "epochs" in flags_given:  # --resume --epochs N extends a finished run
        finished = flags_given["epochs"] <= len(json.loads((out_dir / "history.json").read_text()))
    resume_from = None
    if settings.resume and finished:
        say(ctx, f"{out_dir} holds a finished run (metrics.json); nothing to resume")
        return None
    if settings.resume:
        if not unfinished:
            raise UsageError(f"nothing to resume in {out_dir}: it has no last.pt (start without --resume)")
        resume_from = files.load_checkpoint(out_dir / "last.pt", script)
        settings = resumed_settings(settings, flags_given, resume_from["settings"])
        ctx = resumed_precision(ctx, resume_from, "precision" in flags_given)
    elif (finished or unfinished) and not settings.overwrite:
        what = "a finished run (metrics.json)" if finished else "an unfinished run (last.pt); --resume continues it"
        raise UsageError(f"{out_dir} already holds {what}; pass --overwrite to start over, or choose another --out-dir")
    with contextlib.ExitStack() as stack:
        stack.enter_context(files.run_folder(out_dir, ctx.is_main))
        if ctx.is_main:  # one run a folder; its console into train.log
            stack.enter_context(files.run_dir_lock(out_dir))
            for stale in out_dir.glob(".*.tmp"):  # temporary files of atomic_write left by a run killed while saving
                stale.unlink(missing_ok=True)
        data, splits = load_training_data(settings, ctx)
        in_epoch = (resume_from or {}).get("in_epoch")  # last.pt saved inside an epoch
        resumed_steps = resume_from and trained_steps(resume_from["history"]) + (in_epoch or {}).get("step", 0)
        board = stack.enter_context(open_board(out_dir, resumed_steps, f"python {shlex.join(sys.argv)}",
                                               settings.recorded())) if ctx.is_main and settings.tensorboard else None
        log = stack.enter_context(files.tee_console(out_dir / "train.log", enabled=ctx.is_main))
        stack.enter_context(files.what_a_stop_keeps(out_dir))
        environment = files.environment_info(ctx.device)  # the commit that trains, even if the tree moves on meanwhile
        fingerprint = data_fingerprint(splits)
        if resume_from is not None and resume_from.get("data_fingerprint") not in (None, fingerprint):
            raise UsageError(f"--data-dir {settings.data_dir}: the data differs from the data the run in {out_dir} "
                             "was trained on; resume with that data, or start a new run (--overwrite or another "
                             "--out-dir)")
        if settings.mean == "data":
            mean, std = channel_mean_std(splits.train_images)
            settings = dataclasses.replace(settings, mean=mean, std=std)
        images, labels = splits.train_images.to(ctx.device), splits.train_labels.to(ctx.device)

        # The plan: epochs x steps; a resumed run's or a sweep's own; or what a time budget's first steps buy.
        steps_per_epoch = len(images) // settings.batch_size
        plan = plan or (resume_from or {}).get("plan")
        if settings.time_budget is None:
            plan = Plan(settings.batch_size, steps_per_epoch, settings.epochs * steps_per_epoch, settings.lr_decay)
        elif plan is not None:
            plan = Plan(**plan) if isinstance(plan, dict) else plan
        else:
            plan = Plan(settings.batch_size, steps_per_epoch, None, settings.lr_decay, settings.time_budget)
            step_s, spent_s = time_steps(settings, build_model, images, labels, plan, ctx)
            plan = budget_plan(plan, step_s, spent_s, len(splits.val_images), settings.budget_scaling, ctx)
        settings = settings_for_plan(settings, plan)  # what every epoch trains with, and what the run records

        # The network, its optimizer and gradient scaler: new, or as last.pt left them (inside an epoch: `progress`).
        training = set_up_training(settings, build_model, ctx, resume_from, out_dir / "last.pt")
        model = training.model
        if log is not None:  # the network and every setting in train.log; on the console what this run is
            print(f"{model}\nsettings: {json.dumps(settings.recorded())}", file=log)
            given = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in flags_given.items()
                             if key not in settings.runtime_keys() and key not in ("recipe", "epochs", "time_budget"))
            length = f"{plan.epochs} epoch{'s' * (plan.epochs != 1)}" if plan.budget_minutes is None \
                else f"time budget {plan.budget_minutes:g} min"
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            size = f"{total:,} parameters" + (f" ({trainable:,} trainable)" if trainable < total else "")
            print(f"{script}: recipe {settings.recipe}, {length}, {size}, {ctx.device}, "
                  f"{precision_name(ctx.dtype)}" + (f", {ctx.world} processes" if ctx.world > 1 else "")
                  + (f"; given: {given}" if given else "") + f"; the network and settings in {log.name}")
        if in_epoch and len(in_epoch["ranks"]) != ctx.world:
            raise UsageError(f"{out_dir / 'last.pt'} was saved inside epoch {in_epoch['epoch']} by "
                             f"{len(in_epoch['ranks'])} processes: resume it with as many (torchrun --nproc_per_node)")
        progress = in_epoch and in_epoch["ranks"][ctx.rank]
        if resume_from is None:
            history, best = [], BestEpoch()
            if ctx.is_main:
                plot_filters(model, out_dir / "filters_before.png", "first-layer filters before training")
        else:
            history, best = resume_from["history"], BestEpoch(resume_from["best_epoch"],
                                                              resume_from["best_val_accuracy"])
            at = f"at epoch {len(history) + 1} of {plan.epochs}, step {progress['step']} of " \
                 f"{plan.epoch_steps(len(history) + 1)}" if progress else f"after epoch {len(history)} of {plan.epochs}"
            say(ctx, f"resuming {at}" + (f" (best so far: epoch {best.epoch})" if best.epoch else ""))
        resumed_epochs = len(history)
        estimate = None if plan.budget_minutes is not None or not ctx.is_main else Estimate(
            plan.total_steps - trained_steps(history) - (progress or {}).get("step", 0), len(splits.val_images),
            len(data.test_labels), settings.corruptions)

        # The epochs: train (pausing to save the run every IN_EPOCH_SAVE_S or on SIGINT/SIGTERM), validate, keep the
        # best, save; early stop; a time budget re-plans after each.
        signals = stack.enter_context(contextlib.ExitStack())  # closed after the epochs: Ctrl-C then stops the test
        stop = files.stop_on_signals(signals)  # stop["signal"]: a SIGINT or SIGTERM that asks the run to save and stop
        clock = time.perf_counter()
        earlier_s = in_epoch["elapsed_s"] if in_epoch else history[-1].get("elapsed_s", 0.0) if history \
            else plan.spent_s  # before this call
        held = {}  # checkpoints not written yet: at most every SAVE_EVERY_S, so that a fast GPU waits for no disk
        written_at = -math.inf  # the first epoch is written at once: a run can be resumed from early on
        pause_at, save_s = clock + IN_EPOCH_SAVE_S, 0.0  # the next in-epoch save, and what the last one cost
        kept = f"{out_dir / 'last.pt'} holds it; resume with: python {files.resume_command(True)}"  # after a stop
        epoch = len(history)
        try:
            while epoch < plan.epochs:  # a re-plan may move the last epoch
                epoch += 1
                if settings.patience and best.epoch is not None and epoch - 1 - best.epoch >= settings.patience:
                    say(ctx, f"early stop: no better validation accuracy for {settings.patience} epochs")
                    break
                epoch_start = time.perf_counter() - (progress["seconds"] if progress else 0.0)
                row = {"epoch": epoch, "lr": training.peak_lrs[0] * lr_factor((epoch - 1) * plan.steps_per_epoch, plan)}
                epoch_save_s = 0.0  # the epoch's in-epoch saves
                while True:  # the epoch, in pieces between the in-epoch saves
                    result = train_one_epoch(training, images, labels, settings, plan, epoch, ctx, board,
                                             estimate if epoch == resumed_epochs + 1 else None, progress=progress,
                                             pause_at=pause_at, stop=stop)
                    progress, estimate = result.get("progress"), None
                    if progress is None:
                        break
                    saving, ranks = time.perf_counter(), [progress]
                    if ctx.world > 1:  # every process's streams and sums, in one state
                        ranks = [None] * ctx.world
                        dist.all_gather_object(ranks, progress)
                    if ctx.is_main:  # last.pt at this step; the epochs' checkpoints held till now written first
                        held.pop("last", None)
                        files.write_checkpoints(held, out_dir)
                        files.write_checkpoints({"last": {**files.checkpoint_state(
                            script, dict(settings), training, history, best, plan, fingerprint, data.classes),
                            "in_epoch": {"epoch": epoch, "step": progress["step"], "ranks": ranks,
                                         "elapsed_s": earlier_s + saving - clock}}}, out_dir)
                        written_at = time.perf_counter()
                        save_s = written_at - saving
                        epoch_save_s += save_s
                    pause_at = time.perf_counter() + max(IN_EPOCH_SAVE_S, save_s * (1 - SAVE_SHARE) / SAVE_SHARE)
                    if stop["signal"] is not None:
                        raise files.Stopped(stop["signal"], f"stopped at epoch {epoch}, step {progress['step']} of "
                                                            f"{plan.epoch_steps(epoch)}: {kept}")
                row.update(result)
                row["val_loss"], row["val_accuracy"] = validate(model, splits, settings.mean, settings.std, ctx)
                row.update(precision=precision_name(ctx.dtype), elapsed_s=earlier_s + time.perf_counter() - clock)
                history.append({k: row[k] for k in HISTORY_KEYS})
                improved = row["val_accuracy"] > best.val_accuracy
                best = BestEpoch(epoch, row["val_accuracy"]) if improved else best
                say(ctx, f"epoch {epoch:3d}/{plan.epochs}  train loss {row['train_loss']:.4f} "
                         f"acc {row['train_accuracy']:.2%}  val loss {row['val_loss']:.4f} "
                         f"acc {row['val_accuracy']:.2%}  lr {row['lr']:.2e}  {row['seconds']:.1f}s  "
                         f"{row['images_per_s']:.0f} img/s" + ("  *best" if improved else ""))
                if ctx.is_main:  # the epoch's checkpoints: held, and written when SAVE_EVERY_S have passed
                    save_start = time.perf_counter()
                    if epoch == 1:
                        (out_dir / "metrics.json").unlink(missing_ok=True)  # of the run an --overwrite replaces
                    if board is not None:
                        log_epoch(board, history)
                    due = save_start - written_at >= SAVE_EVERY_S
                    last = files.checkpoint_state(script, dict(settings), training, history, best, plan,
                                                  fingerprint, data.classes)
                    held["last"] = last if due else copy.deepcopy(last)  # its tensors no longer follow the training
                    if improved:  # testing needs no optimizer state: best.pt is a third of last.pt's size
                        held["best"] = {k: v for k, v in held["last"].items() if k not in files.TRAINING_STATE}
                    if due:
                        files.write_checkpoints(held, out_dir)
                        written_at = time.perf_counter()
                    history[-1]["save_s"] = epoch_save_s + time.perf_counter() - save_start
                if plan.budget_minutes is not None and not plan.fixed and row["steps"] == plan.steps_per_epoch \
                        and epoch < plan.epochs:
                    plan = replan(plan, earlier_s + time.perf_counter() - clock, epoch * plan.steps_per_epoch,
                                  row["seconds"] / row["steps"], time.perf_counter() - epoch_start - row["seconds"],
                                  ctx)
                if stop["signal"] is not None and epoch < plan.epochs:  # a signal during validation or saving
                    raise files.Stopped(stop["signal"], f"stopped after epoch {epoch}: {kept}")
        finally:  # the end, an early stop, Ctrl-C, an error: what is held is written
            flush_start = time.perf_counter()
            files.write_checkpoints(held, out_dir)
            signals.close()
        history[-1]["save_s"] = history[-1].get("save_s", 0.0) + time.perf_counter() - flush_start
        train_s = time.perf_counter() - clock
        if not ctx.is_main:
            return {}

        # The test: the last epoch's model, then the best epoch's (from best.pt), and the reports.
        last_is_best = best.epoch == len(history)  # then best.pt holds these very weights
        last_accuracy = None if last_is_best else \
            evaluate(model, data.test_images, data.test_labels, settings.mean, settings.std, ctx)["accuracy"]
        model.load_state_dict(files.load_checkpoint(out_dir / "best.pt", script)["model"])
        figures, predictions = test_results(model, data.test_images, data.test_labels, data.classes, settings.mean,
                                            settings.std, ctx, settings.tta, settings.corruptions,
                                            sum(row["seconds"] for row in history))
        plot_filters(model, out_dir / "filters_after.png", f"first-layer filters after training (epoch {best.epoch})")
        plot_history(history, best.epoch, out_dir / "history.png", len(splits.train_images), len(splits.val_images))
        files.save_json(history, out_dir / "history.json")  # with the last epoch's seconds of saving
        trained = history[resumed_epochs:]  # the epochs this call trained
        metrics = write_report(
            figures, predictions, data, model, ctx.device, settings.recorded(), environment, out_dir,
            test_accuracy_last=figures["test_accuracy"] if last_is_best else last_accuracy, best_epoch=best.epoch,
            best_val_accuracy=best.val_accuracy, epochs_run=len(history), train_seconds=train_s,
            time_budget_minutes=settings.time_budget, planned_steps=plan.total_steps,
            run_steps=sum(r.get("steps", plan.steps_per_epoch) for r in history),
            train_images_per_s=(sum(r["images_per_s"] * r["seconds"] for r in trained)
                                / max(1e-9, sum(r["seconds"] for r in trained))),
            save_seconds=sum(r.get("save_s", 0.0) for r in history), processes=ctx.world, plan=plan._asdict(),
            peak_memory_mb=torch.cuda.max_memory_allocated(ctx.device) / 2 ** 20 if ctx.device.type == "cuda"
            else None,
            precision="+".join(dict.fromkeys(r.get("precision", precision_name(ctx.dtype)) for r in history)))
        print(f"best epoch {best.epoch} (val {best.val_accuracy:.2%}); test {metrics['test_accuracy']:.2%}, first "
              f"1000 {metrics['test_accuracy_first1000']:.2%}, last epoch's model {metrics['test_accuracy_last']:.2%}"
              f"; reports in {out_dir}")
        if board is not None:
            log_end(board, metrics, out_dir)
        return metrics


class Training(NamedTuple):
    """A run's network and what trains it."""
    model: nn.Module  # the plain network: validated, tested and saved
    train_model: nn.Module  # what the steps run: the network under DistributedDataParallel and torch.compile if asked
    optimizer: torch.optim.Optimizer  # its groups' learning rates are set before every step (see train_one_epoch)
    scaler: torch.amp.GradScaler
    peak_lrs: list[float]  # each optimizer group's learning rate at the schedule's peak


def train_one_epoch(training: Training, images: torch.Tensor, labels: torch.Tensor, settings: Settings, plan: Plan,
                    epoch: int, ctx: TrainContext, board=None, estimate: Estimate | None = None,
                    steps: int | None = None, progress: dict | None = None, pause_at: float = math.inf,
                    stop: dict | None = None) -> dict:
    """One pass over the shuffled training set (a plan's last epoch, or `steps`, may stop short): its loss, accuracy,
    steps, seconds and images/s; past `pause_at` or on stop["signal"], {"progress": ...} to go on from as if unbroken.
    Every LOG_EVERY steps it reads the sums for the bar and `board`; with an `estimate`, once, says how long the run
    takes."""
    training.train_model.train()
    augment = torch.Generator(ctx.device)
    if progress is None:  # dropout's stream is torch's own; the data order a function of the epoch
        torch.manual_seed(epoch_seed(settings.seed, epoch, 2, ctx.rank))
        augment.manual_seed(epoch_seed(settings.seed, epoch, 1, ctx.rank))
        progress = {"step": 0, "loss_sum": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long), "seen": 0,
                    "seconds": 0.0}
    else:
        torch.set_rng_state(progress["torch_rng"])
        if ctx.device.type == "cuda":
            torch.cuda.set_rng_state(progress["cuda_rng"], ctx.device)
        augment.set_state(progress["augment_rng"])
    shuffle = torch.Generator().manual_seed(epoch_seed(settings.seed, epoch, 0))
    ops = augmentation(settings.augment, settings)
    mean, std = torch.tensor(settings.mean, device=ctx.device), torch.tensor(settings.std, device=ctx.device)
    steps, first, done = steps or plan.epoch_steps(epoch), (epoch - 1) * plan.steps_per_epoch, progress["step"]
    loss_sum = progress["loss_sum"].to(ctx.device)  # loss x images
    correct = progress["correct"].to(ctx.device)
    first_bad_step = torch.full((), -1, device=ctx.device, dtype=torch.long)
    start, seen = time.perf_counter() - progress["seconds"], progress["seen"]
    logged = (loss_sum.item(), seen, time.perf_counter())  # the loss sum, images and time at the last reading
    warm = (seen, time.perf_counter())  # images and time after the first step: where the estimate's speed starts
    label = f"epoch {epoch}/{plan.epochs or '?'}" + ("" if plan.budget_minutes is None or plan.total_steps is None
                                                     else f" ({plan.budget_minutes:g} min ≈ "
                                                          f"{plan.total_steps / plan.steps_per_epoch:.1f} epochs)")
    bar = tqdm(total=steps, initial=done, desc=label, unit="batch", disable=not ctx.is_main, leave=False,
               dynamic_ncols=True)
    batches = itertools.islice(epoch_batches(len(images), plan.batch_size, shuffle, ctx.rank, ctx.world, ctx.device),
                               done, None)
    for step, index in zip(range(done + 1, steps + 1), batches, strict=False):
        for group, peak in zip(training.optimizer.param_groups, training.peak_lrs, strict=True):
            group["lr"] = peak * lr_factor(first + step - 1, plan)
        x = normalize(augment_batch(images[index], ops, augment, settings.crop_fill), mean, std)
        y = labels[index]
        with autocast(ctx):
            logits = training.train_model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=settings.label_smoothing)
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()

        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()), step, first_bad_step)
        pause = step < steps and pause_wanted(step, pause_at, stop, ctx)
        bar.update()
        if estimate is not None and step == done + 1 < steps:
            synchronize(ctx.device)
            warm = (seen, time.perf_counter())
        estimate_due = estimate is not None and (step == steps or step > done + 1 and (
            time.perf_counter() - warm[1] >= ESTIMATE_AFTER_S or step - done >= 50))
        if step % LOG_EVERY == 0 or step == steps or pause or estimate_due:  # one read of the device's sums
            bad_step, loss_so_far, hits = torch.stack([first_bad_step.to(loss_sum.dtype), loss_sum,
                                                       correct.to(loss_sum.dtype)]).tolist()
            if bad_step >= 0:
                bar.close()
                raise files.NonFiniteLoss(f"training loss is not finite at epoch {epoch}, step {int(bad_step)} of "
                                          f"{steps}")
            now = time.perf_counter()
            images_per_s = (seen - logged[1]) * ctx.world / max(now - logged[2], 1e-9)
            bar.set_postfix(loss=f"{loss_so_far / seen:.3f}", acc=f"{hits / seen:.1%}",
                            img_s=f"{seen * ctx.world / (now - start):.0f}", refresh=False)
            if board is not None and seen > logged[1]:  # the steps' figures since the last reading
                board.add_scalar("train/batch_loss", (loss_so_far - logged[0]) / (seen - logged[1]), first + step)
                board.add_scalar("train/lr", training.optimizer.param_groups[0]["lr"], first + step)
                board.add_scalar("train/images_per_s", images_per_s, first + step)
            if estimate_due:
                say(ctx, how_long(plan, estimate, (seen - warm[0]) * ctx.world / (now - warm[1])))
                estimate = None
            logged = (loss_so_far, seen, now)
        if pause:
            bar.close()
            return {"progress": {"step": step, "loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "seen": seen,
                                 "seconds": time.perf_counter() - start, "torch_rng": torch.get_rng_state(),
                                 "augment_rng": augment.get_state(), "cuda_rng": torch.cuda.get_rng_state(ctx.device)
                                 if ctx.device.type == "cuda" else None}}
    bar.close()
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), loss_sum.new_tensor(float(seen))])
    if ctx.world > 1:
        dist.all_reduce(totals)
    seconds = time.perf_counter() - start
    loss_total, correct_total, seen_total = totals.tolist()
    return {"train_loss": loss_total / seen_total, "train_accuracy": correct_total / seen_total, "steps": steps,
            "seconds": seconds, "images_per_s": seen_total / seconds}


def pause_wanted(step: int, pause_at: float, stop: dict | None, ctx: TrainContext) -> bool:
    """Whether to pause after `step` (past `pause_at`, or a signal); under torchrun all alike, every LOG_EVERY."""
    wanted = time.perf_counter() >= pause_at or bool(stop and stop["signal"])
    if ctx.world == 1:
        return wanted
    if step % LOG_EVERY:
        return False
    flag = torch.tensor(float(wanted), device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def time_steps(settings: Settings, build_model, images: torch.Tensor, labels: torch.Tensor, plan: Plan,
               ctx: TrainContext) -> tuple[float, float]:
    """A time budget's first steps, on a network then dropped: PLAN_WARMUP steps, then PLAN_STEPS timed ones (in a
    short epoch one warm-up step, the others timed). Returns (seconds per timed step, seconds in all)."""
    start = time.perf_counter()
    training = set_up_training(settings, build_model, ctx, initial_weights=False)
    warm_up = min(PLAN_WARMUP, max(1, plan.steps_per_epoch - 1))
    train_one_epoch(training, images, labels, settings, plan, 0, ctx, steps=warm_up)
    synchronize(ctx.device)
    timed = train_one_epoch(training, images, labels, settings, plan, 0, ctx,
                            steps=min(PLAN_STEPS, max(1, plan.steps_per_epoch - warm_up)))
    return timed["seconds"] / timed["steps"], time.perf_counter() - start


def set_up_training(settings: Settings, build_model, ctx: TrainContext, resume_from: dict | None = None,
                    resume_path: Path | None = None, initial_weights: bool = True) -> Training:
    """The network, optimizer and gradient scaler: new, or as the checkpoint `resume_from` (`resume_path`) left them
    (its scaler's state where both are fp16); the network wrapped for several processes and compiled if asked."""
    torch.manual_seed(settings.seed)
    model = build_model(settings, initial_weights=resume_from is None and initial_weights)
    model = model.to(ctx.device, memory_format=torch.channels_last)
    groups = parameter_groups(model, settings.lr, settings.norm_bias_lr)
    optimizer = make_optimizer(groups, settings.optimizer, settings.lr, settings.weight_decay)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)  # active in fp16 only
    if resume_from is not None:
        files.load_weights(model, resume_from["model"], resume_path)
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


def parameter_groups(model: nn.Module, lr: float, norm_bias_lr: float = 1.0) -> list[dict]:
    """The trainable parameters as optimizer groups at `lr`, and the BatchNorm biases' at `norm_bias_lr` times it."""
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and m.bias is not None} if norm_bias_lr != 1.0 else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in norm_biases], "lr": lr},
              {"params": [p for p in trainable if id(p) in norm_biases], "lr": lr * norm_bias_lr}]
    return [group for group in groups if group["params"]]


def make_optimizer(params: list[nn.Parameter] | list[dict], name: str, lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """Adam (L2 penalty in the gradient), AdamW (decoupled weight decay) or SGD with Nesterov momentum, by `name`."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


class BestEpoch(NamedTuple):
    """The epoch of the highest validation accuracy so far (epoch None before the first)."""
    epoch: int | None = None
    val_accuracy: float = -1.0


def differing_settings(asked: Mapping, saved: Mapping) -> list[tuple[str, object, object]]:
    """(name, saved value, asked value) of each setting in `asked` that differs in `saved` (--augment parsed)."""
    return [(key, saved.get(key), value) for key, value in asked.items()
            if (parse_augment(value) if key == "augment" else value) != saved.get(key)]


def resumed_settings(settings: Settings, flags_given: dict, saved: dict) -> Settings:
    """The saved run's settings with this call's runtime flags, --epochs and --patience; other flags must agree."""
    if "epochs" in flags_given and saved.get("time_budget") is not None:
        raise UsageError(f"--epochs: the run being resumed trains for --time-budget {saved['time_budget']:g} minutes, "
                         f"and --resume continues its plan")
    kept = {k: v for k, v in flags_given.items() if k in settings.runtime_keys() or k in ("epochs", "patience")}
    for key, was, value in differing_settings({k: v for k, v in flags_given.items() if k not in kept}, saved):
        raise UsageError(f"--{key.replace('_', '-')} {value} differs from the run being resumed ({was}): --resume "
                         "keeps the run's settings; only --epochs and --patience may change")
    return type(settings).from_saved({**saved, **kept})
