"""Multi-process training under torchrun on the CPU (gloo): the same training as one process, rank 0 alone
writing, checkpoints without DDP's `module.` prefix, --eval-only and --resume across process counts, a time budget's
sweep, a signal to one process.

Each run is tiny (64 training images, global batch 32, one epoch; ex1's network narrow, as conftest's narrow_ex1
makes it, through NARROW_EX1); the runs are shared through module fixtures.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import call, metrics, NARROW_WIDTHS, QUICK, ROOT, run_script

import ex1_convnet

N_TEST = 120  # test images of the conftest fixture
TINY = [*QUICK, "--epochs", "1", "--limit-train", "64"]
# Settings under which one process and two compute the same update: nothing random per process, and SGD,
# whose step is linear in the gradient (Adam's first step is its sign, which float noise can flip).
SAME_UPDATE = ["--no-bn", "--dropout", "0", "--augment", "none", "--optimizer", "sgd", "--lr", "0.1"]
ENV = {"OMP_NUM_THREADS": "1"}
# ex1_convnet.py with its network narrow (conftest.narrow_ex1), run as a script; {patch} is more of the test's own.
NARROW_EX1 = """
import sys
sys.path.insert(0, {root!r})
import ex1_convnet
ex1_convnet.WIDTHS = {widths}
{patch}
sys.exit(ex1_convnet.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def narrow_script(tmp_path_factory):
    """A script that runs ex1_convnet.py with its network narrow."""
    path = tmp_path_factory.mktemp("narrow") / "narrow_ex1.py"
    path.write_text(NARROW_EX1.format(root=str(ROOT), widths=NARROW_WIDTHS, patch=""))
    return path


def run_torchrun(script: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N script args` (standalone rendezvous on a free local port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENV})


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def model_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def files(run_dir) -> list[str]:
    """The names of the run's files, sorted; a TensorBoard event file's (named after its time, host and process) as
    events.out.tfevents.*."""
    return sorted("events.out.tfevents.*" if p.name.startswith("events.out.tfevents.") else p.name
                  for p in run_dir.iterdir())


@pytest.fixture(scope="module")
def ex1_runs(cifar_dir, tmp_path_factory, narrow_script):
    """ex1 (narrow) trained once by one process and once by two under torchrun, same flags: (one_dir, two_dir,
    two_result)."""
    base = tmp_path_factory.mktemp("ex1")
    flags = [*TINY, *SAME_UPDATE, "--data-dir", cifar_dir]
    check(run_script(narrow_script, *flags, "--out-dir", base / "one", env=ENV))
    two = check(run_torchrun(narrow_script, *flags, "--out-dir", base / "two"))
    return base / "one", base / "two", two


@pytest.fixture(scope="module")
def ex2_runs(cifar_dir, tmp_path_factory):
    """ex2 --scratch (BatchNorm, flips and crops on) by one process and by two: (one_dir, two_dir, two_result)."""
    base = tmp_path_factory.mktemp("ex2")
    flags = [*TINY, "--scratch", "--data-dir", cifar_dir]
    check(run_script("ex2_transfer.py", *flags, "--out-dir", base / "one", env=ENV))
    two = check(run_torchrun("ex2_transfer.py", *flags, "--out-dir", base / "two"))
    return base / "one", base / "two", two


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(ex1_runs, narrow_ex1):
    """Each process takes its share of every global batch: together, the batch one process takes."""
    one_dir, two_dir, _ = ex1_runs
    one, two = model_state(one_dir / "last.pt"), model_state(two_dir / "last.pt")
    assert list(two) == list(one)
    torch.manual_seed(0)  # the run's --seed: the weights training started from
    start = ex1_convnet.build_model({"dropout": 0.0, "batch_norm": False, "linear_init_std": None}).state_dict()
    for name in one:
        assert (one[name] - start[name]).abs().max() > 5e-5, f"{name} barely moved: the comparison would prove nothing"
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    h_one = json.loads((one_dir / "history.json").read_text())
    h_two = json.loads((two_dir / "history.json").read_text())
    assert len(h_one) == len(h_two) == 1
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        assert h_two[0][key] == pytest.approx(h_one[0][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("runs", ["ex1_runs", "ex2_runs"])
def test_two_process_run_writes_what_one_process_writes(runs, request):
    one_dir, two_dir, two = request.getfixturevalue(runs)
    assert files(two_dir) == files(one_dir)  # one event file each: the first process alone writes it
    assert {"last.pt", "best.pt", "metrics.json", "history.json", "train.log", "history.png", "confusion.png",
            "events.out.tfevents.*"} <= set(files(two_dir))
    m_one, m_two = metrics(one_dir), metrics(two_dir)
    assert m_one["processes"] == 1 and m_two["processes"] == 2
    assert m_one["test_images"] == m_two["test_images"] == N_TEST  # the whole test set, not one rank's share
    assert sum(map(sum, m_two["confusion_matrix"])) == N_TEST
    assert m_two["settings"]["batch_size"] == 32  # the global batch
    # rank 0 alone prints and logs
    assert two.stdout.count("reports in") == 1 and two.stdout.count(", 2 processes") == 1
    assert (two_dir / "train.log").read_text().count("epoch   1/1") == 1
    for name in ("last.pt", "best.pt"):  # the checkpoints hold the plain model
        keys = list(model_state(two_dir / name))
        assert keys and not [k for k in keys if k.startswith("module.")]
        assert keys == list(model_state(one_dir / name))


@pytest.mark.slow
def test_eval_only_of_a_two_process_checkpoint_single_process(ex1_runs, cifar_dir, tmp_path, capsys, narrow_ex1):
    _, two_dir, _ = ex1_runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs' processes compute (ENV): no argmax tie falls another way
    try:
        code, out, err = call(ex1_convnet.main, ["--eval-only", "--checkpoint", two_dir / "best.pt", "--out-dir",
                                                 tmp_path / "eval", "--data-dir", cifar_dir, *QUICK], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err[-3000:]
    evaluated, trained = metrics(tmp_path / "eval"), metrics(two_dir)
    # rank 0's test figures during the 2-process run equal a single-process evaluation of the same checkpoint
    assert evaluated["test_images"] == N_TEST
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]
    assert evaluated["test_accuracy"] == trained["test_accuracy"]
    assert evaluated["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
    assert "reports in" in out


@pytest.mark.slow
def test_eval_only_under_torchrun_writes_once(ex2_runs, cifar_dir, tmp_path):
    one_dir, two_dir, _ = ex2_runs
    result = check(run_torchrun("ex2_transfer.py", "--eval-only", "--checkpoint", one_dir / "best.pt",
                                "--out-dir", tmp_path / "eval", "--data-dir", cifar_dir, *QUICK))
    assert result.stdout.count("reports in") == 1 and result.stdout.count("evaluating") == 1
    evaluated = metrics(tmp_path / "eval")
    assert evaluated["test_images"] == N_TEST
    assert evaluated["confusion_matrix"] == metrics(one_dir)["confusion_matrix"]


@pytest.mark.slow
def test_resume_under_torchrun(ex1_runs, cifar_dir, tmp_path, narrow_script):
    """A single-process run's last.pt, continued for a second epoch by two processes."""
    one_dir, _, _ = ex1_runs
    run_dir = tmp_path / "run"
    shutil.copytree(one_dir, run_dir)
    (run_dir / "metrics.json").unlink()  # as if the run had stopped after its first epoch
    first = json.loads((run_dir / "history.json").read_text())[0]
    result = check(run_torchrun(narrow_script, "--resume", "--epochs", "2", "--out-dir", run_dir,
                                "--data-dir", cifar_dir, *QUICK))
    assert result.stdout.count("resuming after epoch 1 of 2") == 1
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    # the seconds epoch 1 spent saving include its write, known only after last.pt was written: last.pt lacks them
    assert {k: v for k, v in history[0].items() if k != "save_s"} == {k: v for k, v in first.items() if k != "save_s"}
    checkpoint = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    assert not [k for k in checkpoint["model"] if k.startswith("module.")]
    m = metrics(run_dir)
    assert m["processes"] == 2 and m["epochs_run"] == 2 and m["test_images"] == N_TEST


@pytest.mark.slow
def test_a_time_budget_sweep_under_torchrun_plans_once_and_every_process_follows_it(cifar_dir, tmp_path,
                                                                                    narrow_script):
    """Rank 0 times the steps and shares the total: both processes stop at the same step (no hang), one plan printed,
    which the second seed trains as it is; seeds.json sums them up."""
    result = check(run_torchrun(narrow_script, *QUICK, "--limit-train", "64", "--time-budget", "0.1", "--seeds", "2",
                                "--data-dir", cifar_dir, "--out-dir", tmp_path))
    first, second = (metrics(tmp_path / f"seed{seed}") for seed in (0, 1))
    assert first["processes"] == 2 and first["time_budget_minutes"] == 0.1
    assert first["planned_steps"] == first["run_steps"] >= 2
    assert second["plan"]["total_steps"] == first["plan"]["total_steps"] and second["plan"]["fixed"]
    assert result.stdout.count("plan: 0.1 min") == 1
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0, 1]


STOPPED_RANK_1 = """
import os, signal, itertools
import torch, common
if os.environ["RANK"] == "1":  # only this process gets the signal, at its 3rd step
    real, calls = torch.nn.functional.cross_entropy, itertools.count(1)
    def loss(*args, **kwargs):
        if next(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    common.train.F.cross_entropy = loss
"""


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_at_the_same_step_with_one_state(cifar_dir, tmp_path,
                                                                                   narrow_script):
    """SIGTERM to rank 1 inside epoch 1: both processes stop at the next step where they read the device (25), rank
    0 writes last.pt with both processes' streams and sums, and torchrun's --resume ends the run."""
    driver = tmp_path / "driver.py"
    driver.write_text(NARROW_EX1.format(root=str(ROOT), widths=NARROW_WIDTHS, patch=STOPPED_RANK_1))
    flags = [*QUICK, "--epochs", "1", "--limit-train", "256", "--batch-size", "8", "--no-tensorboard",
             "--data-dir", cifar_dir, "--out-dir", tmp_path / "run"]  # 32 steps of 4 images a process
    stopped = run_torchrun(str(driver), *flags)
    assert stopped.returncode != 0 and "stopped at epoch 1, step 25 of 32" in stopped.stderr, stopped.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["in_epoch"]
    assert state["step"] == 25 and [rank["step"] for rank in state["ranks"]] == [25, 25]
    assert not torch.equal(state["ranks"][0]["augment_rng"], state["ranks"][1]["augment_rng"])  # each its own
    resumed = check(run_torchrun(narrow_script, *flags, "--resume"))
    assert "resuming at epoch 1 of 1, step 25 of 32" in resumed.stdout
    assert [row["steps"] for row in json.loads((tmp_path / "run" / "history.json").read_text())] == [32]
