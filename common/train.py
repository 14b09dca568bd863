"""Training: shuffled batches, the optimizer and its parameter groups, one step, a time budget's timed steps, one
epoch (train_one_epoch), the epoch loop with validation (fit) and what a checkpoint holds after an epoch.

Imports common.errors, common.data, common.augment, common.device, common.evaluation, common.budget."""
from __future__ import annotations

import time
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .errors import NonFiniteLoss
from .data import CLASSES, Splits
from .augment import augment_batch, normalize
from .device import autocast, precision_name, synchronize, TrainContext
from .evaluation import evaluate
from .budget import lr_factor, Plan, PLAN_STEPS, PLAN_WARMUP, progress_label, replan, say

LOG_EVERY = 25  # steps between the progress bar's readings of the device's sums (and log_step's calls)


def epoch_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """A seed for one random stream of one epoch, so that a resumed run draws what an unbroken one would."""
    return (seed * 1_000_003 + epoch * 10_007 + stream * 101 + rank) % (2 ** 63)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1,
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch, on `device`; each rank takes its interleaved share of every global batch."""
    order = torch.randperm(n, generator=generator).to(device)  # drawn on the CPU: the same order on every device
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start + rank:start + batch_size:world]


def parameter_groups(model: nn.Module, lr: float, norm_bias_lr: float = 1.0) -> list[dict]:
    """The trainable parameters as optimizer groups at `lr`, except the BatchNorm biases, which learn at
    `norm_bias_lr` times `lr` in a second group where that differs."""
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and m.bias is not None} if norm_bias_lr != 1.0 else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in norm_biases], "lr": lr},
              {"params": [p for p in trainable if id(p) in norm_biases], "lr": lr * norm_bias_lr}]
    return [group for group in groups if group["params"]]


def first_conv_weight(model: nn.Module) -> torch.Tensor:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(params: list[nn.Parameter] | list[dict], name: str, lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """Adam (L2 penalty in the gradient), AdamW (decoupled weight decay) or SGD with Nesterov momentum, by `name`."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every Dropout layer of `model`."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


class TrainStep(NamedTuple):
    """What a training step does with its batch besides the network and the optimizer."""
    ops: dict[str, float]  # augmentation ops and their strengths (see augmentation)
    fill: str  # what crop and rotate put where they uncover the border (see batch_crop)
    mean: list[float]  # the normalisation after augmentation
    std: list[float]
    label_smoothing: float  # of the training loss


class Training(NamedTuple):
    """A run's network and what trains it."""
    model: nn.Module  # the plain network: validated, tested and saved
    train_model: nn.Module  # what the steps run: the network under DistributedDataParallel and torch.compile if asked
    optimizer: torch.optim.Optimizer  # its groups' learning rates are set before every step (see optimizer_step)
    scaler: torch.amp.GradScaler
    peak_lrs: list[float]  # each optimizer group's learning rate at the schedule's peak


def optimizer_step(training: Training, images: torch.Tensor, labels: torch.Tensor, step_with: TrainStep,
                   lr_factor: float, generator: torch.Generator, ctx: TrainContext
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on a batch of uint8 images at `lr_factor` times the peak learning rates, its augmentation drawn
    from `generator`; returns the batch's loss and logits (detached, on the device)."""
    for group, peak in zip(training.optimizer.param_groups, training.peak_lrs):
        group["lr"] = peak * lr_factor
    x = normalize(augment_batch(images, step_with.ops, generator, step_with.fill), step_with.mean, step_with.std)
    with autocast(ctx):
        logits = training.train_model(x)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=step_with.label_smoothing)
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    return loss.detach(), logits.detach()


class EpochStreams(NamedTuple):
    """One epoch's random streams: the order of the images, the augmentation's draws (dropout's is torch's own)."""
    shuffle: torch.Generator
    augment: torch.Generator


def on_device(step_with: TrainStep, ctx: TrainContext) -> TrainStep:
    """`step_with` with its normalisation's mean and std as tensors on the device, made once an epoch, not a step."""
    return step_with._replace(mean=torch.tensor(step_with.mean, device=ctx.device),
                              std=torch.tensor(step_with.std, device=ctx.device))


def epoch_streams(seed: int, epoch: int, ctx: TrainContext) -> EpochStreams:
    """The random streams of `epoch` (0: a time budget's timed steps), seeded so that a resumed run draws what an
    unbroken one would; dropout's from torch's global generator."""
    torch.manual_seed(epoch_seed(seed, epoch, 2, ctx.rank))
    return EpochStreams(torch.Generator().manual_seed(epoch_seed(seed, epoch, 0)),
                        torch.Generator(ctx.device).manual_seed(epoch_seed(seed, epoch, 1, ctx.rank)))


def timed_steps(training: Training, train_set: tuple[torch.Tensor, torch.Tensor], step_with: TrainStep, plan: Plan,
                seed: int, ctx: TrainContext) -> tuple[float, float]:
    """A time budget's first steps, before its plan: PLAN_WARMUP steps and PLAN_STEPS timed ones (fewer when an epoch
    is short) that train at the schedule's first learning rate. Returns (seconds per timed step, seconds in all)."""
    training.train_model.train()
    images, labels = train_set
    streams, step_with = epoch_streams(seed, 0, ctx), on_device(step_with, ctx)
    warmup = min(PLAN_WARMUP, plan.steps_per_epoch - 1)
    last = min(warmup + PLAN_STEPS, plan.steps_per_epoch)
    batches = epoch_batches(len(images), plan.batch_size, streams.shuffle, ctx.rank, ctx.world, ctx.device)
    clock = [time.perf_counter()]
    for step, index in zip(range(1, last + 1), batches):
        optimizer_step(training, images[index], labels[index], step_with, lr_factor(0, plan), streams.augment, ctx)
        if step in (warmup, last):
            synchronize(ctx.device)
            clock.append(time.perf_counter())
    return (clock[-1] - clock[-2]) / (last - warmup), clock[-1] - clock[0]


def train_one_epoch(training: Training, train_set: tuple[torch.Tensor, torch.Tensor], step_with: TrainStep,
                    plan: Plan, epoch: int, seed: int, ctx: TrainContext,
                    log_step: Callable[[int, dict], None] | None = None) -> dict:
    """One pass over the shuffled training set (the last epoch of a plan may stop short); returns loss, accuracy,
    steps and images/s for the epoch. Every LOG_EVERY steps, where the progress bar reads the device's sums,
    `log_step(global step, values)` gets the mean batch loss and the images/s since its last call and the learning
    rate."""
    training.train_model.train()
    images, labels = train_set
    streams, step_with = epoch_streams(seed, epoch, ctx), on_device(step_with, ctx)
    steps, first, seen = plan.epoch_steps(epoch), (epoch - 1) * plan.steps_per_epoch, 0
    loss_sum = torch.zeros((), device=ctx.device)  # loss x images
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    first_bad_step = torch.full((), -1, device=ctx.device, dtype=torch.long)
    start = time.perf_counter()
    logged = (0.0, 0.0, start)  # the loss sum, images and time at the last log_step
    bar = tqdm(total=steps, desc=progress_label(epoch, plan), unit="batch", disable=not ctx.is_main, leave=False,
               dynamic_ncols=True)
    batches = epoch_batches(len(images), plan.batch_size, streams.shuffle, ctx.rank, ctx.world, ctx.device)
    for step, index in zip(range(1, steps + 1), batches):
        y = labels[index]
        loss, logits = optimizer_step(training, images[index], y, step_with, lr_factor(first + step - 1, plan),
                                      streams.augment, ctx)
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
        if step % LOG_EVERY == 0 or step == steps:  # one read of the device's sums
            bad_step, loss_so_far, hits = torch.stack([first_bad_step.to(loss_sum.dtype), loss_sum,
                                                       correct.to(loss_sum.dtype)]).tolist()
            if bad_step >= 0:
                bar.close()
                raise NonFiniteLoss(f"training loss is not finite at epoch {epoch}, step {int(bad_step)} of {steps}")
            now = time.perf_counter()
            bar.set_postfix(loss=f"{loss_so_far / seen:.3f}", acc=f"{hits / seen:.3f}",
                            img_s=f"{seen * ctx.world / (now - start):.0f}", refresh=False)
            if log_step is not None:
                log_step(first + step, {"batch_loss": (loss_so_far - logged[0]) / (seen - logged[1]),
                                        "lr": training.optimizer.param_groups[0]["lr"],
                                        "images_per_s": (seen - logged[1]) * ctx.world / (now - logged[2])})
                logged = (loss_so_far, seen, now)
            bar.update(step - bar.n)
    bar.close()
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), loss_sum.new_tensor(float(seen))])
    if ctx.world > 1:
        dist.all_reduce(totals)
    seconds = time.perf_counter() - start
    loss_total, correct_total, seen_total = totals.tolist()
    return {"train_loss": loss_total / seen_total, "train_accuracy": correct_total / seen_total, "steps": steps,
            "seconds": seconds, "images_per_s": seen_total / seconds}


def validate(model: nn.Module, splits: Splits, mean: Sequence[float], std: Sequence[float], ctx: TrainContext
             ) -> tuple[float, float]:
    """(loss, accuracy) on the validation images, measured on the main process and shared with the others as Python
    numbers (no 64-bit float tensor on the device: Apple's MPS has none)."""
    shared = [None]
    if ctx.is_main:
        result = evaluate(model, splits.val_images, splits.val_labels, mean, std, ctx)
        shared = [(result["loss"], result["accuracy"])]
    if ctx.world > 1:
        dist.broadcast_object_list(shared, 0)
    return shared[0]


class BestEpoch(NamedTuple):
    """The epoch of the highest validation accuracy so far (epoch None before the first)."""
    epoch: int | None = None
    val_accuracy: float = -1.0


class Fitted(NamedTuple):
    """What the epoch loop leaves: every epoch's row, the best epoch, the seconds this call trained, the last plan."""
    history: list[dict]
    best: BestEpoch
    seconds: float
    plan: Plan


# One row of history.json: elapsed_s is the run's wall-clock time (training, validation, saving) at the epoch's end.
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "steps", "seconds",
                "images_per_s", "elapsed_s", "precision")


def fit(training: Training, splits: Splits, plan: Plan, step_with: TrainStep, seed: int, patience: int,
        start: tuple[list[dict], BestEpoch], ctx: TrainContext,
        save_epoch: Callable[[list[dict], BestEpoch, bool, Plan], None],
        log_step: Callable[[int, dict], None] | None = None) -> Fitted:
    """The epoch loop after the `start` (history, best epoch) of a resumed run: train, validate, keep the best epoch,
    and on the main process `save_epoch(history, best, improved, plan)` after each; ends at the plan's last epoch,
    or early after `patience` epochs without a better one. A time budget's plan (unless fixed) is made anew after
    every full epoch from the speed and the time used so far (see replan). `log_step` goes to train_one_epoch."""
    train_set = splits.train_images.to(ctx.device), splits.train_labels.to(ctx.device)
    history, best = list(start[0]), start[1]
    clock = time.perf_counter()
    earlier_s = history[-1].get("elapsed_s", 0.0) if history else plan.spent_s  # what came before this call
    epoch = len(history)
    while epoch < plan.epochs:  # a re-plan may move the last epoch
        epoch += 1
        if patience and best.epoch is not None and epoch - 1 - best.epoch >= patience:
            say(ctx, f"early stop: no better validation accuracy for {patience} epochs")
            break
        epoch_start = time.perf_counter()
        row = {"epoch": epoch, "lr": training.peak_lrs[0] * lr_factor((epoch - 1) * plan.steps_per_epoch, plan)}
        row.update(train_one_epoch(training, train_set, step_with, plan, epoch, seed, ctx, log_step))
        row["val_loss"], row["val_accuracy"] = validate(training.model, splits, step_with.mean, step_with.std, ctx)
        row["precision"] = precision_name(ctx.dtype)
        row["elapsed_s"] = earlier_s + time.perf_counter() - clock
        history.append({k: row[k] for k in HISTORY_KEYS})
        improved = row["val_accuracy"] > best.val_accuracy
        best = BestEpoch(epoch, row["val_accuracy"]) if improved else best
        say(ctx, f"epoch {epoch:3d}/{plan.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
                 f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  lr {row['lr']:.2e}  "
                 f"{row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s" + ("  *best" if improved else ""))
        if ctx.is_main:
            save_start = time.perf_counter()
            save_epoch(history, best, improved, plan)
            history[-1]["save_s"] = time.perf_counter() - save_start
        if plan.budget_minutes is not None and not plan.fixed and row["steps"] == plan.steps_per_epoch \
                and epoch < plan.epochs:
            plan = replan(plan, earlier_s + time.perf_counter() - clock, epoch * plan.steps_per_epoch,
                          row["seconds"] / row["steps"], time.perf_counter() - epoch_start - row["seconds"], ctx)
    return Fitted(history, best, time.perf_counter() - clock, plan)


TRAINING_STATE = ("optimizer", "scaler")  # what --resume needs beyond the model


def checkpoint_state(script: str, settings: dict, training: Training, history: list[dict], best: BestEpoch,
                     plan: Plan | None = None, fingerprint: str | None = None,
                     classes: Sequence[str] = CLASSES) -> dict:
    """What last.pt holds after an epoch (best.pt: the same without TRAINING_STATE); `fingerprint` is
    data_fingerprint of the splits the run trains on (None outside a run). The learning rate needs no state of its
    own: it is a function of the step and the plan."""
    return {"kind": script, "settings": settings, "model": training.model.state_dict(),
            "optimizer": training.optimizer.state_dict(), "scaler": training.scaler.state_dict(),
            "plan": None if plan is None else plan._asdict(), "epoch": len(history), "history": history,
            "best_epoch": best.epoch, "best_val_accuracy": best.val_accuracy, "data_fingerprint": fingerprint,
            "classes": list(classes)}
