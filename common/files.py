"""The run folder's files and the errors a user reads: files written whole or not at all (JSON, checkpoints), the
folder checked and locked, train.log (the console copied into it) and the environment a run records."""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision


class UsageError(Exception):
    """A problem with the user's input or environment: reported as one message, exit code 2."""


class SaveError(OSError):
    """Writing a result file failed (a full disk, a lost mount): OSError's errno, strerror and the file's name."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


class UnreadableImage(Exception):
    """An image file that cannot be predicted (not an image, truncated, too large): skipped with this reason."""


def describe_error(error: BaseException) -> str:
    """'Type: first line of the message', short enough for a one-line error report."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def atomic_write(path: Path, write: Callable) -> None:
    """Write through `write(file)` to a temporary file, fsync it, rename it over `path` (mode 0666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0o077)  # os.umask reads the umask only by setting one: put it back at once
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            raise SaveError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def save_json(obj, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def save_checkpoint(obj: dict, path: Path) -> None:
    """torch.save through atomic_write, serialised in memory first: torch's zip writer turns a failed file write
    (a full disk) into a RuntimeError, a plain write keeps the OSError and its errno."""
    def write(f) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        f.write(buffer.getbuffer())

    atomic_write(path, write)


def read_torch_file(path: Path, what: str) -> object:
    """torch.load of `path` with weights_only, or a UsageError that says in one sentence why it is no readable
    `what` (no library detail: a pickle opcode means nothing to a reader)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        head = path.read_bytes()[:4]
        if not head:
            why = "an empty file"
        elif head != b"PK\x03\x04":
            why = f"not a PyTorch {what}"
        elif not zipfile.is_zipfile(path):
            why = f"a truncated or corrupt {what}"
        elif "Weights only load failed" in str(e):
            why = "it holds Python objects besides tensors and plain data, which are not loaded for safety"
        else:
            why = f"a corrupt {what}"
        raise UsageError(f"{path}: not a readable {what}: {why}") from None


def load_checkpoint(path: Path, script: str) -> dict:
    """Load one of `script`'s checkpoints (weights_only), refusing any other file in one sentence."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} is not a file" if path.exists() else
                         f"checkpoint {path} does not exist: train a run first (python {script}), or name a "
                         "checkpoint with --checkpoint PATH")
    checkpoint = read_torch_file(path, "checkpoint file")
    if not isinstance(checkpoint, dict) or "kind" not in checkpoint or "model" not in checkpoint:
        raise UsageError(f"{path}: not a checkpoint of this project (a bare state dict or another program's file)")
    if checkpoint["kind"] != script:
        raise UsageError(f"{path}: a checkpoint of {checkpoint['kind']}, not of {script}; use the script that wrote it")
    return checkpoint


def load_weights(model: torch.nn.Module, state: object, source: str,
                 network: str = "the network its settings describe") -> None:
    """Load the state dict `state` (of the file `source`) into `model`, or a UsageError: it does not fit `network`."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):
        raise UsageError(f"{source}: its weights do not fit {network} (tensors missing, extra or of another shape)"
                         ) from None


TRAINING_STATE = ("optimizer", "scaler")  # what last.pt holds beyond best.pt: what --resume needs beyond the model
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def checkpoint_state(script: str, settings: dict, training, history: list[dict], best, plan=None,
                     fingerprint: str | None = None, classes: Sequence[str] | None = None) -> dict:
    """What last.pt holds after an epoch (best.pt: without TRAINING_STATE): the script, settings, `training`'s state,
    history, `best` epoch, plan and the splits' data fingerprint (the learning rate follows from step and plan)."""
    return {"kind": script, "settings": settings, "model": training.model.state_dict(),
            "optimizer": training.optimizer.state_dict(), "scaler": training.scaler.state_dict(),
            "plan": None if plan is None else plan._asdict(), "epoch": len(history), "history": history,
            "best_epoch": best.epoch, "best_val_accuracy": best.val_accuracy, "data_fingerprint": fingerprint,
            "classes": list(classes or CIFAR_CLASSES)}


def write_checkpoints(held: dict, out_dir: Path) -> None:
    """Write the checkpoints `held` holds (best.pt, then last.pt with history.json) and forget them."""
    if "best" in held:
        save_checkpoint(held.pop("best"), out_dir / "best.pt")
    if "last" in held:
        last = held.pop("last")
        save_checkpoint(last, out_dir / "last.pt")
        save_json(last["history"], out_dir / "history.json")


@contextlib.contextmanager
def tee_console(path: Path, enabled: bool = True):
    """Append what the block prints to `path` too, between a line with the command and time and one with the exception
    that ends it, if any, but progress-bar redraws (\r); yields the log file (None when not `enabled`)."""
    if not enabled:
        yield None
        return

    class Tee:
        def __init__(self, console, log):
            self.console, self.log = console, log

        def write(self, text):
            self.console.write(text)
            if not text.startswith("\r"):
                self.log.write(text)
            return len(text)

        def flush(self):
            self.console.flush()
            self.log.flush()

        def isatty(self):
            return False

    with open(path, "a", encoding="utf-8") as log:
        log.write(f"==== {datetime.datetime.now():%Y-%m-%d %H:%M:%S}  python {shlex.join(sys.argv)}\n")
        original = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
        try:
            yield log
        except BaseException as e:  # the log ends with what stopped the run, as the console says it
            log.write(f"{'interrupted' if isinstance(e, KeyboardInterrupt) else 'error'}: {e}\n")
            raise
        finally:
            sys.stdout, sys.stderr = original


def prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and make sure files can be written there."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None


@contextlib.contextmanager
def run_folder(out_dir: Path, main: bool = True):
    """Make `out_dir`; if `main` made it and the block fails before any checkpoint, remove it (nothing left behind)."""
    created = main and not out_dir.exists()
    prepare_out_dir(out_dir)
    try:
        yield
    except BaseException:
        if created and not any(out_dir.glob("*.pt")):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


@contextlib.contextmanager
def run_dir_lock(out_dir: Path):
    """Hold an exclusive lock on out_dir/.lock (holding this process's id) while the block runs: a second run into the
    folder is refused at once. The file goes at the end; the lock goes with the process, however it ends."""
    import fcntl  # POSIX only: imported here so that the module loads everywhere
    with open(out_dir / ".lock", "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise UsageError(f"{out_dir} is in use by another run (process {holder}); wait for it to end, or choose "
                             "another --out-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            (out_dir / ".lock").unlink(missing_ok=True)


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
        hardware.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count())
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": np.__version__},
            "git_commit": LOADED_COMMIT, "hardware": hardware}


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run, its state saved: the exit code a shell expects (128 + the signal)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


def stop_on_signals(stack: contextlib.ExitStack) -> dict:
    """Until `stack` closes, SIGINT (Ctrl-C) and SIGTERM set stop["signal"] instead of interrupting: the training loop
    saves the run at the step it reached and stops. A second one stops at once (atomic_write keeps files whole)."""
    stop = {"signal": None}

    def asked(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum

    for signum in (signal.SIGINT, signal.SIGTERM):
        stack.callback(signal.signal, signum, signal.signal(signum, asked))
    return stop


@contextlib.contextmanager
def what_a_stop_keeps(out_dir: Path):
    """Ctrl-C or a failed write while the block trains: said with what `out_dir` keeps and how to go on."""
    try:
        yield
    except KeyboardInterrupt as e:
        if str(e):  # it says what is kept already (train.Stopped)
            raise
        raise KeyboardInterrupt(what_is_kept(out_dir, interrupted=True)) from None
    except SaveError as e:
        raise SaveError(e.errno, f"{e.strerror}; {what_is_kept(out_dir)}", e.filename) from None


def resume_command(resumes: bool) -> str:
    """This call's command line, to run again as it is or, when it `resumes`, with --resume added."""
    return shlex.join([*sys.argv, *(["--resume"] if resumes and "--resume" not in sys.argv else [])])


def what_is_kept(out_dir: Path, interrupted: bool = False) -> str:
    """What a training run stopped by Ctrl-C (or a failed write) leaves in `out_dir`, and how to go on."""
    command = resume_command(True)  # a sweep's too
    last, best = (out_dir / "last.pt").exists(), (out_dir / "best.pt").exists()
    if interrupted:
        return (f"{out_dir / 'last.pt'} holds the last finished epoch; resume with: python {command}" if last else
                f"no epoch had finished: nothing to resume in {out_dir}; start the run again")
    if last:
        kept = "last.pt and best.pt" if best else "last.pt"
        return f"{kept} in {out_dir} hold the last epochs saved whole; resume with: python {command}"
    if best:
        return f"best.pt in {out_dir} holds the best epoch saved whole, but no last.pt to resume from"
    return "no epoch was saved"
