"""Files written whole or not at all: atomic writes, JSON, checkpoints (saved and loaded), the output folder
(checked, locked) and train.log, the console copied into it.

Imports common.errors."""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import shlex
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch

from .errors import SaveError, UsageError


def current_umask() -> int:
    """The process's umask: os.umask reads it only by setting it, so set a strict one and put it back at once."""
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def atomic_write(path: Path, write: Callable) -> None:
    """Write through `write(file)` to a temporary file beside `path`, fsync it, then rename it over `path`.

    The file gets the mode of any newly created file (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~current_umask())
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


def load_checkpoint(path: Path, script: str) -> dict:
    """Load one of this project's checkpoints (weights_only), refusing other files with a message."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            what = "an empty file"
        elif head != b"PK\x03\x04":
            what = "not a PyTorch checkpoint file"
        elif not zipfile.is_zipfile(path):
            what = "a truncated or corrupt checkpoint"
        elif "Weights only load failed" in str(e):
            what = "it holds objects other than tensors and plain data (refused by weights_only loading)"
        else:
            what = "a corrupt checkpoint"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise UsageError(f"{path}: not a readable checkpoint: {what} ({type(e).__name__}: {detail[:200]})") from None
    if not isinstance(checkpoint, dict) or "kind" not in checkpoint or "model" not in checkpoint:
        raise UsageError(f"{path}: not a checkpoint of this project (a bare state dict or another program's file)")
    if checkpoint["kind"] != script:
        raise UsageError(f"{path}: a checkpoint of {checkpoint['kind']}, not of {script}; use the script that wrote it")
    return checkpoint


@contextlib.contextmanager
def tee_console(path: Path, enabled: bool = True):
    """Append what the block prints to stdout and stderr to `path` as well, after a line naming the command and the
    time; progress-bar redraws (lines that begin with a carriage return) stay on the console."""
    if not enabled:
        yield
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
            yield
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
def run_dir_lock(out_dir: Path):
    """Hold an exclusive lock on out_dir/.lock (with this process's id in it) while the block runs: a second run into
    the same folder is refused at once. The system drops the lock when the process ends, however it ends."""
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
        yield
