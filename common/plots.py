"""The pictures a run draws: history, first-layer filters, per-class accuracy, confusion matrix, image grids.

Imports common.files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from .files import atomic_write


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
