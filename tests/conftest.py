"""Shared fixtures and helpers: a small CIFAR-10 copy in the official file layout, the session's ex1 run, running the
scripts, reading what they write."""
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import ex1_convnet  # noqa: E402
import ex2_transfer  # noqa: E402

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


def write_cifar(root: Path, per_batch: int = 64, n_test: int = 120, seed: int = 0) -> Path:
    """Write data_batch_1..5, test_batch and batches.meta under root/cifar-10-batches-py; return root. (The official
    files' own form, Python 2 pickles: tests/test_data.py.)"""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, record):
        with open(folder / name, "wb") as f:
            pickle.dump(record, f, protocol=4)

    for i in range(1, 6):
        data, labels = make_images(per_batch, rng)
        dump(f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": labels, "data": data,
                                 "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]})
    data, labels = make_images(n_test, rng)
    dump("test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels, "data": data,
                        "filenames": [f"test_{j}.png" for j in range(n_test)]})
    dump("batches.meta", {"label_names": CLASS_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return root


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a script in a subprocess, under torchrun or trains end to end; "
                                       "`make test-fast` (-m 'not slow') leaves these out")


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A small learnable CIFAR-10 copy (320 training, 120 test images) shared by the whole session."""
    return write_cifar(tmp_path_factory.mktemp("cifar"))


# Flags that keep an end-to-end run small: tiny batches, validation of 64, fp32 on the CPU, no corruption benchmark
# (the session's ex1 run has one).
QUICK = ["--no-download", "--device", "cpu", "--precision", "fp32", "--val-size", "64", "--batch-size", "32",
         "--corruptions", "0"]
# The session's ex1 run: three epochs on 96 images in batches of 8 learn the fixture's colours (about 0.9 test
# accuracy). Its final test adds --tta and the corruption benchmark on the first 20 test images, runtime flags that
# change no setting: a run with EX1_TRAIN alone trains the same model (the interrupted runs of tests/test_interrupt.py
# and test_robustness.py).
EX1_TRAIN = [*QUICK, "--batch-size", "8", "--limit-train", "96", "--epochs", "3", "--lr", "0.02"]
EX1_RUN = [*EX1_TRAIN, "--tta", "--corruptions", "20"]


def files_of(folder: Path) -> dict:
    """Every file under `folder`: its size and modification time."""
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def ex1_run(cifar_dir, tmp_path_factory) -> Path:
    """The folder of one ex1 training run (EX1_RUN), shared by the whole session. Read it; a test that writes copies
    it first (shutil.copytree) or writes to its own --out-dir: the session ends with an error if it changed."""
    out_dir = tmp_path_factory.mktemp("ex1-run") / "run"
    assert in_process(ex1_convnet.main, *EX1_RUN, "--data-dir", cifar_dir, "--out-dir", out_dir, filters=True)[0] == 0
    written = files_of(out_dir)
    yield out_dir
    assert files_of(out_dir) == written, "a test changed the shared ex1 run"


def run_script(script: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a subprocess from the repository root."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def in_process(main, *argv, filters: bool = False) -> tuple[int, str]:
    """A script's main() in this process where no capsys is at hand (a fixture): (exit code, stdout). The 128-panel
    filter figures (seconds each on a CPU; the session's run draws them) only with `filters`."""
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.MonkeyPatch.context() as patch:
        if not filters:
            patch.setattr(common.train, "plot_filters", lambda *args, **kwargs: None)
        code = main([str(a) for a in argv])
    return code, out.getvalue()


def ex1_settings(*flags: str) -> ex1_convnet.Settings:
    """The settings ex1_convnet.py resolves from these flags, with the recipe --recipe names (else the default)."""
    args = ex1_convnet.parse_args(list(flags))
    name = args.recipe or "default"
    return common.cli.resolve_settings(common.cli.explicit_flags(args), {"recipe": name, **ex1_convnet.RECIPES[name]},
                                       ex1_convnet.Settings)


def call(main, argv, capsys) -> tuple[int, str, str]:
    """Run a script's main() in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The last 'error: ...' line of stderr."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines, f"no 'error:' line in stderr:\n{err[-2000:]}"
    return lines[-1]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def history_of(run_dir: Path) -> list[dict]:
    """history.json's columns that do not depend on the clock, the losses to 1e-4 (two processes once differed in a
    loss's sixth digit; a broken resume moves them far more)."""
    return [{k: pytest.approx(row[k], rel=1e-4) if "loss" in k else row[k]
             for k in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "steps")}
            for row in read_json(Path(run_dir) / "history.json")]


def metrics(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / "metrics.json")


def assert_png(path: Path, min_side: int = 50) -> None:
    """`path` is a PNG file that decodes, each side longer than `min_side` pixels."""
    assert path.is_file(), f"{path.name} missing"
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and min(image.size) > min_side, path.name


def save_untrained_checkpoint(kind: str, settings: dict, model, path: Path) -> Path:
    """A checkpoint of `model` written as a run writes best.pt and last.pt, before any training."""
    optimizer = common.train.make_optimizer(list(model.parameters()), settings["optimizer"], settings["lr"],
                                      settings["weight_decay"])
    training = common.train.Training(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                     [settings["lr"]])
    common.files.save_checkpoint(common.files.checkpoint_state(kind, dict(settings), training, [],
                                                               common.train.BestEpoch()), path)
    return path


def interrupt_validation(monkeypatch, call: int = 2) -> None:
    """evaluate, as validate calls it after every epoch (common.evaluation), raises KeyboardInterrupt at its `call`-th
    call (the validation of that epoch) and passes every other call on."""
    evaluate, calls = common.evaluation.evaluate, iter(range(1, 1 << 30))

    def interrupted(*args, **kwargs):
        if next(calls) == call:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(common.evaluation, "evaluate", interrupted)


def fake_training(calls: list):
    """A stand-in for common.train.train_run, as common.cli calls it, that records its settings (with a time
    budget's `plan` applied) and plan, and writes a one-epoch run's files, with
    accuracies that follow the dropout (training: 0.5 - p/2) and the seed (validation 0.4, test 0.45, plus seed/100)."""
    def train_run(kind, settings, flags_given, build_model, out_dir, ctx, plan=None):
        settings = settings if plan is None else common.train.settings_for_plan(settings, plan)
        calls.append({**settings, "run_dir": out_dir, "plan": plan})
        shift = settings["seed"] / 100
        history = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5 - settings.get("dropout", 0) / 2,
                    "val_loss": 1.2, "val_accuracy": 0.4 + shift, "lr": 0.1, "steps": 1, "seconds": 1.0,
                    "images_per_s": 32.0}]
        metrics = {"test_accuracy": 0.45 + shift, "test_accuracy_first1000": 0.46 + shift,
                   "best_val_accuracy": 0.4 + shift, "best_epoch": 1, "epochs_run": 1, "run_steps": 1,
                   "per_class_accuracy": {name: 0.45 + shift for name in CLASS_NAMES},
                   "settings": {k: v for k, v in settings.items() if k not in common.cli.RUNTIME_KEYS},
                   **({} if plan is None else {"plan": plan._asdict()})}
        out_dir.mkdir(parents=True, exist_ok=True)
        common.files.save_json(history, out_dir / "history.json")
        common.files.save_json(metrics, out_dir / "metrics.json")
        return metrics
    return train_run


@pytest.fixture(scope="session")
def ex2_checkpoint(tmp_path_factory) -> Path:
    """A genuine checkpoint written the way ex2_transfer.py writes them (VGG-11-bn from scratch, no training)."""
    settings = common.cli.resolve_settings({"mode": "scratch"}, ex2_transfer.RECIPES["scratch"], ex2_transfer.Settings)
    model = ex2_transfer.build_model(settings, initial_weights=False)
    return save_untrained_checkpoint("ex2_transfer.py", settings, model, tmp_path_factory.mktemp("ex2") / "best.pt")


@pytest.fixture
def fake_runs(monkeypatch) -> list:
    """The scripts train through fake_training (which loads no data): the settings of each run, in order."""
    calls = []
    monkeypatch.setattr(common.cli, "train_run", fake_training(calls))
    return calls


NARROW_WIDTHS = (8,) * 5  # ex1's network narrow (see narrow)
NARROW_PARAMETERS = "2,730 parameters"  # its parameters, as the console's first line counts them


def narrow(patch: pytest.MonkeyPatch) -> None:
    """ex1's ConvNet 8 channels wide in each block (its own build_model: milliseconds a step), for the tests of the
    driver that need some network trained, not this one; the console names its NARROW_PARAMETERS."""
    patch.setattr(ex1_convnet, "WIDTHS", NARROW_WIDTHS)


@pytest.fixture
def narrow_ex1(monkeypatch):
    """A test's runs train ex1's network narrow (see narrow)."""
    narrow(monkeypatch)


@pytest.fixture
def no_filter_plots(monkeypatch):
    """In-process runs skip the 128-panel filter figures (as in_process does)."""
    monkeypatch.setattr(common.train, "plot_filters", lambda *args, **kwargs: None)
