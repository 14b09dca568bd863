"""Exercise 1: a 5-block ConvNet trained from scratch on CIFAR-10.

    python ex1_convnet.py                                  # default recipe, reports in runs/ex1/
    python ex1_convnet.py --recipe original                # the assignment's hyperparameters
    python ex1_convnet.py --epochs 3 --limit-train 5000    # a quick check
    python ex1_convnet.py --time-budget 60                 # the best model an hour buys here (the 'short' recipe)
    python ex1_convnet.py --resume                         # continue an interrupted run
    python ex1_convnet.py --eval-only --checkpoint runs/ex1/best.pt
    python ex1_convnet.py --predict my_photos/ cat.jpg [--tta]   # classify your images with runs/ex1/best.pt
    python ex1_convnet.py --no-bn --out-dir runs/ex1-nobn  # then: --compare runs/ex1 runs/ex1-nobn
    python ex1_convnet.py --dropout 0.1 0.3 0.5 0.7 0.9 --out-dir runs/dropout
    python ex1_convnet.py --seeds 3 --out-dir runs/ex1-seeds   # 3 seeds: mean ± std in seeds.json
    torchrun --standalone --nproc_per_node=4 ex1_convnet.py  # 4 GPUs (or CPU processes) of one machine

Each block is Conv3x3 (pad 1) -> BatchNorm -> MaxPool 2x2 -> ReLU -> Dropout; one Linear 512 -> 10 ends it.
"""
import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Mapping

import torch.nn as nn

import common

WIDTHS = (128, 512, 512, 512, 512)

RECIPES = {
    # Ours (common.cli.Settings' defaults): AdamW, one-cycle, label smoothing, flips and translations (a flag that
    # turns on rotate, jitter or gray gets the strength set there).
    "default": {},
    # The assignment's: Adam, lr x0.95 per epoch, heavier augmentation, mean/std 0.5.
    "original": dict(batch_size=200, optimizer="adam", weight_decay=1e-3, lr_decay=0.95, label_smoothing=0.0,
                     dropout=[0.4, 0.3, 0.3, 0.3, 0.3], linear_init_std=1e-3, augment="flip,crop,rotate,jitter",
                     crop_pad=3, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    # For the few epochs a CPU hour buys (--time-budget's unless --recipe is given): smaller steps, no dropout and a
    # lighter crop (a network that sees each image 3-5 times underfits), BatchNorm biases at 8 times the learning rate
    # (docs/probes.md), a 5-degree rotation and mirrored borders (docs/robustness.md). A time budget's plan moves
    # dropout, crop padding and label smoothing towards the default recipe's as it buys more epochs (choose_settings).
    "short": dict(epochs=5, batch_size=64, dropout=0.0, augment="flip,crop,rotate", crop_pad=2, crop_fill="reflect",
                  rotate_deg=5.0, label_smoothing=0.2, norm_bias_lr=8.0,
                  budget_scaling={"epochs": [10, 30], "dropout": [0.0, 0.1], "crop_pad": [2, 4],
                                  "label_smoothing": [0.2, 0.1]}),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(common.cli.Settings):
    """common.cli.Settings and this network's own."""
    dropout: float | list[float] = common.cli.setting(  # of every block, or one value per block
        0.1, "dropout of every block (default: the recipe's); several values train one model each in --out-dir/p<P>/ "
             "(augmentation off unless --augment) and draw dropout_sweep.png",
        (lambda p: 0 <= p < 1, "must be in [0, 1)"), type=float, nargs="+", metavar="P")
    batch_norm: bool = common.cli.setting(True, "the variant without BatchNorm", flag="--no-bn", action="store_false")
    linear_init_std: float | None = None  # the last layer's initial weights: normal with this std (None: PyTorch's)


def build_model(settings: Mapping, *, initial_weights: bool = True) -> nn.Sequential:
    """The ConvNet for these settings, from random weights (all it has: `initial_weights` changes nothing)."""
    dropout = settings["dropout"]
    per_block = dropout if isinstance(dropout, list) else [dropout] * len(WIDTHS)
    layers, in_channels = [], 3
    for width, p in zip(WIDTHS, per_block, strict=True):
        layers += [nn.Conv2d(in_channels, width, 3, padding=1)]
        layers += [nn.BatchNorm2d(width)] if settings["batch_norm"] else []
        layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True), nn.Dropout(p)]
        in_channels = width
    classifier = nn.Linear(WIDTHS[-1], 10)
    if settings["linear_init_std"]:
        nn.init.normal_(classifier.weight, 0.0, settings["linear_init_std"])
    return nn.Sequential(*layers, nn.Flatten(), classifier)


def report_dropout_sweep(ps: list[float], run_dirs: list[Path], out_dir: Path) -> None:
    """dropout_sweep.json and a table (per p its run's accuracies, or their mean and std over its seeds), and
    dropout_sweep.png (final training and validation accuracy against p ± std, each p's validation curve)."""
    rows = []
    for p, run in zip(ps, common.plots.load_runs(run_dirs), strict=True):
        row = {"p": p, "run": run["run"]}
        for key, values in common.plots.run_values(run).items():
            if key != "test_accuracy_first1000":
                spread = common.plots.spread(values)
                row[key] = spread["mean"]
                if "members" in run:
                    row[f"{key}_std"] = spread["std"]
        row["val_accuracy"] = [h["val_accuracy"] for h in run["history"]]
        if "members" in run:
            row["seeds"] = run["seeds"]["seeds"]
        rows.append(row)
    fig, (ax_p, ax_curves) = common.plots.pyplot().subplots(1, 2, figsize=(11, 4))
    for key, label in (("final_train_accuracy", "train (last epoch)"),
                       ("final_val_accuracy", "validation (last epoch)")):
        ax_p.errorbar(ps, [r[key] for r in rows], yerr=[r.get(f"{key}_std") or 0 for r in rows], fmt="o-",
                      capsize=3, label=label)
    for r in rows:
        ax_curves.plot(range(1, len(r["val_accuracy"]) + 1), r["val_accuracy"], label=f"p={r['p']}")
    common.plots.style_axes(ax_p, "dropout p", "accuracy", integer_x=False)
    common.plots.style_axes(ax_curves, "epoch", "validation accuracy")
    fig.suptitle(f"Dropout: the accuracy of {len(rows)} runs against p (left, on their training and validation images) "
                 "and their validation curves")
    common.plots.save_figure(fig, out_dir / "dropout_sweep.png")
    common.files.save_json({"runs": rows}, out_dir / "dropout_sweep.json")
    print(f"{'p':>5}{'train':>9}{'val':>9}{'test':>9}"
          + ("   (means over seeds; test ± std)" if "seeds" in rows[0] else ""))
    for r in rows:
        spread = f"   ± {r['test_accuracy_std']:.2%}" if r.get("test_accuracy_std") is not None else ""
        print(f"{r['p']:>5}{r['final_train_accuracy']:>9.2%}{r['final_val_accuracy']:>9.2%}{r['test_accuracy']:>9.2%}{spread}")
    print(f"wrote {out_dir / 'dropout_sweep.png'} and {out_dir / 'dropout_sweep.json'}")


def dropout_sweep(args: argparse.Namespace) -> common.cli.Sweep:
    """One run per --dropout value in p<P>/, without augmentation unless a flag asks for it."""
    augment_given = any(getattr(args, key) is not None for key in ("augment", *common.data.STRENGTH_KEYS.values()))
    return common.cli.Sweep("dropout", args.dropout, "p", {} if augment_given else {"augment": []},
                            report_dropout_sweep)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.cli.add_arguments(parser, Settings)
    args = parser.parse_args(argv)
    if args.dropout is not None and len(args.dropout) == 1:
        args.dropout = args.dropout[0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.cli.run_experiment(args, "ex1_convnet.py", RECIPES, Settings, build_model, "runs/ex1",
                                     default_recipe="short" if args.time_budget is not None else "default",
                                     sweeps=[dropout_sweep(args)] if isinstance(args.dropout, list) else [])


if __name__ == "__main__":
    sys.exit(main())
