"""A run's Settings, made once from the defaults, a recipe and the flags given, then checked; the flags both
scripts share.

Imports common.errors, common.augment, common.export."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Callable, Iterator, Mapping

from .errors import UsageError
from .augment import AUGMENT_OPS, FILLS, STRENGTH_KEYS
from .export import CALIBRATION_IMAGES, EXPORT_PACKAGES


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(Mapping):
    """Every setting of a run, made once by resolve_settings (these defaults, then a recipe, then the flags given),
    checked by check_settings, never changed after: --resume, a sweep's runs and a time budget's choice make new ones
    with dataclasses.replace. A script adds the settings of its own network in a subclass (see ex1_convnet.Settings).
    It reads as a mapping too (settings["lr"]), as the settings a checkpoint saves do, so that a script's
    build_model takes either. The defaults are our recipe's; a recipe lists what differs."""
    # where the data comes from and how much of it
    data_dir: str = "data"
    no_download: bool = False
    val_size: int = 1000
    limit_train: int | None = None
    seed: int = 0
    # how long to train: epochs, or a time budget (its plan, common.budget.Plan, is not a setting)
    recipe: str = "default"
    epochs: int | None = 30
    time_budget: float | None = None
    budget_scaling: dict | None = None  # a recipe's rule for the settings a budget chooses (see choose_settings)
    patience: int = 10
    # the optimizer and its schedule: one-cycle, or with lr_decay the learning rate x lr_decay after every epoch
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    norm_bias_lr: float = 1.0
    lr_decay: float | None = None
    label_smoothing: float = 0.1
    # the input: augmentation and normalisation ('data': the training images' channel mean and std)
    augment: str | list[str] = "flip,crop"
    crop_pad: int = 4
    crop_fill: str = "zeros"  # what crop and rotate put where they uncover the border (augment.FILLS)
    rotate_deg: float = 15.0
    jitter: float = 0.1
    gray_p: float = 0.05
    mean: str | list[float] = "data"
    std: str | list[float] = "data"
    # where and how it runs, and the tasks besides training (RUNTIME_KEYS)
    out_dir: str | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    tensorboard: bool = True  # event files for TensorBoard in the run folder (common.board)
    resume: bool = False
    overwrite: bool = False
    eval_only: bool = False
    checkpoint: str | None = None
    predict: list[str] | None = None
    tta: bool = False
    corruptions: int | None = None  # the corruption benchmark on this many of the first test images (0: not run;
    # None: as many of the first 1,000 as a tenth of the training time affords, see evaluation.corruption_images)
    export: str | None = None
    quantize: str | None = None

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


# Flags that say where and how a run executes, not what it computes: free to change on --resume.
RUNTIME_KEYS = {"data_dir", "no_download", "out_dir", "device", "precision", "compile", "tensorboard",
                "resume", "overwrite", "eval_only", "checkpoint", "compare", "predict", "tta", "corruptions", "export",
                "quantize"}
RESUME_EXTENDABLE = {"epochs", "patience"}


def recorded_settings(settings: Mapping) -> dict:
    """The settings as checkpoints and metrics.json record what a run computes: without RUNTIME_KEYS."""
    return {k: v for k, v in settings.items() if k not in RUNTIME_KEYS}


def settings_from(settings_type: type[Settings], values: Mapping) -> Settings:
    """A script's Settings from saved values (a checkpoint's or metrics.json's): a value for a setting added since
    is its default, one for a setting since removed is left out."""
    fields = {f.name for f in dataclasses.fields(settings_type)}
    return settings_type(**{k: v for k, v in values.items() if k in fields})


ALL_TEST_IMAGES = 2 ** 31 - 1  # --corruptions without a number: every test image


def image_count(value: str) -> int:
    """A flag's number of images: a whole number, 0 or more."""
    count = int(value)
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {count})")
    return count


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both scripts share (all default to None: a flag not given leaves the recipe's value or the Settings
    default)."""
    add_data_arguments(parser.add_argument)
    add_training_arguments(parser.add_argument)
    add_augment_arguments(parser.add_argument)
    add_device_arguments(parser.add_argument)
    add_task_arguments(parser.add_argument)


def add_data_arguments(a: Callable) -> None:
    a("--data-dir", help="folder holding cifar-10-batches-py/ (or that folder itself); downloaded there if missing (default: data)")
    a("--no-download", action="store_true", default=None, help="never download CIFAR-10; fail with a message if it is missing")
    a("--out-dir", help="where checkpoints, metrics and figures go (default: runs/<experiment>)")
    a("--limit-train", type=int, help="train on the first N training images only, for quick runs")
    a("--val-size", type=int, help="validation images, taken from the end of the training set (default: 1000)")
    a("--seed", type=int, help="random seed: two CPU runs with the same seed give the same history (default: 0)")
    a("--seeds", type=int, metavar="N",
      help="train N runs with the seeds --seed, --seed+1, ... in --out-dir/seed<S>/ (finished ones are reused), then "
           "write seeds.json and seeds.png with the mean ± standard deviation of their accuracies")


def add_training_arguments(a: Callable) -> None:
    a("--recipe", help="hyperparameter set: 'default' (ours), 'original' (the assignment's), or in ex1_convnet.py 'short' "
                       "(for a few epochs, what --time-budget uses unless --recipe is given); explicit flags override it")
    a("--epochs", type=int, help="number of training epochs (default: the recipe's)")
    a("--time-budget", type=float, metavar="MINUTES",
      help="train for this many minutes of wall-clock time instead of --epochs (validation included; loading, "
           "building and the final test not): the speed of the first steps fixes the total steps, the learning-rate "
           "schedule runs over them, and the last epoch may be partial")
    a("--patience", type=int,
      help="stop after this many epochs without a better validation accuracy; 0 never stops early")
    a("--batch-size", type=int, help="global batch size, summed over all processes under torchrun (default: the recipe's)")
    a("--optimizer", choices=["adamw", "adam", "sgd"], help="AdamW, Adam or SGD with Nesterov momentum (default: the recipe's)")
    a("--lr", type=float, help="peak learning rate (default: the recipe's)")
    a("--lr-decay", type=float, metavar="X",
      help="multiply the learning rate by X after every epoch instead of the one-cycle schedule (a linear rise from "
           "0.1 x --lr over the first 20%% of the steps, then a linear fall to 0) (default: the recipe's)")
    a("--weight-decay", type=float, help="weight decay (default: the recipe's)")
    a("--label-smoothing", type=float, help="label smoothing of the training loss (default: the recipe's)")


def add_augment_arguments(a: Callable) -> None:
    a("--augment", help=f"comma-separated augmentation ops from {','.join(AUGMENT_OPS)}, or 'none' (default: the recipe's)")
    a("--crop-pad", type=int, help="crop: padding before the random 32x32 crop, in pixels; > 0 turns crop on, 0 off")
    a("--rotate-deg", type=float, help="rotate: largest rotation angle in degrees; > 0 turns rotate on, 0 off")
    a("--jitter", type=float, help="jitter: colour jitter strength (brightness, contrast, saturation, hue); > 0 turns jitter on, 0 off")
    a("--gray-p", type=float, help="gray: probability of turning an image grey; > 0 turns gray on, 0 off")


def add_device_arguments(a: Callable) -> None:
    a("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"],
      help="auto (default): bf16 on GPUs with native bf16 (compute capability 8.0+) and on CPUs with fast bf16, "
           "fp16 on older GPUs, fp32 elsewhere. bf16 needs compute capability 8.0+ on CUDA (refused below); fp16 "
           "runs everywhere (with a gradient scaler); fp32 everywhere, slowest on GPUs")
    a("--compile", action="store_true", default=None, help="compile the model with torch.compile")
    a("--no-tensorboard", dest="tensorboard", action="store_false", default=None,
      help="write no TensorBoard event files (by default a training run writes them into --out-dir)")
    a("--resume", action="store_true", default=None, help="continue the run in --out-dir from its last.pt")
    a("--overwrite", action="store_true", default=None, help="start over in an --out-dir that already holds a run")


def add_task_arguments(a: Callable) -> None:
    a("--eval-only", action="store_true", default=None,
      help="evaluate --checkpoint on the test set and write its reports (default --out-dir: eval/ beside the checkpoint)")
    a("--checkpoint", help="checkpoint for --eval-only (default: best.pt in --out-dir) and for --predict "
                           "(default: best.pt of the script's default run folder)")
    a("--predict", nargs="+", metavar="PATH",
      help="predict the class of image files, and of those in folders (any size: the shorter side resized to 32, the "
           "centre cropped): a table, and predictions.json, .csv and .png in --out-dir (default: predict/ beside the "
           "checkpoint); exit code 1 when a file could not be read")
    a("--tta", action="store_true", default=None,
      help="test-time augmentation for --predict, --eval-only and a training run's final test: the softmax averaged "
           "over 6 views, the image and its left-right mirror, each as it is and shifted by 2 pixels diagonally "
           "both ways (+2,+2 and -2,-2, zero fill); metrics.json then adds test_accuracy_tta and "
           "test_accuracy_first1000_tta")
    a("--corruptions", type=image_count, nargs="?", const=ALL_TEST_IMAGES, metavar="N",
      help="the corruption benchmark after training and with --eval-only: the accuracy on the first N test images "
           "(without N: all) clean and under noise, JPEG, blur, contrast, brightness, darkness, shifts and "
           "downscaling, into metrics.json and corruptions.png; 0 skips it (default: the first 1,000 with "
           "--eval-only; after training as many of them as a tenth of its time affords)")
    a("--export", metavar="FILE.onnx",
      help="write the model of --checkpoint (default: best.pt in --out-dir) as an ONNX file for ONNX Runtime: input "
           "'images', uint8 (N, 32, 32, 3) RGB, output 'probabilities' (N, 10), normalisation inside; then check it "
           f"against PyTorch on the test set. Needs: pip install {EXPORT_PACKAGES}")
    a("--quantize", choices=["int8"],
      help=f"with --export: a statically quantised int8 model instead, calibrated on {CALIBRATION_IMAGES} training images")
    a("--compare", nargs="+", metavar="RUN_DIR",
      help="compare finished runs: compare.png and compare.json in --out-dir (default: runs/compare)")


def explicit_flags(args: argparse.Namespace) -> dict:
    """The flags given on the command line and their values (argparse leaves the others None)."""
    return {k: v for k, v in vars(args).items() if v is not None}


def choose_recipe(recipes: dict[str, dict], name: str) -> dict:
    if name not in recipes:
        raise UsageError(f"--recipe {name}: choose from {', '.join(recipes)}")
    return recipes[name]


def parse_augment(value: str | list) -> list[str]:
    if isinstance(value, list):
        return value
    ops = [] if value.strip() in ("", "none") else [op.strip() for op in value.split(",")]
    unknown = [op for op in ops if op not in AUGMENT_OPS]
    if unknown:
        raise UsageError(f"--augment: unknown op(s) {', '.join(unknown)}; choose from {', '.join(AUGMENT_OPS)} or none")
    return ops


def resolve_settings(flags_given: dict, recipe: dict, settings_type: type[Settings] = Settings) -> Settings:
    """The run's settings: the type's defaults, then the recipe, then the flags given (see explicit_flags); then the
    rules of a time budget (budget_rules) and of the augmentation ops (augment_ops)."""
    if "time_budget" in flags_given and "epochs" in flags_given:
        raise UsageError("--time-budget and --epochs both say how long to train: give one of them")
    values = {**recipe, **flags_given}
    defaults = {key: field.default for key, field in settings_type.__dataclass_fields__.items()}
    strengths = {key: values.get(key, defaults[key]) for key in STRENGTH_KEYS.values()}
    values["augment"] = augment_ops(parse_augment(values.get("augment", defaults["augment"])), strengths, flags_given)
    if values.get("time_budget") is not None:
        values.update(budget_rules(values.get("budget_scaling"), values.get("patience", defaults["patience"]),
                                   flags_given))
    else:
        values["budget_scaling"] = None
    return settings_type(**values)


def augment_ops(ops: list[str], strengths: dict, flags_given: dict) -> list[str]:
    """The ops a run applies, in AUGMENT_OPS' order: a strength given as a flag turns its op on (> 0) or off (0), and
    an op whose strength is 0 is off."""
    on = set(ops)
    for op, key in STRENGTH_KEYS.items():
        if key in flags_given:
            on = on | {op} if flags_given[key] > 0 else on - {op}
    return [op for op in AUGMENT_OPS if op in on and (op not in STRENGTH_KEYS or strengths[STRENGTH_KEYS[op]] > 0)]


def budget_rules(scaling: dict | None, patience: int, flags_given: dict) -> dict:
    """What a time budget changes: no epochs (its plan says how long), no early stop (it trains its whole schedule;
    a --patience given is noted), and a budget_scaling without the settings a flag gives (--augment gives crop_pad
    too), which keep their value."""
    if patience and "patience" in flags_given:
        print(f"note: --patience {patience} is not applied under --time-budget: a budget run trains its whole "
              "schedule", file=sys.stderr)
    fixed = set(flags_given) | ({"crop_pad"} if "augment" in flags_given else set())
    return {"epochs": None, "patience": 0,
            "budget_scaling": {key: value for key, value in (scaling or {}).items() if key not in fixed} or None}


def check_settings(settings: Settings) -> None:
    """Refuse values that cannot train, before any work starts (a script's Settings checks its own, see
    ex1_convnet.Settings)."""
    for key in ("epochs", "batch_size"):
        if settings[key] is not None and settings[key] <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive (got {settings[key]})")
    budget = settings.time_budget
    if budget is not None and not 0 < budget < math.inf:
        raise UsageError(f"--time-budget must be a positive number of minutes (got {budget:g})")
    if not 0 < settings.lr < math.inf:
        raise UsageError(f"--lr must be positive and finite (got {settings.lr})")
    if settings.limit_train is not None and settings.limit_train <= 0:
        raise UsageError(f"--limit-train must be positive (got {settings.limit_train})")
    if settings.weight_decay < 0 or settings.patience < 0 or not 0 <= settings.label_smoothing < 1:
        raise UsageError("--weight-decay and --patience must not be negative, --label-smoothing must be in [0, 1)")
