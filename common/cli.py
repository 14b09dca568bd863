"""The command line: a run's Settings (each with its default, its flag's help and its check, declared once), made
from the defaults, a recipe and the flags given; then the one task a command line asks for (run_experiment): a
training run, sweeps (--seeds, ex1's dropout values), --compare, --eval-only, --predict or --export; its exit code."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as dist

from .data import AUGMENT_OPS, FILLS, parse_augment, STRENGTH_KEYS
from .device import init_distributed, resolve_device, resolve_precision, say, share_from_rank0, TrainContext
from .files import NonFiniteLoss, resume_command, SaveError, UsageError
from .plots import compare_runs, load_run, summarize_seeds
from .tasks import CALIBRATION_IMAGES, eval_only, export_model, EXPORT_PACKAGES, predict_images
from .train import differing_settings, Plan, settings_for_plan, train_run


def setting(default, help: str | None = None, check: tuple[Callable, str] | None = None, runtime: bool = False,
            flag: str | None = None, **argparse_options):
    """A field of Settings: its `default`; with `help`, its flag (--the-name, or `flag`) and argparse options; a
    `check` (a test, and what a value must be); `runtime`: where and how a run executes (not recorded, not kept)."""
    return dataclasses.field(default=default, metadata=dict(help=help, check=check, runtime=runtime, flag=flag,
                                                           options=argparse_options))


POSITIVE = (lambda value: 0 < value < math.inf, "must be positive")
NOT_NEGATIVE = (lambda value: value >= 0, "must not be negative")
RECIPE = " (default: the recipe's)"
ALL_TEST_IMAGES = 2 ** 31 - 1  # --corruptions without a number: every test image


def image_count(value: str) -> int:
    """A flag's number of images: a whole number, 0 or more."""
    count = int(value)
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {count})")
    return count


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(Mapping):
    """Every setting of a run: these defaults (our recipe's), a recipe's, the flags given; checked, never changed (see
    dataclasses.replace). A script's subclass adds its network's. A Mapping, as saved settings, for build_model."""
    # where the data comes from and how much of it
    data_dir: str = setting("data", "folder holding cifar-10-batches-py/ (or that folder itself); downloaded there if "
                                    "missing (default: data)", runtime=True)
    no_download: bool = setting(False, "never download CIFAR-10; fail with a message if it is missing", runtime=True,
                                action="store_true")
    val_size: int = setting(1000, "validation images, taken from the end of the training set (default: 1000)", type=int)
    limit_train: int | None = setting(None, "train on the first N training images (quick runs)", POSITIVE, type=int)
    seed: int = setting(0, "random seed: two CPU runs with the same seed give the same history (default: 0)", type=int)
    seeds: int | None = setting(None, "train N runs with the seeds --seed, --seed+1, ... in --out-dir/seed<S>/ "
                                      "(finished ones reused); seeds.json and seeds.png: their accuracies' mean ± std",
                                runtime=True, type=int, metavar="N")
    # how long to train: epochs, or a time budget (its plan, common.train.Plan, is not a setting)
    recipe: str = setting("default", "hyperparameter set: 'default' (ours), 'original' (the assignment's) or, in "
                                     "ex1_convnet.py, 'short' (few epochs; --time-budget's unless --recipe is given); "
                                     "explicit flags override it")
    epochs: int | None = setting(30, "number of training epochs" + RECIPE, POSITIVE, type=int)
    time_budget: float | None = setting(
        None, "train for this many minutes of wall-clock time instead of --epochs (validation included; loading, "
              "building and the final test not): the first steps' speed fixes the total steps the learning-rate "
              "schedule runs over; the last epoch may be partial",
        (lambda minutes: 0 < minutes < math.inf, "must be a positive number of minutes"), type=float, metavar="MINUTES")
    budget_scaling: dict | None = None  # a recipe's rule for the settings a budget chooses (see choose_settings)
    patience: int = setting(10, "stop after this many epochs without a better validation accuracy; 0 never stops "
                                "early", NOT_NEGATIVE, type=int)
    # the optimizer and its schedule: one-cycle, or with lr_decay the learning rate x lr_decay after every epoch
    batch_size: int = setting(256, "global batch size, summed over all processes under torchrun" + RECIPE, POSITIVE,
                              type=int)
    optimizer: str = setting("adamw", "AdamW, Adam or SGD with Nesterov momentum" + RECIPE,
                             choices=["adamw", "adam", "sgd"])
    lr: float = setting(2e-3, "peak learning rate" + RECIPE, (POSITIVE[0], "must be positive and finite"), type=float)
    weight_decay: float = setting(0.05, "weight decay" + RECIPE, NOT_NEGATIVE, type=float)
    norm_bias_lr: float = setting(1.0, "learning rate of the BatchNorm biases: X times --lr" + RECIPE, POSITIVE,
                                  type=float, metavar="X")
    lr_decay: float | None = setting(None, "multiply the learning rate by X after every epoch instead of the one-cycle "
                                           "schedule (a linear rise from 0.1 x --lr over the first 20%% of the steps, "
                                           "then a linear fall to 0)" + RECIPE, POSITIVE, type=float, metavar="X")
    label_smoothing: float = setting(0.1, "label smoothing of the training loss" + RECIPE,
                                     (lambda value: 0 <= value < 1, "must be in [0, 1)"), type=float)
    # the input: augmentation and normalisation ('data': the training images' channel mean and std)
    augment: str | list[str] = setting("flip,crop", f"comma-separated augmentation ops from {','.join(AUGMENT_OPS)}, "
                                                    "or 'none'" + RECIPE)
    crop_pad: int = setting(4, "crop: padding before the random 32x32 crop, in pixels; > 0 turns crop on, 0 off",
                            NOT_NEGATIVE, type=int)
    crop_fill: str = setting("zeros", "what crop and rotate put where they uncover the border: zeros, or reflect (the "
                                      "image mirrored at its edge)" + RECIPE, choices=FILLS)
    rotate_deg: float = setting(15.0, "rotate: largest rotation angle in degrees; > 0 turns rotate on, 0 off",
                                NOT_NEGATIVE, type=float)
    jitter: float = setting(0.1, "jitter: colour jitter strength (brightness, contrast, saturation, hue); > 0 turns "
                                 "jitter on, 0 off", NOT_NEGATIVE, type=float)
    gray_p: float = setting(0.05, "gray: probability of turning an image grey; > 0 turns gray on, 0 off",
                            NOT_NEGATIVE, type=float)
    mean: str | list[float] = "data"
    std: str | list[float] = "data"
    # where and how it runs, and the tasks besides training
    out_dir: str | None = setting(None, "where checkpoints, metrics and figures go (default: runs/<experiment>)",
                                  runtime=True)
    device: str = setting("auto", "auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", runtime=True)
    precision: str = setting(
        "auto", "auto (default): bf16 where native (CPUs with fast bf16, GPUs of compute capability 8.0+), fp16 on "
                "older GPUs (gradient scaling), else fp32. bf16 needs compute capability 8.0+ on CUDA; fp16 a GPU",
        runtime=True, choices=["auto", "bf16", "fp16", "fp32"])
    compile: bool = setting(False, "compile the model with torch.compile", runtime=True, action="store_true")
    tensorboard: bool = setting(True, "write no TensorBoard event files (by default a training run writes them into "
                                      "--out-dir)", runtime=True, flag="--no-tensorboard", action="store_false")
    resume: bool = setting(False, "continue the run in --out-dir from its last.pt", runtime=True, action="store_true")
    overwrite: bool = setting(False, "start over in an --out-dir that holds a run", runtime=True, action="store_true")
    eval_only: bool = setting(False, "evaluate --checkpoint on the test set and write its reports (default --out-dir: "
                                     "eval/ beside the checkpoint)", runtime=True, action="store_true")
    checkpoint: str | None = setting(None, "checkpoint for --eval-only, --predict and --export (default: best.pt in "
                                           "--out-dir, by default the script's run folder)", runtime=True)
    predict: list[str] | None = setting(
        None, "predict the class of image files, and of those in folders (any size: the shorter side resized to 32, "
              "the centre cropped): a table, and predictions.json, .csv and .png in --out-dir (default: predict/ "
              "beside the checkpoint); exit code 1 when a file cannot be read", runtime=True, nargs="+", metavar="PATH")
    tta: bool = setting(False, "test-time augmentation for --predict, --eval-only and a training run's final test: "
                               "the softmax averaged over 6 views, the image and its left-right mirror, each as it is "
                               "and shifted by 2 pixels diagonally both ways (zero fill); metrics.json then adds "
                               "test_accuracy_tta and test_accuracy_first1000_tta", runtime=True, action="store_true")
    corruptions: int | None = setting(
        None, "the corruption benchmark after training and with --eval-only: the accuracy on the first N test images "
              "(without N: all) clean and under noise, JPEG, blur, contrast, brightness, darkness, shifts and "
              "downscaling, into metrics.json and corruptions.png; 0 skips it (default: 1,000 with --eval-only, "
              "after training as many as a tenth of its time affords)",
        runtime=True, type=image_count, nargs="?", const=ALL_TEST_IMAGES, metavar="N")
    export: str | None = setting(
        None, "write the model of --checkpoint as an ONNX file for ONNX Runtime: input 'images', uint8 (N, 32, 32, 3) "
              "RGB, output 'probabilities' (N, 10), normalisation inside; then check it against PyTorch on the test "
              f"set. Needs: pip install {EXPORT_PACKAGES}", runtime=True, metavar="FILE.onnx")
    quantize: str | None = setting(None, "with --export: a statically quantised int8 model instead, calibrated on "
                                         f"{CALIBRATION_IMAGES} training images", runtime=True, choices=["int8"])
    compare: list[str] | None = setting(None, "compare finished runs: compare.png and compare.json in --out-dir "
                                              "(default: runs/compare)", runtime=True, nargs="+", metavar="RUN_DIR")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check, value = field.metadata.get("check"), getattr(self, field.name)
            values = value if isinstance(value, list) else [value]  # ex1's dropout: per block, or a sweep's values
            if check and value is not None and not all(check[0](v) for v in values):
                raise UsageError(f"--{field.name.replace('_', '-')} {check[1]} (got {value})")

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    @classmethod
    def runtime_keys(cls) -> set[str]:
        """The settings that say where and how a run executes, not what it computes."""
        return {field.name for field in dataclasses.fields(cls) if field.metadata.get("runtime")}

    def recorded(self) -> dict:
        """The settings as train.log and metrics.json record what a run computes: without the runtime ones."""
        runtime = self.runtime_keys()
        return {k: v for k, v in self.items() if k not in runtime}

    @classmethod
    def from_saved(cls, values: Mapping) -> Settings:
        """Settings from saved ones (a checkpoint's, metrics.json's): new ones default, removed ones dropped."""
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


RUNTIME_KEYS = Settings.runtime_keys()


def add_arguments(parser: argparse.ArgumentParser, settings_type: type[Settings]) -> None:
    """A flag for every setting of `settings_type` with a help text, defaulting to None (see explicit_flags)."""
    for field in dataclasses.fields(settings_type):
        meta = field.metadata
        if meta.get("help"):
            store = meta["options"].get("action", "").startswith("store_")
            parser.add_argument(meta["flag"] or f"--{field.name.replace('_', '-')}", dest=field.name, help=meta["help"],
                                **({"default": None} if store else {}), **meta["options"])


def explicit_flags(args: argparse.Namespace) -> dict:
    """The flags given on the command line and their values (argparse leaves the others None)."""
    return {k: v for k, v in vars(args).items() if v is not None}


def resolve_settings(flags_given: dict, recipe: dict, settings_type: type[Settings] = Settings) -> Settings:
    """The run's settings: the type's defaults, then the recipe, then the flags given; --augment's ops turned on or
    off by the strengths given (> 0 on, 0 off), in AUGMENT_OPS' order; under a time budget no epochs, no early stop (a
    --patience given is noted) and a budget_scaling without the settings a flag gives (--augment gives crop_pad)."""
    if "time_budget" in flags_given and "epochs" in flags_given:
        raise UsageError("--time-budget and --epochs both say how long to train: give one of them")
    values = {**recipe, **flags_given}
    defaults = {key: field.default for key, field in settings_type.__dataclass_fields__.items()}
    on = set(parse_augment(values.get("augment", defaults["augment"])))
    for op, key in STRENGTH_KEYS.items():
        if key in flags_given:
            on = on | {op} if flags_given[key] > 0 else on - {op}
    strength = {op: values.get(key, defaults[key]) for op, key in STRENGTH_KEYS.items()}
    values["augment"] = [op for op in AUGMENT_OPS if op in on and strength.get(op, 1) > 0]
    if values.get("time_budget") is None:
        values["budget_scaling"] = None
    else:
        patience = values.get("patience", defaults["patience"])
        if patience and "patience" in flags_given:
            print(f"note: --patience {patience} is not applied under --time-budget: a budget run trains its whole "
                  "schedule", file=sys.stderr)
        fixed = set(flags_given) | ({"crop_pad"} if "augment" in flags_given else set())
        values.update(epochs=None, patience=0, budget_scaling={
            key: value for key, value in (values.get("budget_scaling") or {}).items() if key not in fixed} or None)
    return settings_type(**values)


class Sweep(NamedTuple):
    """Runs that differ in one setting, each in the sub-folder <prefix><value>/ of the output folder."""
    key: str  # the setting that varies
    values: list
    prefix: str  # of the sub-folders: "p" gives p0.1/, "seed" gives seed0/
    changes: dict  # settings every run of the sweep changes besides `key`
    report: Callable[[list, list[Path], Path], object]  # (values, their run folders, the folder): the sweep's summary


def run_experiment(args: argparse.Namespace, script: str, recipes: dict[str, dict], settings_type: type[Settings],
                   build_model, default_out_dir: str, default_recipe: str = "default", sweeps: Sequence[Sweep] = ()
                   ) -> int:
    """The one task of a script's command line (--compare, --export, --predict, --eval-only, sweeps, a training run);
    returns its exit code. `build_model(settings, *, initial_weights=True)` builds the network from Settings or a
    checkpoint's saved dict (initial_weights False: a checkpoint's weights come next; ex2 fetches no ImageNet's)."""
    flags_given = explicit_flags(args)
    out_dir = Path(flags_given.get("out_dir", default_out_dir))
    try:
        check_one_task(flags_given, sweeps)
        if "compare" in flags_given:
            compare_runs(flags_given["compare"], Path(flags_given.get("out_dir", "runs/compare")))
            return 0
        if "seeds" in flags_given:  # the seeds --seed, --seed+1, ... in seed<S>/, summarised by seeds.json and .png
            if flags_given["seeds"] < 1:
                raise UsageError(f"--seeds must be at least 1 (got {flags_given['seeds']})")
            first = flags_given.get("seed", settings_type.seed)
            sweeps = [*sweeps, Sweep("seed", list(range(first, first + flags_given["seeds"])), "seed", {},
                                     summarize_seeds)]
        flags_given = {k: v for k, v in flags_given.items() if k not in {"seeds", *(sweep.key for sweep in sweeps)}}
        name = flags_given.get("recipe", default_recipe)
        if name not in recipes:
            raise UsageError(f"--recipe {name}: choose from {', '.join(recipes)}")
        settings = resolve_settings(flags_given, {"recipe": name, **recipes[name]}, settings_type)
        for sweep in sweeps:  # every value checked before the first run starts
            for value in sweep.values:
                dataclasses.replace(settings, **sweep.changes, **{sweep.key: value})
        ctx = train_context(settings)
        checkpoint = Path(flags_given.get("checkpoint", out_dir / "best.pt"))  # for --eval-only, --predict, --export
        if settings.export:
            return export_model(script, checkpoint, Path(settings.export), settings.quantize, settings.data_dir,
                                not settings.no_download, build_model) if ctx.is_main else 0
        if settings.predict:
            reports = reports_dir(flags_given, checkpoint, out_dir, "predict")
            return predict_images(script, settings.predict, settings.tta, build_model, ctx, checkpoint,
                                  reports) if ctx.is_main else 0
        if settings.eval_only:
            reports = reports_dir(flags_given, checkpoint, out_dir, "eval")
            if ctx.is_main:  # under torchrun rank 0 alone evaluates, prints and writes
                eval_only(script, checkpoint, reports, settings.data_dir, not settings.no_download, settings.tta,
                          settings.corruptions, build_model, RUNTIME_KEYS, ctx)
        elif sweeps:
            run_sweeps(sweeps, script, settings, flags_given, build_model, out_dir, ctx)
        else:
            train_run(script, settings, flags_given, build_model, out_dir, ctx)
        return 0
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
        return getattr(e, "exit_code", 130)  # 143 after SIGTERM
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


TASK_FLAGS = ("compare", "predict", "eval_only", "seeds", "export")  # each one a task of its own: one a command line


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
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return TrainContext(device, resolve_precision(settings.precision, device), rank, world)


def run_sweeps(sweeps: Sequence[Sweep], script: str, settings: Settings, flags_given: dict, build_model,
               out_dir: Path, ctx: TrainContext, plan: Plan | None = None) -> Plan | None:
    """One run per value of the first sweep in out_dir/<prefix><value>/, each swept by the others (a finished one
    reused, an unfinished one resumed with --resume), then its report. Returns the plan a time budget's first made."""
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
            train_run(script, dataclasses.replace(run_settings, resume=resume), flags_given, build_model, run_dir, ctx,
                      plan=plan)
        if settings.time_budget is not None and plan is None and not inner:  # the next runs train to this one's plan
            saved = load_run(run_dir)["metrics"]["plan"] if ctx.is_main else None
            plan = Plan(**share_from_rank0(saved, ctx))._replace(fixed=True)
        run_dirs.append(run_dir)
    if ctx.is_main:
        sweep.report(sweep.values, run_dirs, out_dir)
    return plan


def reusable_run(run_dir: Path, settings: Settings) -> bool:
    """True when `run_dir` holds a finished run of `settings` (and its plan's choices), not --overwrite; refuses one of
    other settings, naming them (a mean and std taken from the data, a setting added since, not compared)."""
    if settings.overwrite or not (run_dir / "metrics.json").exists():
        return False
    saved = load_run(run_dir)["metrics"]
    asked = settings_for_plan(settings, Plan(**saved["plan"])) if saved.get("plan") else settings
    recorded = saved.get("settings", {})
    differences = differing_settings({k: v for k, v in asked.recorded().items() if k in recorded and not (
        k in ("mean", "std") and v == "data")}, recorded)
    if differences:
        named = "; ".join(f"{key}: {was} -> {value}" for key, was, value in differences)
        raise UsageError(f"{run_dir} holds a finished run trained with other settings ({named}); "
                         "pass --overwrite to train it again with these, or choose another --out-dir")
    return True


def interrupted_outside_training(flags_given: dict, sweep: bool, out_dir: Path) -> str:
    """What Ctrl-C outside an epoch (loading data, between a sweep's runs, a report) leaves, and how to go on."""
    command = resume_command(sweep)
    if sweep:
        return (f"the finished runs in {out_dir} are kept, and so is the last epoch of an unfinished one; continue "
                f"with: python {command}")
    if any(flags_given.get(task) for task in TASK_FLAGS):
        return f"no training was affected; run the command again: python {command}"
    return (f"{out_dir} keeps what it held before (a run's last.pt and best.pt are written whole or not at all); "
            f"to go on: python {command}")


def reports_dir(flags_given: dict, checkpoint: Path, out_dir: Path, task: str) -> Path:
    """Where --eval-only or --predict reports: <task>/ by the checkpoint, or with --checkpoint a run-free --out-dir."""
    if "checkpoint" not in flags_given or "out_dir" not in flags_given:
        return checkpoint.parent / task
    if any((out_dir / name).exists() for name in ("last.pt", "history.json")):
        raise UsageError(f"--out-dir {out_dir} holds a training run, whose files an evaluation would overwrite: "
                         f"choose another folder, or leave --out-dir out to write into {checkpoint.parent / task}")
    return out_dir
