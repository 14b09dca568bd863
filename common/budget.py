"""How many steps a run trains and at what learning rate: the Plan, the schedule, and the time budget's planner,
re-planning and choice of regularisation.

Imports common.errors, common.device."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .errors import UsageError
from .device import share_from_rank0, synchronize, TrainContext


PLAN_WARMUP, PLAN_STEPS = 5, 20  # a --time-budget run times PLAN_STEPS steps after PLAN_WARMUP to plan its total


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: full batches only (a last partial batch is left out)."""
    return train_images // batch_size


@dataclasses.dataclass
class Plan:
    """How many steps a run trains, owned by the fit loop and read by the learning-rate schedule: epochs x steps per
    epoch, or what a time budget buys (None until the first epoch has timed its steps, then fixed again at the end of
    every epoch from the speed measured so far; see budget_planner and replan)."""
    steps_per_epoch: int
    total_steps: int | None
    images_per_s: float | None = None  # the speed a time budget's plan was last made at

    @property
    def epochs(self) -> int | None:
        """Epochs the plan reaches, the last of them perhaps partial (None before a time budget's plan)."""
        return None if self.total_steps is None else -(-self.total_steps // self.steps_per_epoch)


def epoch_steps(total_steps: int | None, epoch: int, steps_per_epoch: int) -> int:
    """Steps of `epoch`: a full epoch, or what the run's total leaves for its last, partial one."""
    if total_steps is None:
        return steps_per_epoch
    return max(0, min(steps_per_epoch, total_steps - (epoch - 1) * steps_per_epoch))


def lr_factor(step: int, total_steps: int | None, steps_per_epoch: int, schedule: str, warmup: float,
              lr_decay: float | None, lr_end: float) -> float:
    """Learning-rate multiplier at `step`: one-cycle (linear up over the `warmup` fraction, linear down to `lr_end`
    of the peak) or exponential per epoch (`lr_decay` each).

    The one-cycle runs over the run's total steps; before a time budget's plan fixes them, it stays at its first value.
    """
    if schedule == "exp":
        return lr_decay ** (step // steps_per_epoch)
    if total_steps is None:
        return 0.1
    warm = max(1, int(warmup * total_steps))
    return float(np.interp(step, [0, warm, total_steps], [0.1, 1.0, lr_end]))


def make_scheduler(optimizer: torch.optim.Optimizer, plan: Plan, schedule: str, warmup: float, lr_decay: float | None,
                   lr_end: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule (see lr_factor) over the `plan`'s steps as they stand at each step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, plan.total_steps, plan.steps_per_epoch, schedule, warmup, lr_decay, lr_end))


def plan_total_steps(budget_s: float, elapsed_s: float, step_s: float, val_s: float, steps_done: int,
                     steps_per_epoch: int, epochs_validated: int = 0) -> int:
    """The most steps a time budget holds: those done, then more at `step_s` each, with a validation pass of `val_s`
    for every epoch they reach beyond the `epochs_validated`."""
    left = budget_s - elapsed_s

    def cost(total: int) -> float:
        return (total - steps_done) * step_s + (-(-total // steps_per_epoch) - epochs_validated) * val_s

    low, high = steps_done, steps_done + max(0, int(left / step_s))
    while low < high:  # the cost grows with the total: the largest total it affords
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= left else (low, middle - 1)
    return low


def set_total_steps(plan: Plan, total: int, ctx: TrainContext, line: Callable[[int], str]) -> None:
    """Give the plan rank 0's `total` steps; the main process prints `line(total)` when that changes the plan."""
    total = share_from_rank0(total, ctx)
    if total != plan.total_steps and ctx.is_main:
        tqdm.write(line(total), file=sys.stdout)
    plan.total_steps = total


def budget_planner(plan: Plan, budget_minutes: float, batch_size: int, val_images: int, start: float,
                   ctx: TrainContext) -> Callable[[int], bool]:
    """The first epoch's hook under --time-budget: after each step it may time the run, and after PLAN_STEPS steps
    that follow PLAN_WARMUP warm-up steps it sets the plan's total steps from their speed (measured on rank 0,
    shared) and returns True, once. A short first epoch shortens both."""
    budget_s = budget_minutes * 60
    warmup = min(PLAN_WARMUP, plan.steps_per_epoch - 1)
    last = min(warmup + PLAN_STEPS, plan.steps_per_epoch)
    clock = {0: start}

    def after_step(step: int) -> bool:
        if step not in (1, warmup, last):
            return False
        synchronize(ctx.device)
        clock[step] = time.perf_counter()
        if step == 1 and share_from_rank0(int(clock[1] - start > budget_s), ctx):
            raise UsageError(f"--time-budget {budget_minutes:g} minutes is too short for a single training "
                             f"step (the first took {clock[1] - start:.1f} s)")
        if step != last:
            return False
        step_s = (clock[last] - clock[warmup]) / (last - warmup)
        val_s = step_s * ctx.world * val_images / batch_size / 3  # a forward pass: about a third of a step
        total = plan_total_steps(budget_s, clock[last] - start, step_s, val_s, last, plan.steps_per_epoch)
        plan.images_per_s = batch_size / step_s
        set_total_steps(plan, total, ctx, lambda total: (
            f"plan: {budget_minutes:g} min ≈ {total / plan.steps_per_epoch:.1f} epochs ({total} steps of "
            f"{batch_size}) at {plan.images_per_s:.0f} images/s"))
        return True

    return after_step


def replan(plan: Plan, budget_minutes: float, batch_size: int, elapsed_s: float, steps_done: int, step_s: float,
           epoch_extra_s: float, ctx: TrainContext) -> None:
    """At the end of an epoch under --time-budget: set the plan's total steps anew from the time used so far, the
    last epoch's seconds per step and the seconds it spent besides its steps (validation, checkpoints), so that a
    machine that slows down or speeds up still ends on time; the schedule follows the new total."""
    total = plan_total_steps(budget_minutes * 60, elapsed_s, step_s, epoch_extra_s, steps_done, plan.steps_per_epoch,
                             epochs_validated=steps_done // plan.steps_per_epoch)
    set_total_steps(plan, total, ctx, lambda total: (
        f"re-plan: {total / plan.steps_per_epoch:.1f} epochs ({total} steps) at {batch_size / step_s:.0f} images/s, "
        f"{elapsed_s / 60:.1f} of {budget_minutes:g} min used"))


def scaled_by_epochs(scaling: dict, epochs: float) -> dict:
    """Settings for a run of `epochs` epochs from a recipe's budget_scaling {"epochs": [few, many], key: [value at few,
    value at many], ...}: each value interpolated on the logarithm of the epochs, held at the ends; crop_pad rounded."""
    few, many = scaling["epochs"]
    t = min(1.0, max(0.0, math.log(max(epochs, 1e-9) / few) / math.log(many / few)))
    chosen = {key: low + t * (high - low) for key, (low, high) in scaling.items() if key != "epochs"}
    return {key: round(value) if key == "crop_pad" else round(value, 3) for key, value in chosen.items()}


def progress_label(epoch: int, plan: Plan, budget_minutes: float | None) -> str:
    """'epoch 2/5', and under a time budget its plan: 'epoch 2/5 (60 min ≈ 4.7 epochs)'."""
    label = f"epoch {epoch}/{plan.epochs or '?'}"
    if budget_minutes is None:
        return label
    if plan.total_steps is None:
        return f"{label} (timing steps for the {budget_minutes:g}-min plan)"
    return f"{label} ({budget_minutes:g} min ≈ {plan.total_steps / plan.steps_per_epoch:.1f} epochs)"
