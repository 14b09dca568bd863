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
    """The optimizer steps of the epochs in `history`: the step at which the last one's row is logged."""
    return sum(row["steps"] for row in history)


@contextlib.contextmanager
def open_board(out_dir: Path, resumed_steps: int | None, command: str, settings: Mapping):
    """The run's SummaryWriter, logging `command` and `settings` first, closed with the block; a run resumed after
    `resumed_steps` purges the later steps of earlier event files. A new run removes an earlier run's files once its
    first epoch is saved (log_epoch); one stopped before that removes its own."""
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


def log_epoch(writer, history: list[dict]) -> None:
    """The last row of `history` (EPOCH_TAGS), on disk at once; a new run's first removes the replaced run's files."""
    row, step = history[-1], trained_steps(history)
    for key, tag in EPOCH_TAGS.items():
        writer.add_scalar(tag, row[key], step)
    writer.flush()
    if len(history) == 1:
        for path in event_files(writer.log_dir):
            if not path.name.endswith(writer.filename_suffix):
                path.unlink()


def hparam_values(settings: Mapping) -> dict:
    """A run's settings as hparams: numbers, strings and booleans as they are, a list as its comma-separated
    items (augment: flip,crop, as --augment takes it), a dict as JSON; None left out."""
    return {key: value if isinstance(value, (bool, int, float, str))
            else ",".join(map(str, value)) if isinstance(value, list) else json.dumps(value)
            for key, value in settings.items() if value is not None}


def log_end(writer, metrics: Mapping, out_dir: Path) -> None:
    """A finished run, at the step after its last (a resume drops it): test figures (END_TAGS, the corruption mean,
    test_per_class/<class>), every picture in `out_dir`, and its settings as the session's hparams (no experiment: the
    HParams tab takes its columns from the runs shown) in the run's own event file (add_hparams makes a sub-run)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams.summary_v2 import hparams_pb
    step = metrics["run_steps"] + 1
    for key, tag in END_TAGS.items():
        if metrics.get(key) is not None:
            writer.add_scalar(tag, metrics[key], step)
    if metrics.get("corruptions"):
        writer.add_scalar("test/corruption_mean_accuracy", metrics["corruptions"]["mean_accuracy"], step)
    for name, accuracy in metrics["per_class_accuracy"].items():
        writer.add_scalar(f"test_per_class/{name}", accuracy, step)
    for path in sorted(out_dir.glob("*.png")):  # under figures/<its name>, as it is (not decoded and encoded again)
        with Image.open(path) as image:
            picture = Summary.Image(height=image.height, width=image.width, colorspace=len(image.getbands()),
                                    encoded_image_string=path.read_bytes())
        writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=f"figures/{path.stem}", image=picture)]), step)
    writer.file_writer.add_summary(hparams_pb(hparam_values(metrics["settings"]), trial_id=str(out_dir)), step)
    writer.flush()
