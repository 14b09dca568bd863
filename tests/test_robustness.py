"""Robustness: Ctrl-C, a failing save, finished runs, --resume settings, and bad input (SIGKILL and signals inside an
epoch: tests/test_interrupt.py).

The uninterrupted reference is the session's run (conftest.ex1_run). Everything that does not need a real signal or a
real exit status runs in-process through the scripts' main().
"""
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import call, error_line, EX1_TRAIN, history_of, metrics, QUICK, ROOT, run_script, write_cifar

import common
import ex1_convnet
import ex2_transfer

# The runs a test makes for itself: 64 training images in batches of 32, 2 steps per epoch.
RUN = [*QUICK, "--limit-train", "64", "--epochs", "3"]


# ----------------------------------------------------------------------------- helpers

def temp_files(folder: Path) -> list[str]:
    """Leftovers of atomic_write (.<name>.<random>.tmp) in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- interruptions

@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_prints_a_working_resume_command(tmp_path, cifar_dir, ex1_run, capsys,
                                                                  no_filter_plots):
    """SIGINT to the script's process during epoch 2: exit 130, last.pt of epoch 1 loadable, no temp file, and the
    printed command resumes."""
    out_dir, stderr_path = tmp_path / "run", tmp_path / "stderr.txt"
    # A shell without job control starts a background command (`make test &`) with SIGINT ignored, which its children
    # inherit; the script gets Ctrl-C's default disposition, as in a terminal, by a handler here that exec resets to it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(stderr_path, "w") as err:  # a file: a pipe could fill up and stall the run
            run = subprocess.Popen([sys.executable, str(ROOT / "ex1_convnet.py"), "--data-dir", str(cifar_dir),
                                    "--out-dir", str(out_dir), *EX1_TRAIN], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=err)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        while not (out_dir / "history.json").exists() and run.poll() is None:  # written after last.pt of epoch 1
            time.sleep(0.01)
        run.send_signal(signal.SIGINT)
        code = run.wait(300)
    finally:
        run.kill()
    stderr = stderr_path.read_text()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (out_dir / "metrics.json").exists(), "the run finished before it could be interrupted"
    saved = common.files.load_checkpoint(out_dir / "last.pt", "ex1_convnet.py")
    assert 1 <= saved["epoch"] < 3
    rows = json.loads((out_dir / "history.json").read_text())  # one behind last.pt when stopped between the two
    assert rows == saved["history"][:len(rows)] and len(rows) >= saved["epoch"] - 1
    assert temp_files(out_dir) == []

    match = re.search(r"resume with: python (.+)$", stderr, re.MULTILINE)
    assert match, stderr[-2000:]
    command = shlex.split(match.group(1))
    assert Path(command[0]).name == "ex1_convnet.py" and "--resume" in command
    assert Path(command[command.index("--out-dir") + 1]) == out_dir
    code, out, err = call(ex1_convnet.main, command[1:], capsys)
    assert code == 0, err[-3000:]
    assert history_of(out_dir) == history_of(ex1_run)
    assert metrics(out_dir)["test_accuracy"] == metrics(ex1_run)["test_accuracy"]


@pytest.mark.parametrize("exception", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_failing_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, exception):
    """A write that fails half-way (a checkpoint's too: the full-disk tests below)."""
    metrics_path = tmp_path / "metrics.json"
    common.files.save_json({"test_accuracy": 0.5}, metrics_path)
    old = metrics_path.read_bytes()

    def half_then_fail(f):
        f.write(b"x" * 1000)
        raise exception

    with pytest.raises(type(exception)):
        common.files.atomic_write(metrics_path, half_then_fail)
    assert metrics_path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["022", "077"])
def test_a_write_is_fsynced_in_the_same_folder_before_the_rename_and_gets_the_mode_of_any_new_file(
        tmp_path, monkeypatch, umask, mode):
    """Not mkstemp's private 0600: 0666 less the umask, as `open(path, 'w')` gives, so a shared folder stays
    readable."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync",
                        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    previous = os.umask(umask)
    try:
        common.files.save_json({"a": 1}, tmp_path / "metrics.json")
        common.files.save_checkpoint({"kind": "ex1_convnet.py", "model": {}}, tmp_path / "last.pt")
        (tmp_path / "plain.txt").write_text("made the ordinary way")
        assert os.umask(umask) == umask  # the write left the umask as it was
    finally:
        os.umask(previous)
    assert [e[0] for e in events] == ["fsync", "replace"] * 2
    temporary = Path(events[1][1])
    assert events[0][1] == str(temporary) and temporary.parent == tmp_path \
        and events[1][2] == str(tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1}
    for name in ("metrics.json", "last.pt", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path, ex1_run, cifar_dir, capsys, narrow_ex1):
    finished = tmp_path / "finished"  # the session run's result files: a finished run
    finished.mkdir()
    for name in ("metrics.json", "history.json"):
        shutil.copy(ex1_run / name, finished / name)
    before = {p.name: p.read_bytes() for p in finished.iterdir()}
    code, _, err = call(ex1_convnet.main, ["--data-dir", cifar_dir, "--out-dir", finished, *RUN], capsys)
    assert code == 2
    assert "already holds a finished run" in error_line(err) and "--overwrite" in error_line(err)
    code, out, err = call(ex1_convnet.main, ["--resume", "--out-dir", finished], capsys)
    assert code == 0, err
    assert "holds a finished run" in out and "nothing to resume" in out
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == before
    code, _, err = call(ex1_convnet.main, ["--data-dir", cifar_dir, "--out-dir", finished, *RUN, "--epochs", "1",
                                           "--overwrite"], capsys)  # starts over
    assert code == 0, err[-3000:]
    assert metrics(finished)["epochs_run"] == 1 and len(history_of(finished)) == 1


FLAGS_THAT_CHANGE_THE_RUN = [["--no-bn"], ["--dropout", "0.5"], ["--limit-train", "32"], ["--batch-size", "16"],
                             ["--val-size", "32"], ["--lr", "0.5"], ["--seed", "1"], ["--augment", "flip"],
                             ["--augment", "none"], ["--recipe", "original"]]


@pytest.mark.slow
def test_resume_refuses_other_data_and_flags_that_change_the_run_and_extends_it_on_the_same_data_elsewhere(
        tmp_path, ex1_run, cifar_dir, capsys, monkeypatch, no_filter_plots):
    """last.pt and best.pt hold a fingerprint of the training and validation images and labels: --resume on another
    data set, or with a flag that changes the model or the data, is refused before any work; the same files in another
    folder are taken (on a bf16-native CPU, the run started with --precision fp32 goes on in fp32), and --resume
    --epochs 4 trains the 3-epoch run one epoch more. Decided: a last.pt without a data fingerprint (written before
    checkpoints held one) resumes on the data given, as it always did, and the checkpoints it writes hold one."""
    monkeypatch.setattr(common.device, "cpu_has_fast_bf16", lambda: True)  # a CPU where auto means bf16
    assert common.device.resolve_precision("auto", torch.device("cpu")) == torch.bfloat16  # (on any CPU)
    run_dir = tmp_path / "run"  # the session run's checkpoints alone: a run stopped after its last saved epoch
    run_dir.mkdir()
    for name in ("last.pt", "best.pt"):
        shutil.copy(ex1_run / name, run_dir / name)
    data = common.data.load_cifar10(cifar_dir, download=False)
    expected = common.data.data_fingerprint(common.data.split_train_val(data, 64, 96))  # --val-size 64 --limit-train 96
    assert common.files.load_checkpoint(run_dir / "last.pt", "ex1_convnet.py")["data_fingerprint"] == expected
    before = (run_dir / "last.pt").read_bytes()
    other = write_cifar(tmp_path / "other", seed=1)
    code, out, err = call(ex1_convnet.main, ["--resume", "--out-dir", run_dir, "--data-dir", other], capsys)
    assert code == 2 and "Traceback" not in err and "epoch " not in out
    assert "the data differs from the data the run" in error_line(err) and str(other) in error_line(err)
    for flags in FLAGS_THAT_CHANGE_THE_RUN:
        code, _, err = call(ex1_convnet.main, ["--resume", "--out-dir", run_dir, *flags], capsys)
        assert code == 2, flags
        assert flags[0] in error_line(err) or flags[0] == "--no-bn" and "--batch-norm" in error_line(err)
        assert "differs from the run being resumed" in error_line(err)
    assert (run_dir / "last.pt").read_bytes() == before and not (run_dir / "metrics.json").exists()

    moved = tmp_path / "moved" / "cifar"
    shutil.copytree(cifar_dir, moved)
    code, out, err = call(ex1_convnet.main, ["--resume", "--out-dir", run_dir, "--data-dir", moved, "--device", "cpu"],
                          capsys)
    assert code == 0, err[-3000:]
    assert "cpu, float32;" in out and "note:" not in out
    assert history_of(run_dir) == history_of(ex1_run)
    assert metrics(run_dir)["precision"] == "float32"
    old = common.files.load_checkpoint(run_dir / "last.pt", "ex1_convnet.py")
    del old["data_fingerprint"]
    torch.save(old, run_dir / "last.pt")
    code, out, err = call(ex1_convnet.main, ["--resume", "--out-dir", run_dir, "--epochs", "4", "--seed", "0",
                                             "--limit-train", "96", "--data-dir", cifar_dir, "--no-download",
                                             "--device", "cpu"], capsys)
    assert code == 0, err[-3000:]
    assert "resuming after epoch 3 of 4" in out
    history = history_of(run_dir)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4] and history[:3] == history_of(ex1_run)
    assert [row["precision"] for row in json.loads((run_dir / "history.json").read_text())] == ["float32"] * 4
    result = metrics(run_dir)
    assert result["epochs_run"] == 4 and result["settings"]["epochs"] == 4
    assert {k: v for k, v in result["settings"].items() if k != "epochs"} == \
        {k: v for k, v in metrics(ex1_run)["settings"].items() if k != "epochs"}
    for name in ("last.pt", "best.pt"):
        assert common.files.load_checkpoint(run_dir / name, "ex1_convnet.py")["data_fingerprint"] == expected, name


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_a_full_disk_ends_with_one_line_naming_the_file_what_is_kept_and_how_to_resume(disk, tmp_path, cifar_dir,
                                                                                       capsys, monkeypatch,
                                                                                       no_filter_plots):
    """torch.save failing from epoch 2's first save on; or (root on Linux) a real 150 MB tmpfs, which holds epoch 1's
    best.pt (31 MB) and last.pt (92 MB) and no room for epoch 2's."""
    monkeypatch.setattr(common.train, "SAVE_EVERY_S", 0.0)  # write every epoch, as a run on a CPU does
    save, out_dir = torch.save, tmp_path / "run"

    def save_until_full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch", 0) >= 2:
            raise OSError(28, "No space left on device")
        return save(obj, f, *args, **kwargs)

    if disk == "simulated":
        monkeypatch.setattr(torch, "save", save_until_full)
    elif os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(tmp_path)],
                                             capture_output=True).returncode:
        pytest.skip("this machine does not let a test mount a tmpfs (root on Linux)")
    try:
        code, _, err = call(ex1_convnet.main, [*RUN, "--data-dir", cifar_dir, "--out-dir", out_dir], capsys)
        assert code == 4 and "Traceback" not in err, err[-3000:]
        line = error_line(err)
        assert line.startswith(f"error: could not write {out_dir / 'best.pt'}") or \
            line.startswith(f"error: could not write {out_dir / 'last.pt'}"), line
        assert "No space left on device" in line and "last.pt and best.pt" in line
        assert "--resume" in line.split("resume with: python ")[1]
        assert temp_files(out_dir) == [] and not (out_dir / "metrics.json").exists()
        assert common.files.load_checkpoint(out_dir / "last.pt", "ex1_convnet.py")["epoch"] == 1  # saved whole
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(tmp_path)], check=True)


@pytest.mark.slow
def test_train_log_holds_stderr_too_and_each_call_appends(tmp_path, cifar_dir, capsys, monkeypatch, narrow_ex1):
    evaluate = common.evaluation.evaluate

    def warning_evaluate(*args, **kwargs):
        print("warning: a line on stderr during the run", file=sys.stderr)  # as Python's warnings print
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(common.evaluation, "evaluate", warning_evaluate)  # validation and the test call it
    out_dir = tmp_path / "run"
    argv = [*RUN, "--epochs", "1", "--data-dir", cifar_dir, "--out-dir", out_dir]
    assert call(ex1_convnet.main, argv, capsys)[0] == 0
    assert call(ex1_convnet.main, [*argv, "--overwrite"], capsys)[0] == 0
    log = (out_dir / "train.log").read_text()
    assert "warning: a line on stderr during the run" in log  # stderr reaches it
    assert log.count("==== ") == 2 and log.count("epoch   1/1") == 2  # both calls, each under its command line
    assert "\r" not in log  # no progress-bar redraws


def test_ctrl_c_before_the_first_epoch_says_what_is_kept_and_how_to_go_on(tmp_path, cifar_dir, capsys, monkeypatch):
    """While the training is set up there is nothing to resume; while the data loads, the folder keeps what it held
    (and a sweep keeps its finished runs)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.train, "set_up_training", interrupted)
    code, _, err = call(ex1_convnet.main, ["--data-dir", cifar_dir, "--out-dir", tmp_path / "run", *RUN], capsys)
    assert code == 130 and "nothing to resume" in err and "--resume" not in err
    monkeypatch.setattr(common.data, "load_cifar10", interrupted)
    code, _, err = call(ex1_convnet.main, [*RUN, "--data-dir", cifar_dir, "--out-dir", tmp_path / "run"], capsys)
    assert code == 130
    assert f"interrupted. {tmp_path / 'run'} keeps what it held before" in err and "to go on: python " in err
    code, _, err = call(ex1_convnet.main, [*RUN, "--data-dir", cifar_dir, "--out-dir", tmp_path / "s", "--seeds", "2"],
                        capsys)
    assert code == 130
    assert f"the finished runs in {tmp_path / 's'} are kept" in err and "--resume" in err.split("continue with: ")[1]


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_exits_2_naming_the_holder(tmp_path, cifar_dir, capsys, narrow_ex1):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; sys.path.insert(0, "
                               f"{str(ROOT)!r}); import common; "
                               f"lock = common.files.run_dir_lock(Path({str(out_dir)!r})); "
                               "lock.__enter__(); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = call(ex1_convnet.main, [*RUN, "--data-dir", cifar_dir, "--out-dir", out_dir], capsys)
        assert code == 2
        assert error_line(err) == (f"error: {out_dir} is in use by another run (process {holder.pid}); wait for it to "
                                   "end, or choose another --out-dir")
        assert sorted(p.name for p in out_dir.iterdir()) == [".lock"]  # the holder's
    finally:
        holder.kill()
        holder.wait()
    code, _, err = call(ex1_convnet.main, [*RUN, "--epochs", "1", "--data-dir", cifar_dir, "--out-dir", out_dir],
                        capsys)
    assert code == 0, err[-3000:]  # the lock went with the process that held it


@pytest.mark.slow
def test_eval_only_never_writes_over_a_training_run(tmp_path, ex1_run, cifar_dir, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(ex1_run, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    cpu = [*QUICK, "--data-dir", cifar_dir]
    code, _, err = call(ex1_convnet.main, [*cpu, "--eval-only", "--out-dir", run_dir], capsys)
    assert code == 0, err[-3000:]
    assert (run_dir / "eval" / "metrics.json").exists()  # best.pt of --out-dir, reports in eval/ beside it
    assert metrics(run_dir / "eval")["checkpoint"] == str(run_dir / "best.pt")  # the path as the rule made it
    code, _, err = call(ex1_convnet.main, [*cpu, "--eval-only", "--checkpoint", run_dir / "best.pt",
                                           "--out-dir", run_dir], capsys)
    assert code == 2 and "holds a training run" in error_line(err)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    code, _, _ = call(ex1_convnet.main, ["--compare", run_dir, "--out-dir", tmp_path / "compare"], capsys)
    assert code == 0


# ----------------------------------------------------------------------------- bad input

class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_eval_only_and_resume_refuse_what_is_not_their_checkpoint(tmp_path, ex1_run, ex2_checkpoint, cifar_dir,
                                                                   capsys, monkeypatch):
    """Each message names the file and says what it is (unreadable files as one sentence for every task:
    tests/test_first_contact.py); the pickled code in a file never runs."""
    folder = tmp_path / "files"
    folder.mkdir()
    torch.save(ex1_convnet.build_model({"dropout": 0.1, "batch_norm": True, "linear_init_std": None}).state_dict(),
               folder / "state_dict.pt")
    data = (ex1_run / "best.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[:len(data) // 2])
    (folder / "empty.pt").write_bytes(b"")
    torch.save({"kind": "ex1_convnet.py", "model": _Payload()}, folder / "code.pt")
    torch.save(torch.zeros(3), folder / "tensor.pt")
    cases = {ex2_checkpoint: "a checkpoint of ex2_transfer.py, not of ex1_convnet.py",
             folder / "state_dict.pt": "not a checkpoint of this project (a bare state dict",
             folder / "truncated.pt": "not a readable checkpoint file: a truncated or corrupt checkpoint",
             folder / "empty.pt": "not a readable checkpoint file: an empty file",
             folder / "code.pt": "not a readable checkpoint",  # torch's own wording varies between versions
             folder / "tensor.pt": "not a checkpoint of this project",
             folder / "missing.pt": "does not exist",
             folder: "is not a file"}
    monkeypatch.chdir(folder)
    torch.load(folder / "code.pt", weights_only=False)
    assert (folder / "PAYLOAD_RAN").exists(), "the payload must be live for this test to mean anything"
    monkeypatch.chdir(tmp_path)  # where the payload would leave its mark
    cpu = ["--data-dir", cifar_dir, "--no-download", "--device", "cpu"]
    for path, expected in cases.items():
        code, _, err = call(ex1_convnet.main, ["--eval-only", "--checkpoint", path, *cpu, "--out-dir", "eval"], capsys)
        assert code == 2 and "Traceback" not in err, f"{path}: exit {code}\n{err[-2000:]}"
        assert expected in error_line(err) and str(path) in error_line(err), error_line(err)
        if path.is_file():  # the same file as a run's last.pt
            run_dir = tmp_path / "runs" / path.name
            run_dir.mkdir(parents=True)
            shutil.copy(path, run_dir / "last.pt")
            code, _, err = call(ex1_convnet.main, ["--resume", "--out-dir", run_dir], capsys)
            assert code == 2 and expected in error_line(err) and str(run_dir / "last.pt") in error_line(err), err
    assert not (tmp_path / "PAYLOAD_RAN").exists() and not (tmp_path / "eval" / "metrics.json").exists()
    code, _, err = call(ex1_convnet.main, ["--resume", "--out-dir", tmp_path / "empty_run"], capsys)
    assert code == 2 and "nothing to resume" in error_line(err)
    # and the other way round: ex1's checkpoint given to ex2 (a genuine one evaluates: tests/test_ex1.py)
    code, _, err = call(ex2_transfer.main, ["--eval-only", "--checkpoint", ex1_run / "best.pt", *cpu], capsys)
    assert code == 2 and "a checkpoint of ex1_convnet.py, not of ex2_transfer.py" in error_line(err)


@pytest.mark.slow
def test_nan_loss_stops_naming_epoch_and_step_and_keeps_best_pt(tmp_path, cifar_dir, capsys, monkeypatch, narrow_ex1):
    """The training loss turns NaN at epoch 2, step 2 (of 2), and stays NaN: the run stops; best.pt is epoch 1's."""
    real, steps = torch.nn.functional.cross_entropy, itertools.count(1)

    def loss(logits, *args, **kwargs):  # a training step's (validation's has no gradient)
        value = real(logits, *args, **kwargs)
        return value * float("nan") if logits.requires_grad and next(steps) >= 4 else value

    monkeypatch.setattr(common.train.F, "cross_entropy", loss)
    out_dir = tmp_path / "run"
    code, _, err = call(ex1_convnet.main, ["--data-dir", cifar_dir, "--out-dir", out_dir, *RUN], capsys)
    assert code == 3 and "not finite at epoch 2, step 2 of 2" in error_line(err)
    best = common.files.load_checkpoint(out_dir / "best.pt", "ex1_convnet.py")
    assert best["epoch"] == 1 and all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    assert not (out_dir / "metrics.json").exists() and temp_files(out_dir) == []


# (flags, FILE standing for a regular file; what the message says; whether the output folder may exist after)
REFUSED = {
    "epochs 0": (["--epochs", "0"], "--epochs must be positive", False),
    "batch size -32": (["--batch-size", "-32"], "--batch-size must be positive", False),
    "lr 0": (["--lr", "0"], "--lr must be positive", False),
    "lr nan": (["--lr", "nan"], "--lr must be positive", False),
    "lr inf": (["--lr", "inf"], "--lr must be", False),
    "dropout 1": (["--dropout", "1"], "--dropout must be in [0, 1)", False),
    "dropout sweep 0.5 1.5": (["--dropout", "0.5", "1.5"], "--dropout must be in [0, 1)", False),
    "limit-train 0": (["--limit-train", "0"], "--limit-train must be positive", False),
    "limit-train 10 < batch 32": (["--limit-train", "10"], "leave no full batch", True),
    "val-size 0": (["--val-size", "0"], "--val-size 0 must be between 1 and 319", True),
    "val-size 320 (all)": (["--val-size", "320"], "--val-size 320 must be between 1 and 319", True),
    "val-size 300 leaves 20 < 32": (["--val-size", "300", "--limit-train", "1000"], "leave no full batch", True),
    "out-dir under a file": (["--out-dir", "FILE/run"], "cannot write to output folder", False),
    "out-dir is a file": (["--out-dir", "FILE"], "cannot write to output folder", True),
    "device cuda": (["--device", f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"],
                    "--device cuda", False),
    "device tpu": (["--device", "tpu"], "--device tpu: unknown device", False),
    "device xla": (["--device", "xla"], "--device xla: unsupported device", False),
    "fp16 on a cpu": (["--precision", "fp16"], "--precision fp16: a CPU computes fp16 hundreds of times slower than "
                                               "bf16 or fp32", False),
    "seeds 0": (["--seeds", "0"], "--seeds must be at least 1", False),
    **{" ".join(tasks): (tasks, "are separate tasks: give one of them", False) for tasks in (
        ["--compare", "a", "--predict", "x.png"], ["--compare", "a", "--seeds", "2"], ["--compare", "a", "--eval-only"],
        ["--eval-only", "--predict", "x.png"], ["--predict", "x.png", "--seeds", "2"],
        ["--dropout", "0.1", "0.2", "--eval-only"])},
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_settings_are_refused_before_any_work(case, tmp_path, cifar_dir, capsys):
    flags, expected, folder_may_exist = REFUSED[case]
    (tmp_path / "file").write_text("a regular file")
    flags = [flag.replace("FILE", str(tmp_path / "file")) for flag in flags]
    out_dir = tmp_path / "run"
    code, out, err = call(ex1_convnet.main, ["--data-dir", cifar_dir, "--out-dir", out_dir, *RUN, *flags], capsys)
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert expected in error_line(err), error_line(err)
    assert "Traceback" not in err and "epoch 1" not in out
    if not folder_may_exist:
        assert not out_dir.exists()
    assert not any(tmp_path.rglob("*.pt"))


@pytest.mark.slow
def test_a_refusal_exits_2_from_the_command_line(tmp_path, cifar_dir):
    """The exit status itself, through a real process (the refusals above run in-process)."""
    result = run_script("ex1_convnet.py", "--data-dir", cifar_dir, "--out-dir", tmp_path / "run", *RUN,
                        "--device", "tpu")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device tpu")
    assert not (tmp_path / "run").exists()
