"""The Exercise 1 ConvNet as the command line builds it: size, output, the --no-bn variant, the original recipe,
the whitened first-layer filters."""
import torch
import torch.nn as nn

import common
import ex1_convnet

PARAMS_BN = 7_682_826
PARAMS_NO_BN = PARAMS_BN - 2 * (128 + 4 * 512)


def model_for(*argv: str) -> nn.Module:
    """The model ex1_convnet.py builds for these flags."""
    args = ex1_convnet.parse_args(list(argv))
    settings = common.resolve_settings(common.explicit_flags(args), ex1_convnet.RECIPES[args.recipe or "default"],
                                       {"batch_norm": True})
    torch.manual_seed(0)
    return ex1_convnet.build_model(settings)


def layers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_parameter_count_and_output_shape():
    model = model_for().eval()
    assert common.count_parameters(model) == PARAMS_BN
    assert len(layers(model, nn.BatchNorm2d)) == 5
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_no_bn_variant_has_no_batchnorm():
    model = model_for("--no-bn").eval()
    assert not layers(model, nn.modules.batchnorm._BatchNorm)
    assert common.count_parameters(model) == PARAMS_NO_BN
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


def whitening_setup(*argv: str, images: torch.Tensor, resume_from: dict | None = None) -> common.Training:
    """What set_up_training starts for these ex1 flags on these training images."""
    args = ex1_convnet.parse_args(list(argv))
    settings = common.resolve_settings(common.explicit_flags(args), ex1_convnet.RECIPES["default"], {"batch_norm": True})
    settings = common.with_data_mean_std(settings, images)
    cpu = common.TrainContext(torch.device("cpu"), torch.float32)
    return common.set_up_training(settings, ex1_convnet.build_model, 10, cpu, resume_from, images)


def test_whitening_filters_decorrelate_the_patches(cifar_dir):
    """Convolved with the first 27 filters, the images' 3x3 patches have unit variance and no correlation; the
    other 27 are their negatives."""
    images = common.load_cifar10(cifar_dir, download=False).train_images
    mean, std = common.channel_mean_std(images)
    filters = common.patch_whitening_filters(images, mean, std)
    assert filters.shape == (54, 3, 3, 3)
    assert torch.equal(filters[27:], -filters[:27])
    out = torch.nn.functional.conv2d(common.normalize(images.float() / 255, mean, std), filters[:27])
    covariance = torch.cov(out.permute(1, 0, 2, 3).reshape(27, -1))
    assert torch.allclose(covariance, torch.eye(27), atol=0.02)


def test_whiten_sets_the_first_54_filters_of_a_new_run_only(cifar_dir):
    images = common.load_cifar10(cifar_dir, download=False).train_images
    mean, std = common.channel_mean_std(images)
    plain = whitening_setup(images=images)
    whitened = common.first_conv_weight(whitening_setup("--whiten", images=images).model).detach()
    assert torch.allclose(whitened[:54], common.patch_whitening_filters(images, mean, std))
    assert torch.equal(whitened[54:], common.first_conv_weight(plain.model)[54:])  # the others as without --whiten
    checkpoint = common._checkpoint("ex1_convnet.py", {}, plain, [], common.BestEpoch())
    resumed = whitening_setup("--whiten", images=images, resume_from=checkpoint)
    assert torch.equal(common.first_conv_weight(resumed.model), common.first_conv_weight(plain.model))
