"""The training parts a run relies on, worked out by hand: precision choice, learning-rate schedule, weight decay,
the per-class accuracy and confusion matrix, and the data fingerprint that --resume checks."""
import pytest
import torch
import torch.nn as nn

import common
from conftest import write_cifar

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("capability, gpu, expected", [
    ((7, 0), "V100", torch.float16), ((7, 5), "T4", torch.float16), ((6, 1), "P40", torch.float16),
    ((8, 0), "A100", torch.bfloat16), ((8, 6), "RTX 3090", torch.bfloat16), ((9, 0), "H100", torch.bfloat16),
])
def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, gpu, expected):
    """torch says bf16 is supported on a T4 or V100 too (emulated, slow): auto must still choose fp16 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert common.device.resolve_precision("auto", CUDA) == expected, gpu


def test_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert common.device.resolve_precision("bf16", CUDA) == torch.bfloat16
    assert common.device.resolve_precision("fp32", CUDA) == torch.float32


STEPS = 100  # per epoch: 1000 steps in all, warm-up over the first 200


def one_cycle(step: int) -> float:
    return common.budget.lr_factor(step, 10 * STEPS, STEPS, "onecycle", warmup=0.2, lr_decay=None, lr_end=0.0)


def exponential(step: int) -> float:
    return common.budget.lr_factor(step, 10 * STEPS, STEPS, "exp", warmup=0.0, lr_decay=0.95, lr_end=0.0)


def test_one_cycle_rises_from_a_tenth_to_the_peak_then_falls_to_zero():
    factor = [one_cycle(step) for step in range(1001)]
    assert factor[0] == pytest.approx(0.1)  # the first step
    assert factor[100] == pytest.approx(0.55)  # half-way up
    assert factor[200] == pytest.approx(1.0) and max(factor) == factor[200]  # the end of warm-up is the peak
    assert factor[600] == pytest.approx(0.5)  # half-way down
    assert factor[999] == pytest.approx(1 / 800)  # the last step
    assert factor[1000] == 0.0


def test_exponential_schedule_decays_once_per_epoch():
    factor = [exponential(step) for step in range(1000)]
    assert factor[0] == factor[99] == 1.0  # constant through the first epoch
    assert factor[100] == pytest.approx(0.95) and factor[199] == pytest.approx(0.95)
    assert factor[999] == pytest.approx(0.95 ** 9)  # the last step, in the tenth epoch


def test_the_optimizer_sees_the_scheduled_learning_rate():
    """Through LambdaLR as training uses it: lr of the first step, after warm-up, and of the last step."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle)
    seen = []
    for _ in range(1000):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(2e-4) and seen[200] == pytest.approx(2e-3) and seen[999] == pytest.approx(2e-3 / 800)


def one_step(name: str, lr: float = 0.1, weight_decay: float = 0.5) -> list[float]:
    """Weights [1, 4] after one step of make_optimizer's `name` with a zero gradient: only weight decay moves them."""
    param = nn.Parameter(torch.tensor([1.0, 4.0]))
    optimizer = common.train.make_optimizer([param], name, lr, weight_decay)
    param.grad = torch.zeros(2)
    optimizer.step()
    return param.detach().tolist()


def test_adam_puts_weight_decay_into_the_gradient():
    """Adam with L2: the gradient becomes 0.5 * w, and Adam's first step moves each weight by lr against its sign."""
    assert one_step("adam") == pytest.approx([0.9, 3.9])


def test_adamw_decays_the_weights_apart_from_the_gradient():
    """AdamW: w * (1 - lr * wd) and no gradient step at all, as the gradient is zero."""
    assert one_step("adamw") == pytest.approx([0.95, 3.8])


def test_sgd_uses_nesterov_momentum_and_l2():
    """SGD: gradient 0.5 * w, Nesterov step lr * (g + 0.9 * g)."""
    assert one_step("sgd") == pytest.approx([1 - 0.1 * 0.95, 4 - 0.1 * 3.8])


LABELS = torch.tensor([0, 0, 0, 1, 1, 2])
PREDICTIONS = torch.tensor([0, 1, 1, 1, 2, 2])


def test_per_class_accuracy_by_hand():
    """Class a: 1 of 3 right, b: 1 of 2, c: 1 of 1."""
    accuracy = common.evaluation.per_class_accuracy(LABELS, PREDICTIONS, ("a", "b", "c"))
    assert list(accuracy) == ["a", "b", "c"]
    assert accuracy == pytest.approx({"a": 1 / 3, "b": 1 / 2, "c": 1.0})


def test_confusion_matrix_has_the_true_class_in_rows():
    """Row = true class, column = predicted: two a's taken for b sit in row a, column b."""
    assert common.evaluation.confusion_matrix(LABELS, PREDICTIONS, 3).tolist() == [[1, 2, 0],
                                                                         [0, 1, 1],
                                                                         [0, 0, 1]]


def test_data_fingerprint_follows_the_content_not_the_folder(tmp_path):
    """The same files in another folder give the same fingerprint; other images, labels or split sizes do not."""
    def fingerprint(root, val_size=64):
        return common.data.data_fingerprint(common.data.split_train_val(common.data.load_cifar10(root, download=False), val_size, None))

    original = fingerprint(write_cifar(tmp_path / "a", per_batch=16, n_test=10))
    assert fingerprint(write_cifar(tmp_path / "moved" / "b", per_batch=16, n_test=10)) == original
    assert fingerprint(write_cifar(tmp_path / "c", per_batch=16, n_test=10, seed=1)) != original
    assert fingerprint(tmp_path / "a", val_size=32) != original
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    assert common.data.data_fingerprint([images, labels]) != common.data.data_fingerprint([images, torch.tensor([0, 1, 2, 4])])


def test_one_cycle_ends_at_lr_end_of_the_peak():
    factor = [common.budget.lr_factor(step, 1000, STEPS, "onecycle", warmup=0.2, lr_decay=None, lr_end=0.07)
              for step in (200, 600, 1000)]
    assert factor == pytest.approx([1.0, (1.0 + 0.07) / 2, 0.07])


def test_parameter_groups_spare_one_dimensional_parameters_from_decay_and_speed_up_norm_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 10))
    conv, norm, linear = model[0], model[1], model[3]
    plain = common.train.parameter_groups(model, decay_norm_bias=True, lr=0.1)
    assert len(plain) == 1 and len(plain[0]["params"]) == 6 and plain[0]["lr"] == 0.1
    groups = common.train.parameter_groups(model, decay_norm_bias=False, lr=0.1, norm_bias_lr=8.0)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(conv.weight), id(linear.weight)} and "weight_decay" not in groups[0]  # the recipe's decay
    assert ids[1] == {id(conv.bias), id(norm.weight), id(linear.bias)} and groups[1]["weight_decay"] == 0.0
    assert ids[2] == {id(norm.bias)} and groups[2]["lr"] == pytest.approx(0.8) and groups[2]["weight_decay"] == 0.0
    optimizer = common.train.make_optimizer(groups, "adamw", 0.1, 0.05)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0, 0.0]


def test_lookahead_pulls_towards_the_average_by_a_weight_that_rises_with_progress():
    assert common.train.lookahead_decay(0, 100) == 0.0 and common.train.lookahead_decay(50, None) == 0.0
    assert common.train.lookahead_decay(100, 100) == pytest.approx(0.95 ** 5)
    assert common.train.lookahead_decay(50, 100) == pytest.approx(0.95 ** 5 / 8)  # the cube of the progress
    model = nn.BatchNorm1d(2)
    pairs = common.train.lookahead_pairs(model)
    with torch.no_grad():
        model.weight.fill_(3.0)  # the average holds 1
    model.num_batches_tracked += 7
    common.train.lookahead_pull(pairs, decay=0.75)
    average = dict(zip(("weight", "bias", "running_mean", "running_var"), (a for _, a in pairs)))
    assert torch.allclose(model.weight, torch.full((2,), 1.5)) and torch.equal(average["weight"], model.weight)
    assert model.num_batches_tracked == 7 and len(pairs) == 4  # counts are not averaged
