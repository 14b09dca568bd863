"""Every machine a student has, checked on the CPU: no float64 on the training device (Apple's MPS has none),
resuming into another precision, what each device computes natively, torchrun's backend and refusals, checkpoints a
fast GPU does not wait for, and the line that says how long a run takes."""
import pytest
import torch
from conftest import call, interrupt_validation, QUICK, read_json
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common
import ex1_convnet

CPU = torch.device("cpu")


class Float64Watcher(TorchDispatchMode):
    """Records every tensor operation whose result is float64, except while `paused`."""

    def __init__(self):
        super().__init__()
        self.found, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not self.paused and any(isinstance(t, torch.Tensor) and t.dtype == torch.float64
                                   for t in tree_leaves(result)):
            self.found.append(str(func))
        return result


@pytest.mark.slow
def test_a_run_its_test_tta_corruption_benchmark_and_predict_make_no_float64_tensor(cifar_dir, tmp_path, monkeypatch,
                                                                                   capsys, narrow_ex1):
    watcher = Float64Watcher()
    mean_std = common.train.channel_mean_std

    def on_the_host(images):  # the data module's loading may stay float64 (the fixed-seed figures depend on it)
        watcher.paused = True
        try:
            return mean_std(images)
        finally:
            watcher.paused = False

    monkeypatch.setattr(common.train, "channel_mean_std", on_the_host)
    picture = tmp_path / "cat.png"
    common.plots.pyplot().imsave(picture, torch.rand(40, 30, 3).numpy())
    run = [*QUICK, "--data-dir", cifar_dir, "--out-dir", tmp_path / "run", "--epochs", "1", "--limit-train", "64",
           "--no-tensorboard"]
    with watcher:
        code, _, err = call(ex1_convnet.main, [*run, "--tta", "--corruptions", "20"], capsys)
        assert code == 0, err[-3000:]
        code, _, err = call(ex1_convnet.main, ["--predict", picture, "--tta", "--checkpoint", tmp_path / "run/best.pt",
                                               "--device", "cpu", "--precision", "fp32"], capsys)
        assert code == 0, err[-3000:]
    assert read_json(tmp_path / "run/metrics.json")["corruptions"]["images"] == 20  # the benchmark ran, watched
    assert watcher.found == []


@pytest.mark.slow
def test_an_fp16_run_resumed_on_a_cpu_trains_in_what_auto_picks_and_says_so(cifar_dir, tmp_path, monkeypatch, capsys,
                                                                            narrow_ex1):
    """A run whose epochs trained in fp16 (on a GPU: its last.pt says so) resumed on a CPU without native bf16; then
    extended with a --precision, which wins."""
    monkeypatch.setattr(common.device, "cpu_has_fast_bf16", lambda: False)
    run = [*QUICK, "--data-dir", cifar_dir, "--out-dir", tmp_path, "--epochs", "2", "--limit-train", "128",
           "--no-tensorboard"]
    interrupt_validation(monkeypatch, call=2)  # epoch 2's validation
    assert call(ex1_convnet.main, run, capsys)[0] == 130
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    last["history"][0]["precision"] = "float16"
    torch.save(last, tmp_path / "last.pt")
    auto = [flag for flag in run if flag not in ("--precision", "fp32")]  # no --precision: what the resume picks
    code, out, err = call(ex1_convnet.main, [*auto, "--resume"], capsys)
    assert code == 0, err[-3000:]
    assert "note: epochs 1-1 trained in float16; cpu has no native fp16: --precision auto makes the rest float32" in out
    assert [row["precision"] for row in read_json(tmp_path / "history.json")] == ["float16", "float32"]
    resume = [*QUICK, "--data-dir", cifar_dir, "--out-dir", tmp_path, "--resume", "--limit-train", "128"]
    code, out, _ = call(ex1_convnet.main, resume, capsys)
    assert code == 0 and "holds a finished run (metrics.json); nothing to resume" in out
    code, out, err = call(ex1_convnet.main, [*resume, "--epochs", "3", "--precision", "bf16"], capsys)  # extended
    assert code == 0, err[-3000:]
    assert "note: epochs 1-2 trained in float32; --precision makes the rest bfloat16" in out  # what is given wins
    assert [row["precision"] for row in read_json(tmp_path / "history.json")] == ["float16", "float32", "bfloat16"]
    assert read_json(tmp_path / "metrics.json")["precision"] == "float16+float32+bfloat16"
    assert read_json(tmp_path / "metrics.json")["epochs_run"] == 3


def test_an_fp16_run_resumed_in_fp16_keeps_its_scale(cifar_dir):
    settings = common.cli.resolve_settings({}, {}, ex1_convnet.Settings)
    fp16 = common.device.TrainContext(CPU, torch.float16)
    saved = common.train.set_up_training(settings, ex1_convnet.build_model, fp16, None)
    saved.scaler.scale(torch.ones(()))  # the scale is made at the first step
    saved.scaler.update(1024.0)  # as after a run of steps
    checkpoint = common.files.checkpoint_state("ex1_convnet.py", dict(settings), saved, [], common.train.BestEpoch())
    resumed = common.train.set_up_training(settings, ex1_convnet.build_model, fp16, checkpoint)
    assert resumed.scaler.get_scale() == 1024.0 != torch.amp.GradScaler("cpu").get_scale()
    fp32 = common.train.set_up_training(settings, ex1_convnet.build_model,
                                        common.device.TrainContext(CPU, torch.float32), checkpoint)
    assert not fp32.scaler.is_enabled()  # an fp16 run resumed in fp32: its scale is not needed


def fake_gpu(monkeypatch, capability: tuple[int, int]) -> torch.device:
    """A CUDA device of `capability` as torch.cuda reports it here (no GPU is used)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"a GPU of {capability[0]}.{capability[1]}")
    device = common.device.resolve_device("cuda")
    assert device == torch.device("cuda", 0)  # the patches took effect: this machine has no CUDA
    return device


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_resume_keeps_bf16_only_where_the_device_computes_it_natively(fast_bf16, monkeypatch, capsys):
    monkeypatch.setattr(common.device, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert common.device.native_bf16(CPU) is fast_bf16  # the patch took effect
    saved = {"history": [{"precision": "bfloat16"}], "settings": {"precision": "auto"}}
    ctx = common.device.TrainContext(CPU, common.device.resolve_precision("auto", CPU))
    resumed = common.device.resumed_precision(ctx, saved, precision_given=False)
    out = capsys.readouterr().out
    if fast_bf16:  # the same machine: the same precision, so the resume is bit-identical
        assert resumed.dtype == torch.bfloat16 and out == ""
    else:
        assert resumed.dtype == torch.float32
        assert ("note: epochs 1-1 trained in bfloat16; cpu has no native bf16: "
                "--precision auto makes the rest float32") in out


def torchrun_environment(monkeypatch, local_world: int) -> list:
    """torchrun's variables for rank 0 of 2 processes, `local_world` of them on this machine; init_process_group
    recorded, not called."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": str(local_world)}.items():
        monkeypatch.setenv(name, value)
    backends = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kwargs: backends.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    return backends


def test_the_process_group_backend_follows_the_device(monkeypatch):
    fake_gpu(monkeypatch, (8, 0))
    backends = torchrun_environment(monkeypatch, 1)  # two machines of one GPU each
    assert common.device.init_distributed("cpu") == (0, 2, 0)
    assert common.device.init_distributed("auto") == (0, 2, 0)
    assert backends == ["gloo", "nccl"]  # gloo for --device cpu even where CUDA exists


@pytest.mark.parametrize("device, local_world, expected", [
    ("cuda:0", 1, "--device cuda:0 under torchrun: each process takes the GPU of its local rank; pass --device cuda"),
    ("cuda", 2, "torchrun started 2 processes on a machine with 1 GPU(s): pass --nproc_per_node=1"),
    ("auto", 2, "torchrun started 2 processes on a machine with 1 GPU(s): pass --nproc_per_node=1")])
def test_torchrun_refuses_a_numbered_gpu_and_more_processes_than_gpus(device, local_world, expected, monkeypatch,
                                                                    tmp_path, capsys):
    fake_gpu(monkeypatch, (8, 0))
    backends = torchrun_environment(monkeypatch, local_world)
    code, _, err = call(ex1_convnet.main, ["--device", device, "--out-dir", tmp_path / "run", "--no-download"], capsys)
    assert code == 2 and expected in err and "Traceback" not in err
    assert backends == [] and not (tmp_path / "run").exists()  # before any work


@pytest.mark.slow
def test_a_run_faster_than_the_save_interval_writes_its_checkpoints_once_and_records_the_seconds(
        cifar_dir, tmp_path, monkeypatch, capsys, narrow_ex1):
    writes, save = [], common.files.save_checkpoint

    def counted(obj, path):
        writes.append((path.name, obj["epoch"]))
        return save(obj, path)

    monkeypatch.setattr(common.files, "save_checkpoint", counted)
    run = [*QUICK, "--data-dir", cifar_dir, "--out-dir", tmp_path, "--epochs", "3", "--limit-train", "64",
           "--no-tensorboard"]
    assert call(ex1_convnet.main, run, capsys)[0] == 0
    best = read_json(tmp_path / "metrics.json")["best_epoch"]
    # epochs of a second or two: written after the first epoch, then at the end
    assert sorted(writes) == sorted({("best.pt", 1), ("best.pt", best), ("last.pt", 1), ("last.pt", 3)})
    history = read_json(tmp_path / "history.json")
    assert all(row["save_s"] >= 0 for row in history) and read_json(tmp_path / "metrics.json")["save_seconds"] > 0

    writes.clear()
    interrupt_validation(monkeypatch, call=3)  # epoch 3's: Ctrl-C writes what the memory holds
    assert call(ex1_convnet.main, [*run, "--overwrite"], capsys)[0] == 130
    assert writes[-1] == ("last.pt", 2)  # epoch 2, held in memory, written by Ctrl-C
    assert common.files.load_checkpoint(tmp_path / "last.pt", "ex1_convnet.py")["epoch"] == 2


def test_a_long_run_says_how_long_it_takes_and_names_the_time_budget():
    plan = common.train.Plan(256, 191, 30 * 191)  # 30 epochs of 49,000 images
    line = common.evaluation.how_long(plan, common.evaluation.Estimate(30 * 191, 1000, 10000, None), 60.0)
    # 4.27 s a step, a third of that an image's forward pass: 166 s of validation, 56 s of test, 106 s of corruption
    # benchmark (19 passes over the first 1,000)
    assert line.startswith("how long: about 6 h 52 min at 60 images/s (training 6 h 47 min, validation 3 min, test "
                           "and corruption benchmark 3 min)")
    assert line.endswith("; --time-budget MINUTES chooses how long instead")
    short = common.evaluation.how_long(plan, common.evaluation.Estimate(191, 1000, 10000, 0), 600.0)
    assert short.startswith("how long: about 1") and "--time-budget" not in short


@pytest.mark.slow
def test_a_run_of_epochs_says_how_long_after_its_first_steps(cifar_dir, tmp_path, capsys, narrow_ex1):
    run = [*QUICK, "--data-dir", cifar_dir, "--out-dir", tmp_path, "--epochs", "8", "--batch-size", "8",
           "--limit-train", "64", "--no-tensorboard"]  # 8 epochs of 8 steps: told after 50 steps, in epoch 7
    code, out, err = call(ex1_convnet.main, run, capsys)
    assert code == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("how long: about ")]
    assert len(lines) == 1 and "images/s (training " in lines[0]
    assert out.index("how long: ") < out.index("epoch   7/8")  # told early, not at the end
