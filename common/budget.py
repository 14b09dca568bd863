"""How many steps a run trains and at what learning rate: the Plan, the schedule, and a time budget's plan, re-plan
and choice of regularisation, each made from the speed measured so far.

Imports common.errors, common.device."""
from __future__ import annotations

import math
import sys
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from .errors import UsageError
from .device import share_from_rank0, TrainContext


PLAN_WARMUP, PLAN_STEPS = 5, 20  # a --time-budget run times PLAN_STEPS steps after PLAN_WARMUP to plan its total
WARMUP = 0.2  # the one-cycle schedule's rise: this fraction of the steps


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


def choose_settings(scaling: dict | None, epochs: float) -> dict:
    """The settings for a run of `epochs` epochs from a recipe's budget_scaling {"epochs": [few, many], key: [value at
    few, value at many], ...}: each value interpolated on the logarithm of the epochs, held at the ends; crop_pad
    rounded. No scaling (or only its epochs): nothing."""
    if not scaling or len(scaling) < 2:
        return {}
    few, many = scaling["epochs"]
    t = min(1.0, max(0.0, math.log(max(epochs, 1e-9) / few) / math.log(many / few)))
    chosen = {key: low + t * (high - low) for key, (low, high) in scaling.items() if key != "epochs"}
    return {key: round(value) if key == "crop_pad" else round(value, 3) for key, value in chosen.items()}


def budget_plan(plan: Plan, step_s: float, spent_s: float, val_images: int, scaling: dict | None,
                ctx: TrainContext) -> Plan:
    """The plan a time budget makes from its timed steps (`step_s` each, `spent_s` in all, rank 0's shared): the
    total steps it holds with a validation pass after every epoch, and the settings the recipe's `scaling` gives for
    that many epochs; both said."""
    budget_s = plan.budget_minutes * 60
    step_s = share_from_rank0(step_s, ctx)
    if share_from_rank0(spent_s, ctx) > budget_s:
        raise UsageError(f"--time-budget {plan.budget_minutes:g} minutes is too short for the "
                         f"{PLAN_WARMUP + PLAN_STEPS} steps that time it (they took {spent_s:.1f} s)")
    val_s = step_s * ctx.world * val_images / plan.batch_size / 3  # a forward pass: about a third of a step
    total = share_from_rank0(plan_total_steps(budget_s, spent_s, step_s, val_s, 0, plan.steps_per_epoch), ctx)
    epochs = total / plan.steps_per_epoch
    planned = plan._replace(total_steps=total, images_per_s=plan.batch_size / step_s, spent_s=spent_s,
                            chosen=choose_settings(scaling, epochs))
    say(ctx, f"plan: {plan.budget_minutes:g} min ≈ {epochs:.1f} epochs ({total} steps of {plan.batch_size}) at "
             f"{planned.images_per_s:.0f} images/s" + "".join(
                 f", {key.replace('_', ' ')} {value:g}" for key, value in planned.chosen.items()))
    return planned


def replan(plan: Plan, elapsed_s: float, steps_done: int, step_s: float, epoch_extra_s: float,
           ctx: TrainContext) -> Plan:
    """At the end of an epoch under a time budget: the plan with its total steps set anew from the time used so far,
    the last epoch's seconds per step and the seconds it spent besides its steps (validation, checkpoints), so that a
    machine that slows down or speeds up still ends on time; the schedule follows the new total. Its chosen
    settings stay."""
    total = share_from_rank0(plan_total_steps(
        plan.budget_minutes * 60, elapsed_s, step_s, epoch_extra_s, steps_done, plan.steps_per_epoch,
        epochs_validated=steps_done // plan.steps_per_epoch), ctx)
    if total != plan.total_steps:
        say(ctx, f"re-plan: {total / plan.steps_per_epoch:.1f} epochs ({total} steps) at "
                 f"{plan.batch_size / step_s:.0f} images/s, {elapsed_s / 60:.1f} of {plan.budget_minutes:g} min used")
    return plan._replace(total_steps=total)


def say(ctx: TrainContext, line: str) -> None:
    """Print a line on the main process, above a progress bar."""
    if ctx.is_main:
        tqdm.write(line, file=sys.stdout)


def progress_label(epoch: int, plan: Plan) -> str:
    """'epoch 2/5', and under a time budget its plan: 'epoch 2/5 (60 min ≈ 4.7 epochs)'."""
    label = f"epoch {epoch}/{plan.epochs or '?'}"
    if plan.budget_minutes is None:
        return label
    return f"{label} ({plan.budget_minutes:g} min ≈ {plan.total_steps / plan.steps_per_epoch:.1f} epochs)"
