"""The pictures: a run's history, first-layer filters, per-class accuracy, confusion matrix, image grids and the
corruption benchmark's; and finished runs side by side: --compare and --seeds (their .json and .png)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .files import atomic_write, save_json, UsageError


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    pyplot().close(fig)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def style_axes(ax, xlabel: str, ylabel: str, integer_x: bool = True) -> None:
    """Labels, a light grid, a legend of labelled lines; whole numbers on an epoch axis, percent on an accuracy one."""
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
    if "accuracy" in ylabel:
        ax.yaxis.set_major_formatter(lambda y, _: f"{y * 100:g}%")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def plot_history(history: list[dict], best_epoch: int | None, path: Path, train_images: int, val_images: int) -> None:
    """Loss and accuracy of training and validation, and the learning rate: a dot per epoch, the best epoch marked."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    panels = {"loss": {"train": "train_loss", "validation": "val_loss"},
              "accuracy": {"train": "train_accuracy", "validation": "val_accuracy"},
              "learning rate (at the epoch's start)": {"learning rate": "lr"}}
    for ax, (name, lines) in zip(axes, panels.items(), strict=True):
        for label, key in lines.items():
            ax.plot([r["epoch"] for r in history], [r[key] for r in history], "o-", ms=4, label=label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        style_axes(ax, "epoch", name)
    fig.suptitle(f"Loss and accuracy per epoch: {train_images:,} training images (measured while they train), "
                 f"{val_images:,} validation images")
    save_figure(fig, path)


def plot_filters(model: torch.nn.Module, path: Path, title: str) -> None:
    """The first convolution's filters (out, 3, k, k) as colour images on one grid, each scaled to its own range."""
    plt = pyplot()
    w = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight.detach().float().cpu()
    low = w.amin((1, 2, 3), keepdim=True)
    high = w.amax((1, 2, 3), keepdim=True)
    w = ((w - low) / (high - low).clamp(min=1e-8)).permute(0, 2, 3, 1)  # (out, k, k, 3)
    cols = 16
    rows = math.ceil(len(w) / cols)
    k = w.shape[1]
    grid = torch.ones(rows * (k + 1) + 1, cols * (k + 1) + 1, 3)  # white lines between filters
    for i, image in enumerate(w):
        r, c = divmod(i, cols)
        grid[1 + r * (k + 1):1 + r * (k + 1) + k, 1 + c * (k + 1):1 + c * (k + 1) + k] = image
    fig, ax = plt.subplots(figsize=(cols * 0.5, rows * 0.5 + 0.4))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.axis("off")
    ax.set_title(title)
    save_figure(fig, path)


def plot_per_class(accuracy: dict[str, float], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(list(accuracy), list(accuracy.values()), color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in accuracy.values()], fontsize=8)
    ax.set_ylim(0, 1.05)
    style_axes(ax, "class", "test accuracy", integer_x=False)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    save_figure(fig, path)


def plot_confusion(matrix: torch.Tensor, classes: Sequence[str], path: Path) -> None:
    plt = pyplot()
    m = matrix.numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(m, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"Confusion matrix of the {m.sum():,} test images\nrows: the true class, columns: the predicted one")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def plot_image_grid(images: Sequence[torch.Tensor], titles: Sequence[str], path: Path, title: str) -> None:
    """uint8 images (3, H, W) enlarged on a grid of up to 8 columns, as few rows as fit them, each with its title."""
    plt = pyplot()
    rows = max(1, math.ceil(len(images) / 8))
    cols = max(1, math.ceil(len(images) / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.7), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_misclassified(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                       classes: Sequence[str], path: Path, count: int = 32) -> None:
    """A grid of the first `count` wrongly classified test images, each titled with its true and predicted class."""
    wrong = (predictions != labels).nonzero().flatten()[:count].tolist()
    titles = [f"true {classes[labels[i]]}\n→ {classes[predictions[i]]}" for i in wrong]
    plot_image_grid([images[i] for i in wrong], titles, path, f"The first {len(wrong)} misclassified of the "
                    f"{len(labels):,} test images: true → predicted class" if wrong else "no misclassified images")


def plot_corruptions(record: dict, path: Path, strengths: Mapping[str, str]) -> None:
    """Grouped bars: the accuracy under each corruption, a bar per severity labelled by `strengths` (corruption ->
    format of its strength), the clean accuracy as a horizontal line and the mean corrupted accuracy in the title."""
    plt = pyplot()
    names = list(dict.fromkeys(r["corruption"] for r in record["results"]))
    levels = max(r["level"] for r in record["results"])
    width = 0.8 / levels
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5))
    colors = plt.get_cmap("viridis")([0.25 + 0.5 * i / max(levels - 1, 1) for i in range(levels)])
    for level in range(1, levels + 1):
        rows = [(names.index(r["corruption"]), r) for r in record["results"] if r["level"] == level]
        x = [i - 0.4 + (level - 0.5) * width for i, _ in rows]
        bars = ax.bar(x, [r["accuracy"] for _, r in rows], width, color=colors[level - 1], label=f"severity {level}")
        ax.bar_label(bars, [strengths[r["corruption"]].format(r["severity"]) for _, r in rows], fontsize=7, padding=2,
                     rotation=90, bbox={"color": "white", "pad": 0.5})
    ax.axhline(record["clean_accuracy"], color="black", linestyle="--", label=f"clean ({record['clean_accuracy']:.1%})")
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=20, ha="right")
    ax.set_ylim(0, max(record["clean_accuracy"], *(r["accuracy"] for r in record["results"])) * 1.3)
    ax.set_title(f"Accuracy under corruption, the first {record['images']:,} test images: mean "
                 f"{record['mean_accuracy']:.1%} (drop {record['mean_drop'] * 100:.1f} points)")
    style_axes(ax, "corruption (bar labels: its strength)", "accuracy", integer_x=False)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)


def plot_corruption_examples(rows: list[tuple[str, list[tuple[str, torch.Tensor]]]], path: Path, title: str) -> None:
    """Rows of labelled uint8 images (3, H, W), a row per corruption (see evaluation.corruption_examples), drawn as
    one mosaic with each row's name on the left and each image's label above it."""
    plt = pyplot()
    columns = max(len(views) for _, views in rows)
    h, w = rows[0][1][0][1].shape[-2:]
    gap = max(h // 4, 1)
    mosaic = torch.full((3, len(rows) * (h + gap), columns * (w + gap)), 255, dtype=torch.uint8)
    fig, ax = plt.subplots(figsize=(1.3 * columns + 1.2, 1.25 * len(rows)))
    for row, (_, views) in enumerate(rows):
        for column, (label, view) in enumerate(views):
            top, left = row * (h + gap) + gap, column * (w + gap)
            mosaic[:, top:top + h, left:left + w] = view.cpu()
            ax.text(left + w / 2, top - 0.5, label, ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([row * (h + gap) + gap + h / 2 for row in range(len(rows))],
                  [name.replace("_", " ") for name, _ in rows])
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    ax.set_title(title)
    save_figure(fig, path)


SEED_METRICS = ("test_accuracy", "test_accuracy_first1000", "best_val_accuracy")  # what seeds.json spreads


def spread(values: Sequence[float]) -> dict:
    """The values with their mean, sample standard deviation (None for a single value), min and max."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"values": list(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def format_spread(values: dict) -> str:
    """'84.1 ± 0.3%' for a spread of accuracies; '84.1%' when there is no spread (one value)."""
    if values["std"] is None:
        return f"{values['mean']:.1%}"
    return f"{values['mean'] * 100:.1f} ± {values['std'] * 100:.1f}%"


def mean_history(histories: Sequence[list[dict]]) -> list[dict]:
    """Epoch by epoch mean of histories, each epoch over the runs that reached it (early stopping ends some sooner)."""
    longest = max(histories, key=len)
    return [{key: float(np.mean([h[i][key] for h in histories if len(h) > i])) if key != "epoch" else row["epoch"]
             for key in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")}
            for i, row in enumerate(longest)]


def load_run(run_dir: Path) -> dict:
    try:
        history = json.loads((run_dir / "history.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{run_dir}: not a finished run (needs history.json and metrics.json, or the seeds.json of "
                         f"--seeds: {e})") from None
    return {"run": str(run_dir), "history": history, "metrics": metrics}


def _load_seeds(run_dir: Path) -> dict:
    """A --seeds folder as one run: the mean history and metrics of its seed<S>/ runs, which it keeps as members."""
    seeds = json.loads((run_dir / "seeds.json").read_text())
    members = [load_run(run_dir / f"seed{seed}") for seed in seeds["seeds"]]
    history = mean_history([m["history"] for m in members])
    metrics = {**{key: seeds[key]["mean"] for key in SEED_METRICS}, "best_epoch": None, "epochs_run": len(history)}
    return {"run": str(run_dir), "history": history, "metrics": metrics, "members": members, "seeds": seeds}


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    """history.json and metrics.json of finished runs (a --seeds folder: its mean), or load_run's UsageError."""
    return [_load_seeds(d) if (d / "seeds.json").exists() else load_run(d) for d in map(Path, run_dirs)]


def run_values(run: dict) -> dict[str, list[float]]:
    """A loaded run's final train and val accuracies and SEED_METRICS: one value each, or one per --seeds member."""
    members = run.get("members", [run])
    return {"final_train_accuracy": [m["history"][-1]["train_accuracy"] for m in members],
            "final_val_accuracy": [m["history"][-1]["val_accuracy"] for m in members],
            **{key: [m["metrics"][key] for m in members] for key in SEED_METRICS}}


def compare_runs(run_dirs: Sequence[str | Path], out_dir: Path) -> dict:
    """Overlay the runs' validation curves in compare.png, write compare.json, print their test accuracies.
    A --seeds folder takes part with its mean (and the spread of its test accuracy)."""
    plt = pyplot()
    runs = load_runs(run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        epochs = [r["epoch"] for r in run["history"]]
        label = Path(run["run"]).name + (f" (mean of {len(run['members'])} seeds)" if "members" in run else "")
        ax_loss.plot(epochs, [r["val_loss"] for r in run["history"]], label=label)
        ax_acc.plot(epochs, [r["val_accuracy"] for r in run["history"]], label=label)
    style_axes(ax_loss, "epoch", "validation loss")
    style_axes(ax_acc, "epoch", "validation accuracy")
    fig.suptitle(f"Validation loss and accuracy per epoch of {len(runs)} runs, each on its own validation images")
    save_figure(fig, out_dir / "compare.png")
    summary = {"runs": []}
    for r in runs:
        row = {"run": r["run"], **{key: r["metrics"][key] for key in (*SEED_METRICS, "best_epoch", "epochs_run")},
               **{key: [h[key] for h in r["history"]] for key in ("val_accuracy", "val_loss")}}
        if "members" in r:
            row.update(seeds=r["seeds"]["seeds"], test_accuracy_std=r["seeds"]["test_accuracy"]["std"])
        summary["runs"].append(row)
    save_json(summary, out_dir / "compare.json")
    width = max(len(r["run"]) for r in runs) + 2
    print(f"{'run':<{width}}{'test':>8}{'first 1000':>12}{'best val':>10}{'epochs':>8}")
    for run, r in zip(runs, summary["runs"], strict=False):
        seeds = f"  mean of {len(r['seeds'])} seeds: {format_spread(run['seeds']['test_accuracy'])}" if "seeds" in r \
            else ""
        print(f"{r['run']:<{width}}{r['test_accuracy']:>8.2%}{r['test_accuracy_first1000']:>12.2%}"
              f"{r['best_val_accuracy']:>10.2%}{r['epochs_run']:>8}{seeds}")
    print(f"wrote {out_dir / 'compare.png'} and {out_dir / 'compare.json'}")
    return summary


def summarize_seeds(seeds: Sequence[int], run_dirs: Sequence[Path], out_dir: Path) -> dict:
    """seeds.json (each run's SEED_METRICS with their spread) and seeds.png (each run's validation curve and their
    mean) for finished runs that differ only in their seed; prints 'test accuracy 84.1 ± 0.3% over 3 seeds'."""
    runs = [load_run(Path(d)) for d in run_dirs]
    commits = [r["metrics"].get("git_commit") for r in runs]
    summary = {"seeds": list(seeds), "runs": [r["run"] for r in runs], "git_commits": commits,
               **{key: spread([r["metrics"][key] for r in runs]) for key in SEED_METRICS}}
    if len(set(commits)) > 1:
        print(f"note: these runs were trained by {len(set(commits))} different commits of the project "
              f"({', '.join(str(c)[:7] for c in dict.fromkeys(commits))}): their spread is not the seeds' alone")
    save_json(summary, out_dir / "seeds.json")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, run in zip(seeds, runs, strict=False):
        ax.plot([h["epoch"] for h in run["history"]], [h["val_accuracy"] for h in run["history"]], alpha=0.5,
                linewidth=1, label=f"seed {seed}")
    mean = mean_history([r["history"] for r in runs])
    ax.plot([h["epoch"] for h in mean], [h["val_accuracy"] for h in mean], color="black", linewidth=2, label="mean")
    ax.set_title(f"test accuracy {format_spread(summary['test_accuracy'])} over {len(runs)} seeds")
    style_axes(ax, "epoch", "validation accuracy")
    save_figure(fig, out_dir / "seeds.png")
    print(f"test accuracy {format_spread(summary['test_accuracy'])} over {len(runs)} seed{'s' * (len(runs) != 1)} "
          f"(first 1000: {format_spread(summary['test_accuracy_first1000'])}); seeds.json and seeds.png in {out_dir}")
    return summary
