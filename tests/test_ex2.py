"""Exercise 2 (VGG-11-bn transfer learning): the network, --weights, --scratch, --freeze and the runs (--compare is
ex1's: tests/test_studies.py; docs/guide.md's command parses with ex2's flags: tests/test_docs.py). No network:
ImageNet weights are a random vgg11_bn file in torchvision's layout (--weights, or in the cache)."""
import json
import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import assert_png, in_process, QUICK
from torchvision.models import VGG11_BN_Weights

import common
import ex2_transfer

IMAGENET_MEAN = list(VGG11_BN_Weights.IMAGENET1K_V1.transforms().mean)
IMAGENET_STD = list(VGG11_BN_Weights.IMAGENET1K_V1.transforms().std)
REPORTS = ("metrics.json", "history.json", "history.png", "per_class.png", "confusion.png", "misclassified.png")
EPOCHS = 1  # of 2 steps: what each test checks holds from the first step on
HEAD_PARAMS = 6  # Linear(512,256) weight+bias, BatchNorm1d weight+bias, Linear(256,10) weight+bias


def features_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("features.")}


# ----------------------------------------------------------------------------- files

@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory) -> Path:
    """A random vgg11_bn state dict in torchvision's layout, with non-default BatchNorm weights and running stats."""
    gen = torch.Generator().manual_seed(123)
    model = torchvision.models.vgg11_bn()
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.num_batches_tracked.fill_(7)
    state = model.state_dict()
    path = tmp_path_factory.mktemp("weights") / "vgg11_bn-random.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def vgg_features(vgg_weights) -> dict:
    """The features.* tensors (parameters and buffers) of the weights file."""
    return features_of(torch.load(vgg_weights, map_location="cpu", weights_only=True))


# ----------------------------------------------------------------------------- runs (shared by several tests)

def _train(mode_flags: list, cifar_dir: Path, tmp_path_factory, name: str) -> dict:
    """An ex2 run in-process, with a TORCH_HOME that does not exist: any attempt to reach the weights cache would
    create it. Its exit code, stdout, folder and TORCH_HOME."""
    base = tmp_path_factory.mktemp(name)
    out_dir, torch_home = base / "run", base / "torch_home_absent"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(torch_home))
        code, stdout = in_process(ex2_transfer.main, *mode_flags, *QUICK, "--data-dir", cifar_dir, "--out-dir", out_dir,
                                  "--epochs", EPOCHS, "--limit-train", 64)
    return {"code": code, "stdout": stdout, "out_dir": out_dir, "torch_home": torch_home}


@pytest.fixture(scope="module")
def run_pretrained(cifar_dir, vgg_weights, tmp_path_factory):
    return _train(["--weights", vgg_weights], cifar_dir, tmp_path_factory, "pretrained")


@pytest.fixture(scope="module")
def run_frozen(cifar_dir, vgg_weights, tmp_path_factory):
    return _train(["--freeze", "--weights", vgg_weights], cifar_dir, tmp_path_factory, "frozen")


def finished(run: dict) -> dict:
    assert run["code"] == 0, f"exit {run['code']}\n{run['stdout'][-3000:]}"
    return run


# ----------------------------------------------------------------------------- the network

def test_network_is_vgg11_bn_features_and_the_new_head():
    model = ex2_transfer.build_model({"mode": "scratch", "weights": None})
    assert list(dict(model.named_children())) == ["features", "head"]  # no avgpool, no classifier
    with torch.device("meta"):
        reference = torchvision.models.vgg11_bn().features
    assert [type(m) for m in model.features] == [type(m) for m in reference]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(isinstance(m, nn.BatchNorm2d) for m in model.features
                                   if not isinstance(m, (nn.Conv2d, nn.ReLU, nn.MaxPool2d)))
    model.eval()
    with torch.no_grad():
        assert model.features(torch.zeros(2, 3, 32, 32)).shape == (2, 512, 1, 1)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    layers = [m for m in model.head if not isinstance(m, nn.Flatten)]
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # logits: no activation
    assert (layers[0].in_features, layers[0].out_features, layers[1].num_features) == (512, 256, 256)
    assert (layers[3].in_features, layers[3].out_features) == (256, 10)


@pytest.mark.parametrize("flags, mode", [([], "pretrained"), (["--pretrained"], "pretrained"),
                                         (["--scratch"], "scratch"), (["--freeze"], "frozen"),
                                         (["--freeze", "--weights", "w.pth"], "frozen"),
                                         (["--scratch", "--recipe", "original"], "scratch")])
def test_modes_default_out_dir_and_imagenet_normalisation(tmp_path, monkeypatch, fake_runs, flags, mode):
    monkeypatch.chdir(tmp_path)
    assert ex2_transfer.main([*flags, "--device", "cpu"]) == 0  # the real driver up to the training
    (run,) = fake_runs
    assert run["run_dir"] == Path(f"runs/ex2-{mode}") and run["mode"] == mode
    assert run["weights"] == ("w.pth" if "--weights" in flags else None)
    assert run["mean"] == IMAGENET_MEAN and run["std"] == IMAGENET_STD


@pytest.mark.parametrize("flags", [["--scratch", "--freeze"], ["--freeze", "--scratch"],
                                   ["--scratch", "--weights", "w.pth"]])
def test_scratch_with_freeze_or_weights_is_refused(capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        ex2_transfer.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--scratch" in err and "--freeze" in err and "--weights" in err


# ----------------------------------------------------------------------------- weights

def test_weights_come_from_the_cache_without_network_and_a_missing_or_corrupt_one_says_how_to_provide_them(
        monkeypatch, tmp_path, vgg_weights, vgg_features):
    attempts, cache = [], tmp_path / "hub" / "checkpoints"

    def no_network(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(common.files.UsageError) as error:  # no cache
        ex2_transfer.imagenet_state_dict(None)
    assert attempts == [VGG11_BN_Weights.IMAGENET1K_V1.url]  # the download torchvision's weights API asks for
    for words in ("--weights", "--scratch", VGG11_BN_Weights.IMAGENET1K_V1.url):
        assert words in str(error.value)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / Path(VGG11_BN_Weights.IMAGENET1K_V1.url).name).write_bytes(b"no")  # a corrupt cache
    with pytest.raises(common.files.UsageError, match="--weights"):
        ex2_transfer.imagenet_state_dict(None)
    (cache / Path(VGG11_BN_Weights.IMAGENET1K_V1.url).name).unlink()
    os.symlink(vgg_weights, cache / Path(VGG11_BN_Weights.IMAGENET1K_V1.url).name)
    real_load, loads = torch.load, []

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    model = ex2_transfer.build_model({"mode": "pretrained", "weights": None})
    assert loads == [True] and len(attempts) == 1  # weights_only=True, and no download
    assert torch.equal(model.state_dict()["features.0.weight"], vgg_features["features.0.weight"])


def test_scratch_never_reads_weights(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("--scratch looked for ImageNet weights")

    monkeypatch.setattr(ex2_transfer, "imagenet_state_dict", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    model = ex2_transfer.build_model({"mode": "scratch", "weights": None}, initial_weights=True)
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pretrained", "frozen"])
def test_end_to_end_run_writes_every_report(request, mode, vgg_weights):
    """(--scratch end to end: tests/test_distributed.py; it reads no weights: test_scratch_never_reads_weights.)"""
    run = finished(request.getfixturevalue(f"run_{mode}"))
    out_dir = run["out_dir"]
    for name in REPORTS:
        assert (out_dir / name).is_file(), f"{mode}: {name} missing"
        if name.endswith(".png"):
            assert_png(out_dir / name)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    history = json.loads((out_dir / "history.json").read_text())
    assert len(history) == EPOCHS and metrics["epochs_run"] == EPOCHS
    assert metrics["test_images"] == 120 and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["settings"]["mode"] == mode and metrics["settings"]["weights"] == str(vgg_weights)
    assert metrics["settings"]["mean"] == IMAGENET_MEAN and metrics["settings"]["std"] == IMAGENET_STD
    assert not run["torch_home"].exists(), "looked in the torch hub cache although weights were given"


@pytest.mark.slow
def test_pretrained_fine_tunes_the_whole_network_and_frozen_keeps_the_backbone_bit_identical(run_pretrained,
                                                                                              run_frozen, vgg_features):
    with torch.device("meta"):
        model = ex2_transfer.build_model({"mode": "scratch", "weights": None})
    checkpoint = torch.load(finished(run_pretrained)["out_dir"] / "last.pt", map_location="cpu", weights_only=True)
    assert len(checkpoint["optimizer"]["param_groups"][0]["params"]) == len(list(model.parameters()))
    assert not torch.equal(checkpoint["model"]["features.0.weight"], vgg_features["features.0.weight"])
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(finished(run_frozen)["out_dir"] / name, map_location="cpu", weights_only=True)
        features = features_of(checkpoint["model"])
        assert features.keys() == vgg_features.keys()
        for key, value in vgg_features.items():
            assert torch.equal(features[key], value), f"{name}: {key} changed"
        if name == "last.pt":
            # only the head is optimised, and it is: AdamW's state holds its steps
            assert len(checkpoint["optimizer"]["param_groups"][0]["params"]) == HEAD_PARAMS
            assert [float(state["step"]) > 0 for state in checkpoint["optimizer"]["state"].values()] == \
                [True] * HEAD_PARAMS
    assert f"({sum(p.numel() for p in model.head.parameters()):,} trainable)" in run_frozen["stdout"]
