"""The Exercise 1 ConvNet as the command line builds it: size, output, the --no-bn variant, the original recipe,
the whitened first-layer filters."""
import pytest
import torch
import torch.nn as nn

import common
import ex1_convnet
from conftest import QUICK, call

PARAMS_BN = 7_682_826
PARAMS_NO_BN = PARAMS_BN - 2 * (128 + 4 * 512)


def model_for(*argv: str) -> nn.Module:
    """The model ex1_convnet.py builds for these flags."""
    args = ex1_convnet.parse_args(list(argv))
    settings = common.settings.resolve_settings(common.settings.explicit_flags(args), ex1_convnet.RECIPES[args.recipe or "default"],
                                       ex1_convnet.Settings)
    torch.manual_seed(0)
    return ex1_convnet.build_model(settings)


def layers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_parameter_count_and_output_shape():
    model = model_for().eval()
    assert common.train.count_parameters(model) == PARAMS_BN
    assert len(layers(model, nn.BatchNorm2d)) == 5
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_no_bn_variant_has_no_batchnorm():
    model = model_for("--no-bn").eval()
    assert not layers(model, nn.modules.batchnorm._BatchNorm)
    assert common.train.count_parameters(model) == PARAMS_NO_BN
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_original_recipe_dropout_and_linear_init():
    """--recipe original: dropout 0.4 in the first block and 0.3 after, Linear weights drawn with std 1e-3."""
    model = model_for("--recipe", "original")
    assert [m.p for m in layers(model, nn.Dropout)] == [0.4, 0.3, 0.3, 0.3, 0.3]
    (linear,) = layers(model, nn.Linear)
    assert abs(linear.weight.std().item() - 1e-3) < 1e-4
    assert abs(linear.weight.mean().item()) < 1e-4


def test_dropout_flag_sets_every_block():
    model = model_for("--recipe", "original", "--dropout", "0.2")
    assert [m.p for m in layers(model, nn.Dropout)] == [0.2] * 5


def test_output_scale_multiplies_the_logits_and_bn_momentum_reaches_every_batchnorm():
    plain, scaled = model_for().eval(), model_for("--output-scale", "0.125", "--bn-momentum", "0.4").eval()
    assert common.train.count_parameters(scaled) == PARAMS_BN  # the same network: its state dict loads into the other
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scaled(x), plain(x) * 0.125, atol=1e-6)
    assert {m.momentum for m in layers(scaled, nn.BatchNorm2d)} == {0.4}
    assert {m.momentum for m in layers(plain, nn.BatchNorm2d)} == {0.1}


def whitening_setup(*argv: str, images: torch.Tensor, resume_from: dict | None = None) -> common.train.Training:
    """What set_up_training starts for these ex1 flags on these training images."""
    args = ex1_convnet.parse_args(list(argv))
    settings = common.settings.resolve_settings(common.settings.explicit_flags(args), ex1_convnet.RECIPES["default"], ex1_convnet.Settings)
    settings = common.run.with_data_mean_std(settings, images)
    cpu = common.device.TrainContext(torch.device("cpu"), torch.float32)
    return common.run.set_up_training(settings, ex1_convnet.build_model, common.budget.Plan(10, 300), cpu, resume_from, images)


def test_whitening_filters_decorrelate_the_patches(cifar_dir):
    """Convolved with the first 27 filters, the images' 3x3 patches have unit variance and no correlation; the
    other 27 are their negatives."""
    images = common.data.load_cifar10(cifar_dir, download=False).train_images
    mean, std = common.data.channel_mean_std(images)
    filters = common.train.patch_whitening_filters(images, mean, std)
    assert filters.shape == (54, 3, 3, 3)
    assert torch.equal(filters[27:], -filters[:27])
    out = torch.nn.functional.conv2d(common.augment.normalize(images.float() / 255, mean, std), filters[:27])
    covariance = torch.cov(out.permute(1, 0, 2, 3).reshape(27, -1))
    assert torch.allclose(covariance, torch.eye(27), atol=0.02)


def test_a_larger_whiten_eps_caps_the_amplification_of_the_rare_directions(cifar_dir, capsys):
    """Each filter is a unit eigenvector over sqrt(eigenvalue + eps): no filter is longer than 1/sqrt(eps), and the
    rarely used directions, the longest filters at a small eps, shrink most. --whiten-eps 0 is refused."""
    images = common.data.load_cifar10(cifar_dir, download=False).train_images
    mean, std = common.data.channel_mean_std(images)
    lengths = {eps: common.train.patch_whitening_filters(images, mean, std, eps).flatten(1).norm(dim=1)
               for eps in (5e-4, 0.1)}
    assert lengths[0.1].max() <= 0.1 ** -0.5 * 1.0001 < lengths[5e-4].max()
    assert torch.allclose(lengths[5e-4].min(), lengths[0.1].min(), rtol=0.5)  # the main directions barely change
    code, _, err = call(ex1_convnet.main, [*QUICK, "--data-dir", cifar_dir, "--whiten-eps", "0"], capsys)
    assert code == 2 and "--whiten-eps must be positive (got 0.0)" in err


def test_whiten_directions_keeps_the_largest_principal_directions(cifar_dir, capsys):
    """K directions give 2K filters: the K of the largest variance among all 27 (the same filters), then their
    negatives; the patches they see have unit variance along them."""
    images = common.data.load_cifar10(cifar_dir, download=False).train_images
    mean, std = common.data.channel_mean_std(images)
    every = common.train.patch_whitening_filters(images, mean, std)
    eight = common.train.patch_whitening_filters(images, mean, std, directions=8)
    assert eight.shape == (16, 3, 3, 3) and torch.equal(eight[8:], -eight[:8])
    assert torch.equal(eight[:8], every[19:27])  # the largest 8 of the 27, in the same (ascending) order
    out = torch.nn.functional.conv2d(common.augment.normalize(images.float() / 255, mean, std), eight[:8])
    assert torch.allclose(out.permute(1, 0, 2, 3).reshape(8, -1).var(1), torch.ones(8), atol=0.02)
    code, _, err = call(ex1_convnet.main, [*QUICK, "--data-dir", cifar_dir, "--whiten-directions", "28"], capsys)
    assert code == 2 and "--whiten-directions must be between 1 and 27 (got 28)" in err


def test_whiten_sets_the_first_54_filters_of_a_new_run_only(cifar_dir):
    images = common.data.load_cifar10(cifar_dir, download=False).train_images
    mean, std = common.data.channel_mean_std(images)
    plain = whitening_setup(images=images)
    whitened = common.train.first_conv_weight(whitening_setup("--whiten", images=images).model).detach()
    assert torch.allclose(whitened[:54], common.train.patch_whitening_filters(images, mean, std))
    assert torch.equal(whitened[54:], common.train.first_conv_weight(plain.model)[54:])  # the others as without --whiten
    checkpoint = common.train.checkpoint_state("ex1_convnet.py", {}, plain, [], common.train.BestEpoch())
    resumed = whitening_setup("--whiten", images=images, resume_from=checkpoint)
    assert torch.equal(common.train.first_conv_weight(resumed.model), common.train.first_conv_weight(plain.model))


@pytest.mark.slow
def test_a_real_run_whitens_with_its_first_training_images_only(cifar_dir, tmp_path, capsys, monkeypatch,
                                                                 no_filter_plots):
    """Through ex1_convnet.main: the whitening gets the training split, never the validation images, and uses its
    first WHITEN_IMAGES (here capped at 100 of its 256). A learning rate of 1e-9 leaves the filters in best.pt as
    they started."""
    monkeypatch.setattr(common.train, "WHITEN_IMAGES", 100)
    given, whiten = [], common.train.patch_whitening_filters

    def recording(images, *args):
        given.append(images)
        return whiten(images, *args)

    monkeypatch.setattr(common.run, "patch_whitening_filters", recording)
    code, _, err = call(ex1_convnet.main, [*QUICK, "--data-dir", cifar_dir, "--out-dir", tmp_path, "--epochs", "1",
                                           "--whiten", "--lr", "1e-9"], capsys)
    assert code == 0, err[-3000:]
    train_images, _, val_images, _ = common.data.split_train_val(common.data.load_cifar10(cifar_dir, False), 64, None)
    assert len(given) == 1 and torch.equal(given[0], train_images)
    checkpoint = common.files.load_checkpoint(tmp_path / "best.pt", "ex1_convnet.py")
    mean, std = checkpoint["settings"]["mean"], checkpoint["settings"]["std"]
    assert (mean, std) == common.data.channel_mean_std(train_images)
    capped = whiten(train_images[:100], mean, std)
    assert torch.allclose(checkpoint["model"]["0.weight"][:54], capped, atol=1e-5)
    assert torch.equal(whiten(train_images, mean, std), capped)  # the cap: images past the 100th do not count
    monkeypatch.setattr(common.train, "WHITEN_IMAGES", 5000)
    assert not torch.equal(whiten(train_images, mean, std), capped)  # ... and they would have
