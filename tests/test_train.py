"""The training parts a run relies on, worked out by hand: precision choice, learning-rate schedule, weight decay,
the per-class accuracy and confusion matrix, and the data fingerprint that --resume checks."""
import pytest
import torch
import torch.nn as nn
from conftest import write_cifar

import common

CUDA = torch.device("cuda", 0)


def test_precision_takes_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    """torch says bf16 is supported on a T4 or V100 too (emulated, slow): auto chooses fp16 there and an explicit bf16
    is refused, naming the GPU and fp16 instead; an explicit choice the GPU computes natively is kept."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    for precision, capability, expected in [
            ("auto", (6, 1), torch.float16), ("auto", (7, 5), torch.float16), ("auto", (8, 0), torch.bfloat16),
            ("auto", (9, 0), torch.bfloat16), ("bf16", (8, 0), torch.bfloat16), ("fp32", (7, 5), torch.float32),
            ("fp16", (7, 5), torch.float16), ("bf16", (7, 5), None)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, answer=capability: answer)
        if expected is None:
            with pytest.raises(common.files.UsageError, match=r"Tesla T4, compute capability 7\.5.*--precision fp16"):
                common.device.resolve_precision(precision, CUDA)
        else:
            assert common.device.resolve_precision(precision, CUDA) == expected, (precision, capability)


def scheduled_lrs(plan: common.train.Plan, peak_lrs: list[float]) -> list[list[float]]:
    """Each group's learning rate at each step train_one_epoch takes over the plan (linear model, a group per peak)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    optimizer = torch.optim.SGD([{"params": [model[1].weight], "lr": peak_lrs[0]},
                                 {"params": [model[1].bias], "lr": peak_lrs[-1]}][:len(peak_lrs)], lr=peak_lrs[0])
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append([group["lr"] for group in opt.param_groups]))
    training = common.train.Training(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), peak_lrs)
    images = torch.zeros(plan.batch_size * plan.steps_per_epoch, 3, 32, 32, dtype=torch.uint8)
    settings = common.cli.Settings(augment=[], mean=[0.0] * 3, std=[1.0] * 3)
    ctx = common.device.TrainContext(torch.device("cpu"), torch.float32)
    for epoch in range(1, plan.epochs + 1):
        common.train.train_one_epoch(training, images, torch.zeros(len(images), dtype=torch.long), settings, plan,
                                     epoch, ctx)
    return seen


def test_the_optimizer_sees_the_one_cycle_schedule_or_the_exponential_decay_once_per_epoch():
    """One-cycle: every group's peak times a tenth at the first step, rising over the first WARMUP of the steps to the
    peak, then falling to zero: half-way down, at the last step (10 epochs of 10 steps)."""
    seen = scheduled_lrs(common.train.Plan(batch_size=1, steps_per_epoch=10, total_steps=100), [2e-3, 1.6e-2])
    assert len(seen) == 100 and common.train.WARMUP == 0.2
    assert seen[0] == pytest.approx([2e-4, 1.6e-3])
    assert seen[10] == pytest.approx([1.1e-3, 8.8e-3])  # half-way up
    assert seen[20] == pytest.approx([2e-3, 1.6e-2]) and max(lrs[0] for lrs in seen) == seen[20][0]
    assert seen[60] == pytest.approx([1e-3, 8e-3])  # half-way down, in the seventh epoch
    assert seen[99] == pytest.approx([2e-3 / 80, 1.6e-2 / 80])  # the last (the factor reaches 0 after it: test_budget)
    plan = common.train.Plan(batch_size=1, steps_per_epoch=10, total_steps=30, lr_decay=0.95)
    seen = [lrs[0] for lrs in scheduled_lrs(plan, [2e-3])]
    assert len(seen) == 30
    assert seen[0] == seen[9] == pytest.approx(2e-3)
    assert seen[10] == seen[19] == pytest.approx(2e-3 * 0.95)
    assert seen[29] == pytest.approx(2e-3 * 0.95 ** 2)


def test_each_optimizer_applies_its_weight_decay():
    """Weights [1, 4] after one step (lr 0.1, weight decay 0.5) with a zero gradient. Adam with L2: gradient 0.5 * w,
    Adam's first step lr against its sign; AdamW: w * (1 - lr * wd); SGD: gradient 0.5 * w, Nesterov lr * 1.9 * g."""
    for name, expected in (("adam", [0.9, 3.9]), ("adamw", [0.95, 3.8]), ("sgd", [1 - 0.1 * 0.95, 4 - 0.1 * 3.8])):
        param = nn.Parameter(torch.tensor([1.0, 4.0]))
        optimizer = common.train.make_optimizer([param], name, 0.1, 0.5)
        param.grad = torch.zeros(2)
        optimizer.step()
        assert param.detach().tolist() == pytest.approx(expected), name


def test_per_class_accuracy_and_the_confusion_matrix_by_hand():
    """Class a: 1 of 3 right, b: 1 of 2, c: 1 of 1. Row = true class, column = predicted: two a's taken for b sit in
    row a, column b."""
    labels, predictions = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 2, 2])
    accuracy = common.evaluation.per_class_accuracy(labels, predictions, ("a", "b", "c"))
    assert list(accuracy) == ["a", "b", "c"]
    assert accuracy == pytest.approx({"a": 1 / 3, "b": 1 / 2, "c": 1.0})
    assert common.evaluation.confusion_matrix(labels, predictions, 3).tolist() == [[1, 2, 0], [0, 1, 1], [0, 0, 1]]


def test_data_fingerprint_follows_the_content_not_the_folder(tmp_path):
    """The same files in another folder give the same fingerprint; other images, labels or split sizes do not."""
    def fingerprint(root, val_size=64):
        data = common.data.load_cifar10(root, download=False)
        return common.data.data_fingerprint(common.data.split_train_val(data, val_size, None))

    original = fingerprint(write_cifar(tmp_path / "a", per_batch=16, n_test=10))
    assert fingerprint(write_cifar(tmp_path / "moved" / "b", per_batch=16, n_test=10)) == original
    assert fingerprint(write_cifar(tmp_path / "c", per_batch=16, n_test=10, seed=1)) != original
    assert fingerprint(tmp_path / "a", val_size=32) != original
    images, labels = torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    assert common.data.data_fingerprint([images, labels]) != common.data.data_fingerprint([images, labels + 1])


def test_parameter_groups_speed_up_the_norm_biases_only_when_asked():
    """One group at lr; with norm_bias_lr the BatchNorm biases learn in a second group at lr x norm_bias_lr; every
    group has the optimizer's weight decay."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 10))
    conv, norm, linear = model[0], model[1], model[3]
    plain = common.train.parameter_groups(model, lr=0.1)
    assert len(plain) == 1 and len(plain[0]["params"]) == 6 and plain[0]["lr"] == 0.1
    groups = common.train.parameter_groups(model, lr=0.1, norm_bias_lr=8.0)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids == [{id(conv.weight), id(conv.bias), id(norm.weight), id(linear.weight), id(linear.bias)},
                   {id(norm.bias)}]
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.8])
    optimizer = common.train.make_optimizer(groups, "adamw", 0.1, 0.05)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.05]
    no_norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    assert len(common.train.parameter_groups(no_norm, lr=0.1, norm_bias_lr=8.0)) == 1  # no empty group
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    frozen[1].bias.requires_grad_(False)
    assert [len(g["params"]) for g in common.train.parameter_groups(frozen, lr=0.1, norm_bias_lr=8.0)] == [3]
