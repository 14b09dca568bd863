"""A run watched in TensorBoard: event files in the run folder, on one step axis (the optimizer steps trained so far)
for every scalar; step scalars during training, a row per epoch, the test figures, pictures and hparams at the end."""
from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Iterator, Mapping

from PIL import Image

from .files import UsageError

# history.json's columns logged after each epoch, at the step that ends it, and their tags.
EPOCH_TAGS = {"epoch": "epoch/number", "train_loss": "train/loss", "train_accuracy": "train/accuracy",
              "val_loss": "val/loss", "val_accuracy": "val/accuracy", "seconds": "epoch/seconds"}
# metrics.json's figures logged at the end of a run (those it holds: --tta adds two), and their tags.
END_TAGS = {"test_accuracy": "test/accuracy", "test_accuracy_first1000": "test/accuracy_first1000",
            "test_loss": "test/loss", "test_accuracy_last": "test/accuracy_last_epoch",
            "test_accuracy_tta": "test/accuracy_tta", "test_accuracy_first1000_tta": "test/accuracy_first1000_tta",
            "best_val_accuracy": "val/best_accuracy", "best_epoch": "val/best_epoch"}


def event_files(out_dir: Path) -> list[Path]:
    """The TensorBoard event files of the run in `out_dir`, oldest first (as TensorBoard reads them)."""
    return sorted(Path(out_dir).glob("events.out.tfevents.*"))


def read_events(path: Path) -> Iterator:
    """The events of one event file (tensorboard's Event protos), up to a record a killed run left half written."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    for record in RawEventFileLoader(str(path)).Load():
        yield Event.FromString(record)


def trained_steps(history: list[dict]) -> int:
    """The optimizer steps of the epochs in `history`: the step at which the last one's row is logged (every epoch
    but a planned run's last is whole, so epoch e ends at step (e - 1) * steps per epoch + its steps)."""
    return sum(row["steps"] for row in history)


@contextlib.contextmanager
def open_board(out_dir: Path, resumed_steps: int | None, command: str, settings: Mapping):
    """The run's SummaryWriter (the main process's), logging `command` and `settings` as text first; closed when
    the block ends. A run resumed after `resumed_steps` steps starts its writer with a purge of the steps after them
    (a killed or interrupted call's last steps, a report half written): TensorBoard drops those points of the
    earlier event files when it reads them. A new run removes an earlier run's event files only
    when its own first epoch is saved (log_epoch), as the run folder's other files go (--overwrite); one stopped
    before that takes its own file away again."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UsageError(f"TensorBoard is not installed ({e}): pip install -r requirements.txt, or pass "
                         "--no-tensorboard") from None
    first_step = 0 if resumed_steps is None else resumed_steps + 1
    writer = SummaryWriter(str(out_dir), purge_step=first_step, filename_suffix=f".{uuid.uuid4().hex[:12]}")
    stopped = True
    try:
        writer.add_text("run/command", f"`{command}`", first_step)
        writer.add_text("run/settings", "| setting | value |\n|---|---|\n" + "\n".join(
            f"| {key} | `{json.dumps(value)}` |" for key, value in settings.items()), first_step)
        yield writer
        stopped = False
    finally:
        writer.close()
        own = [path for path in event_files(out_dir) if path.name.endswith(writer.filename_suffix)]
        if stopped and resumed_steps is None and not any(
                value.tag == EPOCH_TAGS["epoch"] for path in own for event in read_events(path)
                for value in event.summary.value):
            for path in own:
                path.unlink()


def log_step(writer, step: int, values: Mapping[str, float]) -> None:
    """Training's figures every few steps (train/batch_loss, train/lr, train/images_per_s)."""
    for name, value in values.items():
        writer.add_scalar(f"train/{name}", value, step)


def log_epoch(writer, history: list[dict]) -> None:
    """The last row of `history` (EPOCH_TAGS), on disk at once; after a new run's first epoch, the event files of
    the run it replaces are removed."""
    row, step = history[-1], trained_steps(history)
    for key, tag in EPOCH_TAGS.items():
        writer.add_scalar(tag, row[key], step)
    writer.flush()
    if len(history) == 1:
        for path in event_files(writer.log_dir):
            if not path.name.endswith(writer.filename_suffix):
                path.unlink()


def log_picture(writer, path: Path, step: int) -> None:
    """A PNG file as it is (not decoded and encoded again) under figures/<its name>."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    with Image.open(path) as image:
        picture = Summary.Image(height=image.height, width=image.width, colorspace=len(image.getbands()),
                                encoded_image_string=path.read_bytes())
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=f"figures/{path.stem}", image=picture)]), step)


def hparam_values(settings: Mapping) -> dict:
    """A run's settings as hparams: numbers, strings and booleans as they are, a list as its comma-separated
    items (augment: flip,crop, as --augment takes it), a dict as JSON; None left out."""
    return {key: value if isinstance(value, (bool, int, float, str))
            else ",".join(map(str, value)) if isinstance(value, list) else json.dumps(value)
            for key, value in settings.items() if value is not None}


def log_end(writer, metrics: Mapping, out_dir: Path) -> None:
    """A finished run, at the step after its last (so that a resume drops it with the rest): its test figures
    (END_TAGS, the corruption benchmark's mean and test_per_class/<class>), every picture in `out_dir`, and its
    settings as hparams, in the run's own event file (SummaryWriter.add_hparams would make a sub-run, listed beside
    the run). Only the session's hparams are written, no experiment: the HParams tab then takes its columns from every
    run it shows, the settings that differ between them first, and the final value of each scalar as the run's
    metrics."""
    from tensorboard.plugins.hparams.summary_v2 import hparams_pb
    step = metrics["run_steps"] + 1
    for key, tag in END_TAGS.items():
        if metrics.get(key) is not None:
            writer.add_scalar(tag, metrics[key], step)
    if metrics.get("corruptions"):
        writer.add_scalar("test/corruption_mean_accuracy", metrics["corruptions"]["mean_accuracy"], step)
    for name, accuracy in metrics["per_class_accuracy"].items():
        writer.add_scalar(f"test_per_class/{name}", accuracy, step)
    for path in sorted(out_dir.glob("*.png")):
        log_picture(writer, path, step)
    writer.file_writer.add_summary(hparams_pb(hparam_values(metrics["settings"]), trial_id=str(out_dir)), step)
    writer.flush()
