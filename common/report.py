"""A model's test report: the test figures and table, predictions files, the environment, metrics.json.

Imports common.files, common.data, common.evaluation, common.train, common.plots."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import platform
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torchvision

from .files import atomic_write, save_json
from .data import CifarData
from .evaluation import first_test_images, TestResults
from .train import count_parameters
from .plots import plot_confusion, plot_corruption_examples, plot_corruptions, plot_misclassified, plot_per_class


PREDICTION_COLUMNS = ("path", "label", "probability", "top2_label", "top2_probability", "top3_label", "top3_probability")


def save_predictions(rows: list[dict], out_dir: Path) -> None:
    """predictions.json as it is, and predictions.csv with one row per image, its top 3 flattened into columns."""
    save_json(rows, out_dir / "predictions.json")
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(PREDICTION_COLUMNS)
    for row in rows:
        writer.writerow([row["path"], row["label"], row["probability"],
                         *(value for top in row["top3"][1:] for value in (top["label"], top["probability"]))])
    atomic_write(out_dir / "predictions.csv", lambda f: f.write(text.getvalue().encode()))


def print_predictions(rows: list[dict]) -> None:
    """One line per image: file, predicted class and probability, the next two classes."""
    width = min(60, max([len("file"), *(len(row["path"]) for row in rows)])) + 2
    print(f"{'file':<{width}}{'class':<12}{'prob':>7}   next two")
    for row in rows:
        others = ", ".join(f"{top['label']} {top['probability']:.1%}" for top in row["top3"][1:])
        print(f"{row['path']:<{width}}{row['label']:<12}{row['probability']:>7.1%}   {others}")


def cpu_name() -> str:
    """The processor's model name where Linux tells it (/proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _loaded_commit() -> str | None:
    """The git commit checked out when this module was imported (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


LOADED_COMMIT = _loaded_commit()  # read once: a commit made while a run goes on is not the code that ran


def environment_info(device: torch.device) -> dict:
    """Versions, the git commit of the code that runs, and hardware, for metrics.json."""
    hardware = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(device)
        hardware["gpu_count"] = torch.cuda.device_count()
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": np.__version__},
            "git_commit": LOADED_COMMIT, "hardware": hardware}


def print_corruptions(record: dict) -> None:
    """The corruption benchmark as a table: a row per corruption, its accuracy and drop at each severity."""
    print(f"\ncorruption benchmark, first {record['images']} test images: clean {record['clean_accuracy']:.2%}")
    for name in dict.fromkeys(r["corruption"] for r in record["results"]):
        cells = [f"{r['severity']:>5g}: {r['accuracy']:7.2%} ({-r['drop'] * 100:+.1f})"
                 for r in record["results"] if r["corruption"] == name]
        print(f"  {name:<15}" + "   ".join(cells))
    worst = record["worst"]
    print(f"  mean corruption accuracy {record['mean_accuracy']:.2%} (drop {record['mean_drop'] * 100:.1f} points); "
          f"worst {worst['corruption']} {worst['severity']:g} (drop {worst['drop'] * 100:.1f})")


def write_test_report(results: TestResults, data: CifarData, out_dir: Path) -> None:
    """Draw the test figures (per class, confusion, misclassified; the corruption benchmark's when it ran) in `out_dir`
    and print the per-class table (and the benchmark's)."""
    plot_per_class(results.per_class, out_dir / "per_class.png", f"test accuracy per class ({results.accuracy:.2%} overall)")
    plot_confusion(results.confusion, data.classes, out_dir / "confusion.png")
    plot_misclassified(data.test_images, data.test_labels, results.predictions, data.classes, out_dir / "misclassified.png")
    first = first_test_images(len(results.predictions))
    print(f"\n{'class':<12}{'accuracy':>9}")
    for name, acc in results.per_class.items():
        print(f"{name:<12}{acc:>9.2%}")
    print(f"{'all':<12}{results.accuracy:>9.2%}   ({len(results.predictions)} test images; first {first}: "
          f"{results.accuracy_first1000:.2%})")
    if results.accuracy_tta is not None:
        print(f"{'all, --tta':<12}{results.accuracy_tta:>9.2%}   (test-time augmentation; first {first}: "
              f"{results.accuracy_first1000_tta:.2%})")
    if results.corruptions is not None:
        plot_corruptions(results.corruptions, out_dir / "corruptions.png")
        plot_corruption_examples(data.test_images[0], out_dir / "corruption_examples.png", results.corruptions["seed"])
        print_corruptions(results.corruptions)


def write_report(results: TestResults, data: CifarData, model: nn.Module, device: torch.device, settings: dict,
                 environment: dict, out_dir: Path, **run) -> dict:
    """A model's test report in `out_dir`: the figures and table (write_test_report) and metrics.json
    (metrics_record); returns the metrics."""
    write_test_report(results, data, out_dir)
    metrics = metrics_record(results, model, device, data.classes, settings, environment, **run)
    save_json(metrics, out_dir / "metrics.json")
    return metrics


def metrics_record(results: TestResults, model: nn.Module, device: torch.device, classes: Sequence[str],
                   settings: dict, environment: dict, **run) -> dict:
    """metrics.json: the test results, then what `run` adds (training's epochs and speed, or the checkpoint an
    evaluation read), the network's size, where it ran, its classes, its settings (recorded_settings) and the
    environment (versions, commit, hardware)."""
    metrics = {"test_accuracy": results.accuracy, "test_loss": results.loss,
               "test_accuracy_first1000": results.accuracy_first1000, "test_images": len(results.predictions),
               "per_class_accuracy": results.per_class, "confusion_matrix": results.confusion.tolist()}
    if results.accuracy_tta is not None:
        metrics.update(test_accuracy_tta=results.accuracy_tta, test_accuracy_first1000_tta=results.accuracy_first1000_tta)
    if results.corruptions is not None:
        metrics["corruptions"] = results.corruptions
    return {**metrics, **run, "params": count_parameters(model), "device": str(device), "classes": list(classes),
            "settings": settings, **environment}
