"""The pictures a run draws: history, first-layer filters, per-class accuracy, confusion matrix, image grids.

Imports common.files, common.corruptions."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from .files import atomic_write
from .corruptions import corrupt, CORRUPTIONS


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def style_axes(ax, xlabel: str, ylabel: str, integer_x: bool = True) -> None:
    """Labels, a light grid and the legend; whole numbers on an epoch axis."""
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_history(history: list[dict], best_epoch: int | None, path: Path) -> None:
    """Loss and accuracy of training and validation per epoch, the best epoch marked."""
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="validation")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], label="train")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], label="validation")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        style_axes(ax, "epoch", name)
    save_figure(fig, path)


def plot_filters(weight: torch.Tensor, path: Path, title: str) -> None:
    """First-layer filters (out, 3, k, k) as colour images on one grid, each scaled to its own range."""
    plt = pyplot()
    w = weight.detach().float().cpu()
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
    ax.set_ylabel("test accuracy")
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
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def plot_image_grid(images: Sequence[torch.Tensor], titles: Sequence[str], path: Path, empty_title: str) -> None:
    """uint8 images (3, H, W) enlarged on a grid of 8 columns, each with its title."""
    plt = pyplot()
    cols = 8
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=7)
    if not len(images):
        fig.suptitle(empty_title)
    save_figure(fig, path)


def plot_misclassified(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                       classes: Sequence[str], path: Path, count: int = 32) -> None:
    """A grid of the first `count` wrongly classified images, titled true -> predicted."""
    wrong = (predictions != labels).nonzero().flatten()[:count].tolist()
    plot_image_grid([images[i] for i in wrong], [f"{classes[labels[i]]}\n-> {classes[predictions[i]]}" for i in wrong],
                    path, "no misclassified images")


def plot_corruptions(record: dict, path: Path) -> None:
    """Grouped bars: the accuracy under each corruption, one bar a severity (labelled with its value), the clean
    accuracy as a horizontal line and the mean corrupted accuracy in the title."""
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
        ax.bar_label(bars, [f"{r['severity']:g}" for _, r in rows], fontsize=7, padding=2)
    ax.axhline(record["clean_accuracy"], color="black", linestyle="--",
               label=f"clean ({record['clean_accuracy']:.1%})")
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=20, ha="right")
    ax.set_ylim(0, min(1.05, max(record["clean_accuracy"], *(r["accuracy"] for r in record["results"])) * 1.15))
    ax.set_title(f"Accuracy under corruption, {record['images']:,} test images: mean {record['mean_accuracy']:.1%} "
                 f"(drop {record['mean_drop'] * 100:.1f} points)")
    style_axes(ax, "corruption (bar labels: the severity's value)", "accuracy", integer_x=False)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)


def plot_corruption_examples(image: torch.Tensor, path: Path, seed: int = 0) -> None:
    """One uint8 image (3, H, W) under every corruption: a row per corruption, the clean image first, then each
    severity (labelled with its value), drawn as one mosaic."""
    plt = pyplot()
    table = CORRUPTIONS
    columns = 1 + max(len(severities) for severities in table.values())
    h, w = image.shape[-2:]
    gap = max(h // 4, 1)
    mosaic = torch.full((3, len(table) * (h + gap), columns * (w + gap)), 255, dtype=torch.uint8)
    fig, ax = plt.subplots(figsize=(1.3 * columns + 1.2, 1.25 * len(table)))
    for row, (name, severities) in enumerate(table.items()):
        views = [("clean", image)] + [(f"{severity:g}", corrupt(image[None], name, severity, seed)[0])
                                      for severity in severities]
        for column, (label, view) in enumerate(views):
            top, left = row * (h + gap) + gap, column * (w + gap)
            mosaic[:, top:top + h, left:left + w] = view.cpu()
            ax.text(left + w / 2, top - 0.5, label, ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([row * (h + gap) + gap + h / 2 for row in range(len(table))],
                  [name.replace("_", " ") for name in table])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    save_figure(fig, path)
