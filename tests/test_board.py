"""TensorBoard: each run's event files hold its history.json, test figures, pictures and settings (hparams); --resume
purges what an interrupted call logged after its last save, --overwrite starts clean, --eval-only writes nothing
(--no-tensorboard: tests/test_studies.py). Read as written (LegacyEventFileLoader) and as TensorBoard shows them."""
import collections
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_png, call, in_process, interrupt_validation, metrics, narrow, QUICK, read_json
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.hparams.metadata import parse_session_start_info_plugin_data
from torch.utils.tensorboard import SummaryWriter

import common
import ex1_convnet

# 64 training images in batches of 32: 2 steps per epoch, so epoch e ends at step 2e.
RUN = [*QUICK, "--limit-train", "64", "--epochs", "3"]
EPOCH_COLUMNS = {"epoch": "epoch/number", "train_loss": "train/loss", "train_accuracy": "train/accuracy",
                 "val_loss": "val/loss", "val_accuracy": "val/accuracy", "seconds": "epoch/seconds"}


def points(run_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of every value in the run's event files, as written: nothing purged."""
    return [(value.tag, event.step) for path in sorted(Path(run_dir).glob("events.out.tfevents.*"))
            for event in LegacyEventFileLoader(str(path)).Load() for value in event.summary.value]


def duplicates(run_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of the scalars TensorBoard shows twice (after a resume's purge)."""
    events = accumulated(run_dir)
    return [(tag, step) for tag in events.Tags()["scalars"]
            for step, count in collections.Counter(event.step for event in events.Scalars(tag)).items() if count > 1]


def accumulated(run_dir: Path) -> EventAccumulator:
    """The run's events as TensorBoard loads them, every point kept."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events.Scalars(tag)]


def hparams(run_dir: Path) -> dict:
    """The hparams the run's session start info holds, as plain values."""
    content = accumulated(run_dir).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = parse_session_start_info_plugin_data(content).hparams
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in values.items()}


def as_logged(value: float) -> float:
    """A value as a scalar summary stores it (float32)."""
    return float(np.float32(value))


@pytest.fixture(scope="module")
def resumed(cifar_dir, tmp_path_factory) -> dict:
    """A 3-epoch run interrupted (Ctrl-C) in epoch 3's validation, after that epoch's training steps were logged, then
    resumed to its end; and the points its event files held in between."""
    out_dir = tmp_path_factory.mktemp("board") / "tb-run"
    argv = [*RUN, "--data-dir", cifar_dir, "--out-dir", out_dir]
    with pytest.MonkeyPatch.context() as patch:
        narrow(patch)
        interrupt_validation(patch, call=3)
        assert in_process(ex1_convnet.main, *argv)[0] == 130
        interrupted = points(out_dir)
        assert in_process(ex1_convnet.main, *argv, "--resume")[0] == 0
    return {"dir": out_dir, "interrupted": interrupted}


@pytest.mark.slow
def test_a_run_resumed_to_3_epochs_logs_its_history_once_with_its_test_figures_pictures_and_hparams(resumed):
    run_dir = resumed["dir"]
    assert ("train/batch_loss", 6) in resumed["interrupted"]  # epoch 3's steps were logged before the interruption
    assert ("val/accuracy", 6) not in resumed["interrupted"]
    assert not duplicates(run_dir)

    events, history, run = accumulated(run_dir), read_json(run_dir / "history.json"), metrics(run_dir)
    assert len(history) == 3
    for key, tag in EPOCH_COLUMNS.items():
        assert scalars(events, tag) == [(2 * row["epoch"], as_logged(row[key])) for row in history], tag
    for tag in ("train/batch_loss", "train/lr", "train/images_per_s"):  # every few steps, and at each epoch's end
        assert [step for step, _ in scalars(events, tag)] == [2, 4, 6], tag
    assert scalars(events, "test/accuracy") == [(7, as_logged(run["test_accuracy"]))]
    assert scalars(events, "test/accuracy_first1000") == [(7, as_logged(run["test_accuracy_first1000"]))]
    for name, accuracy in run["per_class_accuracy"].items():
        assert scalars(events, f"test_per_class/{name}") == [(7, as_logged(accuracy))]
    pictures = {path.stem for path in run_dir.glob("*.png")}
    assert {"history", "per_class", "confusion", "misclassified"} <= pictures
    assert set(events.Tags()["images"]) == {f"figures/{name}" for name in pictures}
    assert events.Images("figures/history")[0].encoded_image_string == (run_dir / "history.png").read_bytes()
    command = f"`python {shlex.join(sys.argv)}`"  # each call's: in-process, pytest's
    assert [(event.step, event.tensor_proto.string_val[0].decode())
            for event in events.Tensors("run/command/text_summary")] == [(0, command), (5, command)]
    assert hparams(run_dir) == common.board.hparam_values(run["settings"])
    assert not [path for path in run_dir.iterdir() if path.is_dir()]  # hparams in the run itself, not a sub-run


@pytest.mark.slow
def test_eval_only_writes_nothing_and_overwrite_starts_clean_once_its_first_epoch_is_saved(resumed, cifar_dir, tmp_path,
                                                                                          capsys, monkeypatch,
                                                                                          narrow_ex1):
    run_dir = tmp_path / "run"
    shutil.copytree(resumed["dir"], run_dir)
    before = {path.name: path.read_bytes() for path in run_dir.glob("events.out.tfevents.*")}

    def event_files_unchanged() -> bool:
        return {path.name: path.read_bytes() for path in run_dir.glob("events.out.tfevents.*")} == before

    argv = [*QUICK, "--limit-train", "64", "--data-dir", cifar_dir, "--out-dir", run_dir]
    assert call(ex1_convnet.main, [*argv, "--eval-only"], capsys)[0] == 0
    assert event_files_unchanged() and not list((run_dir / "eval").glob("events.out.tfevents.*"))

    interrupt_validation(monkeypatch, call=1)  # a new run stopped in its first epoch leaves the old run whole
    assert call(ex1_convnet.main, [*argv, "--epochs", "1", "--overwrite"], capsys)[0] == 130
    assert event_files_unchanged()

    assert call(ex1_convnet.main, [*argv, "--epochs", "1", "--overwrite"], capsys)[0] == 0
    assert not set(before) & {path.name for path in run_dir.glob("events.out.tfevents.*")}
    assert not duplicates(run_dir) and max(step for _, step in points(run_dir)) == 3  # one epoch, then the report
    history = read_json(run_dir / "history.json")
    assert scalars(accumulated(run_dir), "val/accuracy") == [(2, as_logged(history[0]["val_accuracy"]))]


def test_a_resume_drops_the_points_after_its_step_and_a_record_a_kill_left_half_written(tmp_path):
    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(1, 7):
            writer.add_scalar("train/batch_loss", step / 10, step)
    with open(next(tmp_path.glob("events.out.tfevents.*")), "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x12\x34")  # the start of a record that was never finished
    with common.board.open_board(tmp_path, 4, "python ex1_convnet.py --resume", {"seed": 0}) as writer:
        writer.add_scalar("train/batch_loss", 0.55, 5)
    assert scalars(accumulated(tmp_path), "train/batch_loss") \
        == [(step, as_logged(step / 10)) for step in range(1, 5)] + [(5, as_logged(0.55))]


@pytest.mark.slow
def test_seeds_and_the_dropout_sweep_write_hparams_into_each_run_and_the_sweep_sums_its_runs_up(
        tmp_path, cifar_dir, capsys, narrow_ex1):
    argv = [*QUICK, "--data-dir", cifar_dir, "--epochs", "1", "--limit-train", "32"]  # one step a run
    assert call(ex1_convnet.main, [*argv, "--out-dir", tmp_path / "seeds", "--seeds", "2"], capsys)[0] == 0
    code, out, err = call(ex1_convnet.main, [*argv, "--out-dir", tmp_path / "dropout", "--dropout", "0.1", "0.5"],
                          capsys)
    assert code == 0, err[-3000:]
    runs = {tmp_path / "seeds" / f"seed{s}": {"seed": s} for s in (0, 1)}
    runs |= {tmp_path / "dropout" / f"p{p}": {"dropout": p} for p in (0.1, 0.5)}
    for run_dir, varied in runs.items():
        assert {key: hparams(run_dir)[key] for key in varied} == varied
        events = accumulated(run_dir)
        for key, tag in (("test_accuracy", "test/accuracy"), ("best_val_accuracy", "val/best_accuracy")):
            assert scalars(events, tag) == [(2, as_logged(metrics(run_dir)[key]))]
        assert not [path for path in run_dir.iterdir() if path.is_dir()]
    assert not list((tmp_path / "seeds").glob("events.out.tfevents.*"))  # the sweep's folder holds only its runs
    # the dropout sweep (tests/test_studies.py): augmentation off unless --augment is given, a summary of its runs
    assert not (tmp_path / "dropout" / "metrics.json").exists()
    assert f"wrote {tmp_path / 'dropout' / 'dropout_sweep.png'}" in out
    assert_png(tmp_path / "dropout" / "dropout_sweep.png", min_side=100)
    summary = read_json(tmp_path / "dropout" / "dropout_sweep.json")["runs"]
    assert [(r["p"], Path(r["run"])) for r in summary] == [(p, tmp_path / "dropout" / f"p{p}") for p in (0.1, 0.5)]
    for row in summary:
        run_dir, history = Path(row["run"]), read_json(Path(row["run"]) / "history.json")
        assert metrics(run_dir)["settings"]["augment"] == [] and metrics(run_dir)["epochs_run"] == 1
        assert f"Dropout(p={row['p']}," in (run_dir / "train.log").read_text()  # the model really had this p
        assert [row[key] for key in ("test_accuracy", "best_val_accuracy")] == \
            [metrics(run_dir)[key] for key in ("test_accuracy", "best_val_accuracy")]
        assert row["val_accuracy"] == [h["val_accuracy"] for h in history]
        assert (row["final_train_accuracy"], row["final_val_accuracy"]) == \
            (history[-1]["train_accuracy"], history[-1]["val_accuracy"])
