"""The command line both scripts share: start or resume a run, sweeps (--seeds, ex1's dropout values), the
single tasks, and the exit code of each outcome (run_experiment).

Imports common.errors, common.files, common.device, common.budget, common.board, common.studies, common.settings,
common.run, common.tasks."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as dist

from .errors import NonFiniteLoss, SaveError, UsageError
from .files import load_checkpoint, prepare_out_dir, run_dir_lock, tee_console
from .device import init_distributed, native_bf16, precision_name, resolve_device, resolve_precision, TrainContext
from .budget import Plan, say
from .board import log_end, open_board, trained_steps
from .studies import compare_runs, load_run, summarize_seeds
from .settings import (
    check_settings, choose_recipe, explicit_flags, parse_augment, recorded_settings, resolve_settings,
    RESUME_EXTENDABLE, RUNTIME_KEYS, Settings, settings_from)
from .run import load_training_data, ModelBuilder, settings_for_plan, train_and_report
from .tasks import eval_only, export_model, predict_images


def resume_command(resumes: bool) -> str:
    """This call's command line, to run again as it is or, when it `resumes`, with --resume added."""
    return shlex.join([*sys.argv, *(["--resume"] if resumes and "--resume" not in sys.argv else [])])


def resume_settings(flags_given: dict, saved: dict, settings_type: type[Settings]) -> Settings:
    """The saved run's settings with the runtime flags, --epochs and --patience of this call on top."""
    if "epochs" in flags_given and saved.get("time_budget") is not None:
        raise UsageError(f"--epochs: the run being resumed trains for --time-budget {saved['time_budget']:g} minutes, "
                         f"and --resume continues its plan")
    for key, value in flags_given.items():
        if key in RUNTIME_KEYS or key in RESUME_EXTENDABLE:
            continue
        if (parse_augment(value) if key == "augment" else value) != saved.get(key):
            raise UsageError(f"--{key.replace('_', '-')} {value} differs from the run being resumed "
                             f"({saved.get(key)}): --resume keeps the run's settings; only --epochs and --patience may change")
    return settings_from(settings_type, {**saved, **{k: v for k, v in flags_given.items()
                                                     if k in RUNTIME_KEYS or k in RESUME_EXTENDABLE}})


def resumed_precision(ctx: TrainContext, resume_from: dict, precision_given: bool) -> TrainContext:
    """The context a resumed run trains in: --precision when given; else the precision its last epoch trained in
    where this device computes it natively (so that a resume on the same machine is bit-identical), and what
    --precision auto picks here where it does not (bf16 on an older GPU or a CPU without native bf16). A line says
    when the precision changes. Checkpoints from before history rows recorded it resolve the run's own --precision."""
    history = resume_from["history"]
    saved = history[-1].get("precision") if history else None
    if saved is None:
        saved = precision_name(resolve_precision(resume_from["settings"].get("precision", "auto"), ctx.device))
    dtype, why = ctx.dtype, "--precision makes the rest"
    if not precision_given:
        dtype = getattr(torch, saved)
        if dtype == torch.bfloat16 and not native_bf16(ctx.device):
            dtype = resolve_precision("auto", ctx.device)
            why = f"{ctx.device} has no native bf16: --precision auto makes the rest"
    if precision_name(dtype) != saved and ctx.is_main:
        print(f"note: epochs 1-{len(history)} trained in {saved}; {why} {precision_name(dtype)} (history.json "
              "records each epoch's precision)")
    return ctx._replace(dtype=dtype)


def start_or_resume(script: str, settings: Settings, flags_given: dict, build_model: ModelBuilder, out_dir: Path,
                    ctx: TrainContext, plan: Plan | None = None) -> dict | None:
    """Train in `out_dir`: fresh, resumed from its last.pt (the flags given checked against its settings; with
    --epochs beyond a finished run's, that run extended), or not at all when it already holds a finished run; `plan`
    is another run's time budget plan to train (a sweep's)."""
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
        resume_from = load_checkpoint(out_dir / "last.pt", script)
        settings = resume_settings(flags_given, resume_from["settings"], type(settings))
        ctx = resumed_precision(ctx, resume_from, "precision" in flags_given)
    elif (finished or unfinished) and not settings.overwrite:
        what = "a finished run (metrics.json)" if finished else "an unfinished run (last.pt); --resume continues it"
        raise UsageError(f"{out_dir} already holds {what}; pass --overwrite to start over, or choose another --out-dir")
    check_settings(settings)
    prepare_out_dir(out_dir)
    return train_in_folder(script, settings, build_model, out_dir, ctx, resume_from, plan)


def train_in_folder(script: str, settings: Settings, build_model: ModelBuilder, out_dir: Path, ctx: TrainContext,
                    resume_from: dict | None, plan: Plan | None) -> dict:
    """The training run in `out_dir`, which the main process locks, with its console in train.log and its curves
    in TensorBoard's event files; returns its metrics (empty on the other processes). Ctrl-C and a failed write
    while it trains say what the folder keeps and how to go on."""
    with contextlib.ExitStack() as stack:
        if ctx.is_main:
            stack.enter_context(run_dir_lock(out_dir))
            for stale in out_dir.glob(".*.tmp"):  # temporary files of atomic_write left by a run killed while saving
                stale.unlink(missing_ok=True)
        data, splits = load_training_data(settings, ctx)
        if ctx.world > 1:
            dist.barrier()
        board = stack.enter_context(open_board(
            out_dir, trained_steps(resume_from["history"]) if resume_from else None, f"python {shlex.join(sys.argv)}",
            recorded_settings(settings))) if ctx.is_main and settings.tensorboard else None
        try:
            with tee_console(out_dir / "train.log", enabled=ctx.is_main):
                metrics = train_and_report(script, settings, data, splits, build_model, out_dir, ctx,
                                           resume_from=resume_from, board=board, plan=plan)
                if board is not None:
                    log_end(board, metrics, out_dir)
                return metrics
        except KeyboardInterrupt:
            raise KeyboardInterrupt(what_is_kept(out_dir, interrupted=True)) from None
        except SaveError as e:
            raise SaveError(e.errno, f"{e.strerror}; {what_is_kept(out_dir)}", e.filename) from None


def what_is_kept(out_dir: Path, interrupted: bool = False) -> str:
    """What a training run stopped by Ctrl-C (or a failed write) leaves in `out_dir`, and how to go on."""
    command = resume_command(True)  # a sweep's too
    last, best = (out_dir / "last.pt").exists(), (out_dir / "best.pt").exists()
    if interrupted:
        return (f"{out_dir / 'last.pt'} holds the last finished epoch; resume with: python {command}" if last else
                f"no epoch had finished: nothing to resume in {out_dir}; start the run again")
    if last:
        kept = "last.pt and best.pt" if best else "last.pt"
        return f"{kept} in {out_dir} hold the last epochs saved whole; resume with: python {command}"
    if best:
        return f"best.pt in {out_dir} holds the best epoch saved whole, but no last.pt to resume from"
    return "no epoch was saved"


class Sweep(NamedTuple):
    """Runs that differ in one setting, each in the sub-folder <prefix><value>/ of the output folder."""
    key: str  # the setting that varies
    values: list
    prefix: str  # of the sub-folders: "p" gives p0.1/, "seed" gives seed0/
    changes: dict  # settings every run of the sweep changes besides `key`
    report: Callable[[list, list[Path], Path], object]  # (values, their run folders, the folder): the sweep's summary


def differing_settings(asked: Mapping, saved: dict) -> list[str]:
    """The settings a finished run was trained with that differ from those `asked` for now, as 'name: saved -> asked'.
    What the run itself filled in is left out: a mean and std taken from the data."""
    differences = []
    for key, value in asked.items():
        if key in RUNTIME_KEYS or key not in saved or (key in ("mean", "std") and value == "data"):
            continue  # a key the run did not record is a setting added since, whose default keeps what it did
        if saved.get(key) != (parse_augment(value) if key == "augment" else value):
            differences.append(f"{key}: {saved.get(key)} -> {value}")
    return differences


def reusable_run(run_dir: Path, settings: Settings) -> bool:
    """True when `run_dir` holds a finished run trained with `settings` (with the settings its time budget's plan
    chose, if any) and not --overwrite; refuses a finished run with other settings, naming them."""
    if settings.overwrite or not (run_dir / "metrics.json").exists():
        return False
    saved = load_run(run_dir)["metrics"]
    asked = settings_for_plan(settings, Plan(**saved["plan"])) if saved.get("plan") else settings
    differences = differing_settings(asked, saved.get("settings", {}))
    if differences:
        raise UsageError(f"{run_dir} holds a finished run trained with other settings ({'; '.join(differences)}); "
                         "pass --overwrite to train it again with these, or choose another --out-dir")
    return True


def finished_plan(run_dir: Path, ctx: TrainContext) -> Plan:
    """The time budget's plan of the finished run in `run_dir`, read on the main process once it wrote it and
    shared, for the next runs of a sweep to train as it is."""
    saved = [load_run(run_dir)["metrics"]["plan"] if ctx.is_main else None]
    if ctx.world > 1:
        dist.broadcast_object_list(saved, 0)
    return Plan(**saved[0])._replace(fixed=True)


def run_sweeps(sweeps: Sequence[Sweep], script: str, settings: Settings, flags_given: dict, build_model: ModelBuilder,
               out_dir: Path, ctx: TrainContext, plan: Plan | None = None) -> Plan | None:
    """One run per value of the first sweep in out_dir/<prefix><value>/, each swept in turn by the others; a finished
    run is reused when its settings are these, an unfinished one continued with --resume. Under a time budget the
    first run plans and the others train its plan, which is returned. Then the main process writes the sweep's
    report."""
    sweep, inner = sweeps[0], sweeps[1:]
    run_dirs = []
    for value in sweep.values:
        run_dir = out_dir / f"{sweep.prefix}{value}"
        run_settings = dataclasses.replace(settings, **sweep.changes, **{sweep.key: value})
        if run_settings.budget_scaling:  # the swept setting is the sweep's, not the plan's
            run_settings = dataclasses.replace(run_settings, budget_scaling={
                k: v for k, v in run_settings.budget_scaling.items() if k != sweep.key})
        if inner:
            plan = run_sweeps(inner, script, run_settings, flags_given, build_model, run_dir, ctx, plan)
        elif reusable_run(run_dir, run_settings):
            say(ctx, f"{run_dir} is finished; using its results")
        else:
            resume = settings.resume and (run_dir / "last.pt").exists()
            start_or_resume(script, dataclasses.replace(run_settings, resume=resume), flags_given, build_model,
                            run_dir, ctx, plan)
        if settings.time_budget is not None and plan is None and not inner:
            plan = finished_plan(run_dir, ctx)
        run_dirs.append(run_dir)
    if ctx.is_main:
        sweep.report(sweep.values, run_dirs, out_dir)
    return plan


def seeds_sweep(first: int, count: int) -> Sweep:
    """--seeds: the seeds first, first+1, ... in seed<S>/, summarised by seeds.json and seeds.png."""
    if count < 1:
        raise UsageError(f"--seeds must be at least 1 (got {count})")
    return Sweep("seed", list(range(first, first + count)), "seed", {}, summarize_seeds)


def interrupted_outside_training(flags_given: dict, sweep: bool, out_dir: Path) -> str:
    """What Ctrl-C outside an epoch (loading data, between the runs of a sweep, writing a report) leaves, and how to
    go on."""
    command = resume_command(sweep)
    if sweep:
        return (f"the finished runs in {out_dir} are kept, and so is the last epoch of an unfinished one; continue "
                f"with: python {command}")
    if any(flags_given.get(task) for task in TASK_FLAGS):
        return f"no training was affected; run the command again: python {command}"
    return (f"{out_dir} keeps what it held before (a run's last.pt and best.pt are written whole or not at all); "
            f"to go on: python {command}")


TASK_FLAGS = ("compare", "predict", "eval_only", "seeds", "export")  # each one a task of its own: one a command line


def task_checkpoint(flags_given: dict, out_dir: Path) -> Path:
    """The checkpoint --eval-only, --predict and --export read: --checkpoint, else best.pt of the run in --out-dir
    (the script's run folder by default)."""
    return Path(flags_given["checkpoint"]) if "checkpoint" in flags_given else out_dir / "best.pt"


def checkpoint_and_reports(flags_given: dict, out_dir: Path, task: str) -> tuple[Path, Path]:
    """(the checkpoint --eval-only or --predict reads (task_checkpoint), the folder its reports go to): <task>/ beside
    the checkpoint, or --out-dir when --checkpoint names the checkpoint, a folder that must not hold a training run."""
    checkpoint = task_checkpoint(flags_given, out_dir)
    if "checkpoint" not in flags_given or "out_dir" not in flags_given:
        return checkpoint, checkpoint.parent / task
    if any((out_dir / name).exists() for name in ("last.pt", "history.json")):
        raise UsageError(f"--out-dir {out_dir} holds a training run, whose files an evaluation would overwrite: "
                         f"choose another folder, or leave --out-dir out to write into {checkpoint.parent / task}")
    return checkpoint, out_dir


def run_experiment(args: argparse.Namespace, script: str, recipes: dict[str, dict], settings_type: type[Settings],
                   build_model: ModelBuilder, default_out_dir: str, default_recipe: str = "default",
                   sweeps: Sequence[Sweep] = ()) -> int:
    """Everything a script's command line can ask for (see run_command); returns the exit code of its outcome."""
    flags_given = explicit_flags(args)
    out_dir = Path(flags_given.get("out_dir", default_out_dir))
    try:
        return run_command(flags_given, script, recipes, settings_type, build_model, out_dir, default_recipe, sweeps)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        kept = "; best.pt and last.pt keep the last good epochs" if (out_dir / "last.pt").exists() else ""
        print(f"error: {e}; stopped{kept}", file=sys.stderr)
        return 3
    except SaveError as e:
        print(f"error: could not write {e.filename}: {e.strerror}", file=sys.stderr)
        return 4
    except KeyboardInterrupt as e:
        sweep = bool(sweeps) or "seeds" in flags_given
        print(f"\ninterrupted. {str(e) or interrupted_outside_training(flags_given, sweep, out_dir)}", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def check_one_task(flags_given: dict, sweeps: Sequence[Sweep]) -> None:
    """Refuse two tasks on one command line, and --quantize without --export."""
    tasks = [f"--{key.replace('_', '-')}" for key in TASK_FLAGS if flags_given.get(key)]
    if sweeps and "--seeds" not in tasks:  # the script's sweep trains runs as --seeds does, and composes with it
        tasks.append(f"--{sweeps[0].key} with several values")
    if len(tasks) > 1:
        raise UsageError(f"{' and '.join(tasks)} are separate tasks: give one of them")
    if "quantize" in flags_given and "export" not in flags_given:
        raise UsageError("--quantize int8 goes with --export FILE.onnx: it says how to export")


def train_context(settings: Settings) -> TrainContext:
    """Where this process trains: its device and precision, and its place among torchrun's processes."""
    rank, world, local_rank = init_distributed(settings.device)
    device = resolve_device(settings.device, local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return TrainContext(device, resolve_precision(settings.precision, device), rank, world)


def run_command(flags_given: dict, script: str, recipes: dict[str, dict], settings_type: type[Settings],
                build_model: ModelBuilder, out_dir: Path, default_recipe: str, sweeps: Sequence[Sweep]) -> int:
    """The one task of the command line: --compare, --export, --predict, --eval-only, sweeps (the script's own, and
    --seeds inside them) or one training run. `settings_type` is the script's Settings; the settings a sweep varies
    are left out of the flags given."""
    check_one_task(flags_given, sweeps)
    if "compare" in flags_given:
        compare_runs(flags_given["compare"], Path(flags_given.get("out_dir", "runs/compare")))
        return 0
    if "seeds" in flags_given:
        sweeps = [*sweeps, seeds_sweep(flags_given.get("seed", settings_type.seed), flags_given["seeds"])]
    flags_given = {k: v for k, v in flags_given.items() if k not in {"seeds", *(sweep.key for sweep in sweeps)}}
    name = flags_given.get("recipe", default_recipe)
    settings = resolve_settings(flags_given, {"recipe": name, **choose_recipe(recipes, name)}, settings_type)
    ctx = train_context(settings)
    if settings.export:
        return export_model(script, task_checkpoint(flags_given, out_dir), Path(settings.export), settings.quantize,
                            settings.data_dir, not settings.no_download, build_model) if ctx.is_main else 0
    if settings.predict:
        checkpoint, reports = checkpoint_and_reports(flags_given, out_dir, "predict")
        return predict_images(script, settings.predict, settings.tta, build_model, ctx, checkpoint,
                              reports) if ctx.is_main else 0
    if settings.eval_only:
        checkpoint, reports = checkpoint_and_reports(flags_given, out_dir, "eval")
        if ctx.is_main:  # under torchrun rank 0 alone evaluates, prints and writes
            eval_only(script, checkpoint, reports, settings.data_dir, not settings.no_download, settings.tta,
                      settings.corruptions, build_model, ctx)
    elif sweeps:
        for sweep in sweeps:  # every value, before the first run starts
            for value in sweep.values:
                check_settings(dataclasses.replace(settings, **sweep.changes, **{sweep.key: value}))
        run_sweeps(sweeps, script, settings, flags_given, build_model, out_dir, ctx)
    else:
        start_or_resume(script, settings, flags_given, build_model, out_dir, ctx)
    return 0
