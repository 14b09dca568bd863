"""Training: shuffled batches, the whitening first layer, the optimizer and its parameter groups, lookahead, one
epoch (train_one_epoch), the epoch loop with validation (fit) and what a checkpoint holds after an epoch.

Imports common.errors, common.files, common.data, common.augment, common.device, common.evaluation, common.budget."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .errors import NonFiniteLoss
from .files import save_checkpoint, save_json
from .data import CLASSES, Splits
from .augment import alternating_flips, augment_batch, normalize
from .device import autocast, precision_name, TrainContext
from .evaluation import evaluate
from .budget import budget_planner, epoch_steps, Plan, progress_label, replan


def epoch_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """A seed for one random stream of one epoch, so that a resumed run draws what an unbroken one would."""
    return (seed * 1_000_003 + epoch * 10_007 + stream * 101 + rank) % (2 ** 63)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1,
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch, on `device`; each rank takes its interleaved share of every global batch."""
    order = torch.randperm(n, generator=generator).to(device)  # drawn on the CPU: the same order on every device
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start + rank:start + batch_size:world]


WHITEN_IMAGES = 5000  # training images whose 3x3 patches fix the whitening filters
WHITEN_EPS = 5e-4  # the default eps added to the patch covariance's eigenvalues before their square root


def patch_whitening_filters(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                            eps: float = WHITEN_EPS, directions: int = 27) -> torch.Tensor:
    """Conv filters (2 x `directions`, 3, 3, 3) that whiten the 3x3 patches of uint8 `images` normalized as the
    network sees them: each of the `directions` principal directions of the patches' covariance with the largest
    variance (in ascending order) over the square root of its eigenvalue plus `eps`, then their negatives (a ReLU follows, so each
    direction needs both signs). The directions the images barely use are amplified up to 1/sqrt(eps), and small
    input noise in them with them: a larger `eps` amplifies them less, fewer `directions` leave them out."""
    x = normalize(images[:WHITEN_IMAGES].float().div(255), mean, std)
    patches = F.unfold(x, 3).transpose(1, 2).reshape(-1, 27).double()  # (channel, row, column) as in a conv weight
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
    eigenvalues, eigenvectors = eigenvalues[-directions:], eigenvectors[:, -directions:]  # ascending: the largest last
    filters = (eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]).reshape(-1, 3, 3, 3)
    return torch.cat([filters, -filters]).float()


def parameter_groups(model: nn.Module, decay_norm_bias: bool, lr: float, norm_bias_lr: float = 1.0) -> list[dict]:
    """The trainable parameters as optimizer groups: all of them at `lr`, except that without `decay_norm_bias` the
    parameters of one dimension (BatchNorm weights and biases, every bias) are free of weight decay, and that
    BatchNorm biases learn at `norm_bias_lr` times `lr` (the first group holds the weights of the layers)."""
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and m.bias is not None} if norm_bias_lr != 1.0 else set()
    groups: dict[tuple, list] = {}
    for p in (p for p in model.parameters() if p.requires_grad):
        key = (p.ndim <= 1 and not decay_norm_bias, id(p) in norm_biases)
        groups.setdefault(key, []).append(p)
    return [{"params": params, "lr": lr * (norm_bias_lr if fast else 1.0), **({"weight_decay": 0.0} if free else {})}
            for (free, fast), params in sorted(groups.items())]


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


LOOKAHEAD_EVERY, LOOKAHEAD_DECAY = 5, 0.95  # --lookahead: steps between pulls; the average's decay per step at the end


def lookahead_decay(step: int, total_steps: int | None) -> float:
    """The weight --lookahead gives the average against the network after `step` of `total_steps` steps: from 0 (the
    network as it is) rising with the cube of the progress to LOOKAHEAD_DECAY per step, over LOOKAHEAD_EVERY steps."""
    return 0.0 if not total_steps else LOOKAHEAD_DECAY ** LOOKAHEAD_EVERY * min(1.0, step / total_steps) ** 3


def lookahead_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each floating-point weight and buffer of `model` (sharing its storage) with a copy of it that --lookahead
    averages into: made once an epoch, not at every pull."""
    return [(value, value.detach().clone()) for value in model.state_dict().values() if value.is_floating_point()]


@torch.no_grad()
def lookahead_pull(pairs: list[tuple[torch.Tensor, torch.Tensor]], decay: float) -> None:
    """Move each running average towards its weight or buffer by 1 - `decay` (see lookahead_pairs), then set the
    model to it."""
    for value, average in pairs:
        average.lerp_(value, 1 - decay)
        value.copy_(average)


class TrainStep(NamedTuple):
    """What a training step does with its batch besides the network and the optimizer."""
    ops: dict[str, float]  # augmentation ops and their strengths (see augmentation)
    fill: str  # what crop and rotate put where they uncover the border (see batch_crop)
    mean: list[float]  # the normalisation after augmentation
    std: list[float]
    label_smoothing: float  # of the training loss
    alternate_flip: bool  # flip each image in every other epoch (see alternating_flips) instead of at random
    lookahead: bool  # pull the weights towards their running average (see lookahead_pull)


def train_one_epoch(model: nn.Module, optimizer, scheduler, scaler, images: torch.Tensor, labels: torch.Tensor,
                    step_with: TrainStep, plan: Plan, epoch: int, seed: int, batch_size: int, ctx: TrainContext,
                    budget_minutes: float | None = None, after_step: Callable[[int], TrainStep | None] | None = None,
                    log_every: int = 25, log_step: Callable[[int, dict], None] | None = None) -> dict:
    """One pass over the shuffled training set (the last epoch of a planned run may stop short); returns loss,
    accuracy, steps and images/s for the epoch. `after_step(steps done)` runs after every step when given; what it
    returns, when not None, is how the steps after it train (a time budget's plan, made in the first epoch, may change
    the augmentation and the loss). Every `log_every` steps, where the progress bar reads the device's sums,
    `log_step(global step, values)` gets the mean batch loss and the images/s since its last call and the learning
    rate."""
    model.train()
    shuffle = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
    augment_gen = torch.Generator(ctx.device).manual_seed(epoch_seed(seed, epoch, 1, ctx.rank))
    torch.manual_seed(epoch_seed(seed, epoch, 2, ctx.rank))
    criterion = nn.CrossEntropyLoss(label_smoothing=step_with.label_smoothing)
    steps = epoch_steps(plan.total_steps, epoch, plan.steps_per_epoch)
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    first_bad_step = torch.full((), -1, device=ctx.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    logged = (0.0, 0, start)  # the loss sum, images and time at the last log_step
    bar = tqdm(total=steps, desc=progress_label(epoch, plan, budget_minutes), unit="batch", disable=not ctx.is_main,
               leave=False, dynamic_ncols=True)
    mean, std = torch.tensor(step_with.mean, device=ctx.device), torch.tensor(step_with.std, device=ctx.device)
    ops = step_with.ops
    flips = alternating_flips(len(images), seed, epoch, ctx.device) if step_with.alternate_flip and "flip" in ops else None
    average = lookahead_pairs(model) if step_with.lookahead else None  # the epoch ends on the average (below): a
    # resumed run starts as this one goes on
    for step, index in enumerate(epoch_batches(len(images), batch_size, shuffle, ctx.rank, ctx.world, ctx.device)):
        if step >= steps:
            break
        x = normalize(augment_batch(images[index], ops, augment_gen, None if flips is None else flips[index],
                                    step_with.fill), mean, std)
        y = labels[index]
        with autocast(ctx):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss = loss.detach()
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
        seen += len(y)
        if average is not None and ((step + 1) % LOOKAHEAD_EVERY == 0 or step + 1 == steps):
            done = (epoch - 1) * plan.steps_per_epoch + step + 1
            lookahead_pull(average, lookahead_decay(done, plan.total_steps))
        if after_step is not None:
            changed = after_step(step + 1)
            if changed is not None:
                criterion = nn.CrossEntropyLoss(label_smoothing=changed.label_smoothing)
                ops = changed.ops
            steps = epoch_steps(plan.total_steps, epoch, plan.steps_per_epoch)  # a plan made now may end it early
            bar.total = steps
            bar.set_description(progress_label(epoch, plan, budget_minutes), refresh=False)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            bad = int(first_bad_step)
            if bad >= 0:
                bar.close()
                raise NonFiniteLoss(f"training loss is not finite at epoch {epoch}, step {bad + 1} of {steps}")
            loss_so_far, now = float(loss_sum), time.perf_counter()
            bar.set_postfix(loss=f"{loss_so_far / seen:.3f}", acc=f"{float(correct) / seen:.3f}",
                            img_s=f"{seen * ctx.world / (now - start):.0f}", refresh=False)
            if log_step is not None:
                log_step((epoch - 1) * plan.steps_per_epoch + step + 1,
                         {"batch_loss": (loss_so_far - logged[0]) / (seen - logged[1]), "lr": scheduler.get_last_lr()[0],
                          "images_per_s": (seen - logged[1]) * ctx.world / (now - logged[2])})
                logged = (loss_so_far, seen, now)
            bar.update((step + 1) - bar.n)
    bar.close()
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=ctx.device)])
    if ctx.world > 1:
        dist.all_reduce(totals)
    seconds = time.perf_counter() - start
    loss_total, correct_total, seen_total = totals.tolist()
    return {"train_loss": loss_total / seen_total, "train_accuracy": correct_total / seen_total, "steps": steps,
            "seconds": seconds, "images_per_s": seen_total / seconds}


class Training(NamedTuple):
    """A run's network and what trains it."""
    model: nn.Module  # the plain network: validated, tested and saved
    train_model: nn.Module  # what the steps run: the network under DistributedDataParallel and torch.compile if asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


class BestEpoch(NamedTuple):
    """The epoch of the highest validation accuracy so far (epoch None before the first)."""
    epoch: int | None = None
    val_accuracy: float = -1.0


class Fitted(NamedTuple):
    """What the epoch loop leaves: every epoch's row, the best epoch, the seconds this call trained."""
    history: list[dict]
    best: BestEpoch
    seconds: float


# One row of history.json: elapsed_s is the run's wall-clock time (training, validation, saving) at the epoch's end.
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "steps", "seconds",
                "images_per_s", "elapsed_s", "precision")


def fit(training: Training, splits: Splits, plan: Plan, step_with: TrainStep, seed: int, batch_size: int,
        patience: int, budget_minutes: float | None, replans: bool, history: list[dict], best: BestEpoch,
        ctx: TrainContext, on_plan: Callable[[], TrainStep], save_epoch: Callable[[list[dict], BestEpoch, bool], None],
        log_step: Callable[[int, dict], None] | None = None) -> Fitted:
    """The epoch loop after `history`: train, validate, keep the best epoch, and on the main process `save_epoch`
    (history, best, improved) after each; ends at the plan's last epoch, or early after `patience` epochs without a
    better one. Under a time budget the first epoch's steps make the plan (see budget_planner; `on_plan` then says how
    the steps train), and with `replans` the end of every full epoch plans again from the speed and the time used so
    far (see replan). `log_step` goes to train_one_epoch."""
    train_images, train_labels = splits.train_images.to(ctx.device), splits.train_labels.to(ctx.device)
    history = list(history)
    start = time.perf_counter()
    earlier_s = history[-1].get("elapsed_s", 0.0) if history else 0.0  # what the calls before this one used
    timing = budget_planner(plan, budget_minutes, batch_size, len(splits.val_images), start, ctx) \
        if budget_minutes is not None and plan.total_steps is None else None

    def after_step(done: int) -> TrainStep | None:  # the first epoch's, while a time budget plans
        return on_plan() if timing(done) else None
    epoch = len(history)
    while plan.epochs is None or epoch < plan.epochs:  # a time budget's plan is made in the first epoch
        epoch += 1
        if patience and best.epoch is not None and epoch - 1 - best.epoch >= patience:
            if ctx.is_main:
                print(f"early stop: no better validation accuracy for {patience} epochs")
            break
        epoch_start = time.perf_counter()
        row = {"epoch": epoch, "lr": training.optimizer.param_groups[0]["lr"]}
        row.update(train_one_epoch(training.train_model, training.optimizer, training.scheduler, training.scaler,
                                   train_images, train_labels, step_with, plan, epoch, seed, batch_size, ctx,
                                   budget_minutes, after_step if epoch == 1 and timing is not None else None,
                                   log_step=log_step))
        val = torch.zeros(2, device=ctx.device, dtype=torch.float64)
        if ctx.is_main:
            result = evaluate(training.model, splits.val_images, splits.val_labels, step_with.mean, step_with.std, ctx)
            val = torch.tensor([result["loss"], result["accuracy"]], device=ctx.device, dtype=torch.float64)
        if ctx.world > 1:
            dist.broadcast(val, 0)
        row["val_loss"], row["val_accuracy"] = val.tolist()
        row["precision"] = precision_name(ctx.dtype)
        row["elapsed_s"] = earlier_s + time.perf_counter() - start
        row = {k: row[k] for k in HISTORY_KEYS}
        history.append(row)
        improved = row["val_accuracy"] > best.val_accuracy
        if improved:
            best = BestEpoch(epoch, row["val_accuracy"])
        if ctx.is_main:
            tqdm.write(f"epoch {epoch:3d}/{plan.epochs}  train loss {row['train_loss']:.4f} acc "
                       f"{row['train_accuracy']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  "
                       f"lr {row['lr']:.2e}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s"
                       + ("  *best" if improved else ""), file=sys.stdout)
            save_epoch(history, best, improved)
        if budget_minutes is not None and replans and row["steps"] == plan.steps_per_epoch and epoch < plan.epochs:
            epoch_s = time.perf_counter() - epoch_start  # training, validation and saving
            replan(plan, budget_minutes, batch_size, earlier_s + time.perf_counter() - start,
                   epoch * plan.steps_per_epoch, row["seconds"] / row["steps"], epoch_s - row["seconds"], ctx)
    return Fitted(history, best, time.perf_counter() - start)


TRAINING_STATE = ("optimizer", "scheduler", "scaler")  # what --resume needs beyond the model


def checkpoint_state(script: str, settings: dict, training: Training, history: list[dict], best: BestEpoch,
                     fingerprint: str | None = None, classes: Sequence[str] = CLASSES) -> dict:
    """What last.pt holds after an epoch (best.pt: the same without TRAINING_STATE); `fingerprint` is
    data_fingerprint of the splits the run trains on (None outside a run)."""
    return {"kind": script, "settings": settings, "model": training.model.state_dict(),
            "optimizer": training.optimizer.state_dict(), "scheduler": training.scheduler.state_dict(),
            "scaler": training.scaler.state_dict(), "epoch": len(history), "history": history,
            "best_epoch": best.epoch, "best_val_accuracy": best.val_accuracy, "data_fingerprint": fingerprint,
            "classes": list(classes)}


def save_epoch_files(checkpoint: dict, improved: bool, out_dir: Path) -> None:
    """After an epoch: last.pt, best.pt when the epoch is the best so far, history.json. The first epoch of a new run
    removes the metrics.json an --overwrite replaces."""
    if checkpoint["epoch"] == 1:
        (out_dir / "metrics.json").unlink(missing_ok=True)
    if improved:  # testing needs no optimizer state: best.pt is a third of last.pt's size and write time
        save_checkpoint({k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}, out_dir / "best.pt")
    save_checkpoint(checkpoint, out_dir / "last.pt")
    save_json(checkpoint["history"], out_dir / "history.json")
