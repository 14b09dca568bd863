"""Finished runs side by side: --compare (compare.json and .png) and --seeds (seeds.json and .png).

Imports common.errors, common.files, common.plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UsageError
from .files import save_json
from .plots import pyplot, save_figure, style_axes


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
    """Epoch by epoch mean of histories that may differ in length (early stopping): each epoch over the runs that
    reached it."""
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
    """history.json and metrics.json of finished runs (a --seeds folder gives its mean), with a message for a folder
    that holds neither."""
    return [_load_seeds(d) if (d / "seeds.json").exists() else load_run(d) for d in map(Path, run_dirs)]


def run_values(run: dict) -> dict[str, list[float]]:
    """The final training and validation accuracies and SEED_METRICS of a loaded run: one value each, or one per
    seed of a --seeds folder."""
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
    save_figure(fig, out_dir / "compare.png")
    summary = {"runs": []}
    for r in runs:
        row = {"run": r["run"], "test_accuracy": r["metrics"]["test_accuracy"],
               "test_accuracy_first1000": r["metrics"]["test_accuracy_first1000"],
               "best_val_accuracy": r["metrics"]["best_val_accuracy"], "best_epoch": r["metrics"]["best_epoch"],
               "epochs_run": r["metrics"]["epochs_run"], "val_accuracy": [h["val_accuracy"] for h in r["history"]],
               "val_loss": [h["val_loss"] for h in r["history"]]}
        if "members" in r:
            row.update(seeds=r["seeds"]["seeds"], test_accuracy_std=r["seeds"]["test_accuracy"]["std"])
        summary["runs"].append(row)
    save_json(summary, out_dir / "compare.json")
    width = max(len(r["run"]) for r in runs) + 2
    print(f"{'run':<{width}}{'test':>8}{'first 1000':>12}{'best val':>10}{'epochs':>8}")
    for run, r in zip(runs, summary["runs"]):
        seeds = f"  mean of {len(r['seeds'])} seeds: {format_spread(run['seeds']['test_accuracy'])}" if "seeds" in r else ""
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
    for seed, run in zip(seeds, runs):
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
