"""Shared fixtures: a small CIFAR-10 copy in the official file layout, and a way to run the scripts."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# One well-separated colour per class, so that a few epochs learn the task.
PALETTE = np.array([(230, 25, 25), (25, 230, 25), (25, 25, 230), (230, 230, 25), (230, 25, 230),
                    (25, 230, 230), (240, 240, 240), (15, 15, 15), (128, 128, 128), (240, 128, 15)])
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """n images (n, 3072) uint8 whose colour tells their class, with noise; and their labels."""
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = PALETTE[labels][:, :, None, None] + rng.normal(0, 25, (n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), [int(v) for v in labels]


def write_cifar(root: Path, per_batch: int = 64, n_test: int = 120, bytes_keys: bool = False, seed: int = 0) -> Path:
    """Write data_batch_1..5, test_batch and batches.meta under root/cifar-10-batches-py; return root.

    bytes_keys=True writes bytes keys and strings, as the official Python 2 pickles load with encoding='bytes'.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)

    def dump(name, record):
        with open(folder / name, "wb") as f:
            pickle.dump({key(k): v for k, v in record.items()}, f, protocol=4)

    for i in range(1, 6):
        data, labels = make_images(per_batch, rng)
        dump(f"data_batch_{i}", {"batch_label": key(f"training batch {i} of 5"), "labels": labels, "data": data,
                                 "filenames": [key(f"img_{i}_{j}.png") for j in range(per_batch)]})
    data, labels = make_images(n_test, rng)
    dump("test_batch", {"batch_label": key("testing batch 1 of 1"), "labels": labels, "data": data,
                        "filenames": [key(f"test_{j}.png") for j in range(n_test)]})
    dump("batches.meta", {"label_names": [key(n) for n in CLASS_NAMES], "num_cases_per_batch": per_batch, "num_vis": 3072})
    return root


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a script in a subprocess, under torchrun or trains end to end; "
                                       "`make test-fast` (-m 'not slow') leaves these out")


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A small learnable CIFAR-10 copy (320 training, 120 test images) shared by the whole session."""
    return write_cifar(tmp_path_factory.mktemp("cifar"))


# Flags that keep an end-to-end run small: tiny batches, validation of 64, fp32 on the CPU.
QUICK = ["--no-download", "--device", "cpu", "--precision", "fp32", "--val-size", "64", "--batch-size", "32"]


def run_script(script: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a subprocess from the repository root."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def pytest_configure(config):
    if not any(line.split(":")[0].strip() == "slow" for line in config.getini("markers")):
        config.addinivalue_line("markers", "slow: spawns a subprocess or trains a model (deselect with -m 'not slow')")
