"""The Exercise 1 ConvNet as the command line builds it: size, output, the --no-bn variant, the original recipe."""
import torch
import torch.nn as nn

import common
import ex1_convnet

PARAMS_BN = 7_682_826
PARAMS_NO_BN = PARAMS_BN - 2 * (128 + 4 * 512)


def model_for(*argv: str) -> nn.Module:
    """The model ex1_convnet.py builds for these flags."""
    args = ex1_convnet.parse_args(list(argv))
    settings = common.cli.resolve_settings(common.cli.explicit_flags(args),
                                           ex1_convnet.RECIPES[args.recipe or "default"], ex1_convnet.Settings)
    torch.manual_seed(0)
    return ex1_convnet.build_model(settings)


def layers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_parameter_count_and_output_shape():
    model = model_for().eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS_BN
    assert len(layers(model, nn.BatchNorm2d)) == 5
    assert {m.momentum for m in layers(model, nn.BatchNorm2d)} == {0.1}  # PyTorch's BatchNorm as it is
    assert isinstance(model[-1], nn.Linear)  # the logits come straight from the last layer
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_no_bn_variant_has_no_batchnorm():
    model = model_for("--no-bn").eval()
    assert not layers(model, nn.modules.batchnorm._BatchNorm)
    assert sum(p.numel() for p in model.parameters()) == PARAMS_NO_BN
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
