"""Exercise 2: transfer learning with torchvision's VGG-11-bn on CIFAR-10.

    python ex2_transfer.py --pretrained        # fine-tune the ImageNet weights (the default), runs/ex2-pretrained/
    python ex2_transfer.py --scratch           # the same network from random weights, runs/ex2-scratch/
    python ex2_transfer.py --freeze            # train only the new head on frozen ImageNet features, runs/ex2-frozen/
    python ex2_transfer.py --weights vgg11_bn-6002323d.pth    # ImageNet weights from a local file (no network)
    python ex2_transfer.py --compare runs/ex2-pretrained runs/ex2-scratch
    python ex2_transfer.py --scratch --seeds 3  # 3 seeds in runs/ex2-scratch/seed<S>/: mean ± std in seeds.json
    python ex2_transfer.py --predict my_photos/ [--tta]      # classify your images with runs/ex2-pretrained/best.pt
    torchrun --standalone --nproc_per_node=4 ex2_transfer.py --scratch

The network: VGG-11-bn's convolutional features (on 32x32 images they end in 512x1x1), then
Linear(512, 256) -> BatchNorm1d -> ReLU -> Linear(256, 10). Every mode normalises its input with the
ImageNet mean and std that torchvision's weights carry.
"""
import argparse
import dataclasses
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torchvision
from torchvision.models import VGG11_BN_Weights

import common

WEIGHTS = VGG11_BN_Weights.IMAGENET1K_V1

# Ours (common.cli.Settings' defaults) for each mode, with ImageNet's mean and std (those the weights carry).
IMAGENET = dict(mean=list(WEIGHTS.transforms().mean), std=list(WEIGHTS.transforms().std))
RECIPES = {
    "pretrained": dict(IMAGENET, epochs=20, lr=1e-3),
    "scratch": IMAGENET,
    "frozen": dict(IMAGENET, epochs=10, augment="flip"),
    # The assignment's, for every mode: Adam 1e-3, lr x0.99 per epoch, flips and 5% greyscale.
    "original": dict(IMAGENET, epochs=25, batch_size=200, optimizer="adam", lr=1e-3, weight_decay=0.0, lr_decay=0.99,
                     label_smoothing=0.0, augment="flip,gray"),
}


class FrozenFeatures(nn.Sequential):
    """Backbone that stays in eval mode: its BatchNorm layers keep ImageNet's running statistics, which the frozen
    convolutions after them were trained against (batch statistics would shift every feature and the buffers)."""

    def train(self, mode: bool = True) -> "FrozenFeatures":
        return super().train(False)


def imagenet_state_dict(path: str | None) -> dict:
    """VGG-11-bn ImageNet weights: from `path` if given, else torchvision's download (hash-checked, then cached)."""
    if path is None:
        try:
            return WEIGHTS.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except Exception as e:  # URLError (no network), RuntimeError (bad download), UnpicklingError (corrupt cache)
            raise common.files.UsageError(
                f"could not get the ImageNet weights ({common.files.describe_error(e)}). Without network, fetch "
                f"{WEIGHTS.url} elsewhere and pass it with --weights PATH, or place it in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}; or train from random weights with --scratch") from None
    path = Path(path)
    if not path.is_file():
        raise common.files.UsageError(f"--weights {path}: no such file")
    state = common.files.read_torch_file(path, "weights file")
    if isinstance(state, dict) and "kind" in state and "model" in state:
        raise common.files.UsageError(f"--weights {path}: a training checkpoint of {state['kind']}, not ImageNet "
                                      "VGG-11-bn weights")
    return state


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(common.cli.Settings):
    """common.cli.Settings and this network's own."""
    mode: str = "pretrained"  # pretrained, scratch or frozen (--pretrained, --scratch, --freeze)
    weights: str | None = common.cli.setting(None, "ImageNet VGG-11-bn weights from this file, in torchvision's "
                                                   "layout, instead of the download")


def build_model(settings: Mapping, *, initial_weights: bool = True) -> nn.Sequential:
    """VGG-11-bn features and the new head; the ImageNet weights loaded when the mode starts from them and
    `initial_weights` asks for them (not when a checkpoint's weights come next)."""
    vgg = torchvision.models.vgg11_bn()
    if initial_weights and settings["mode"] != "scratch":
        common.files.load_weights(vgg, imagenet_state_dict(settings["weights"]), f"--weights {settings['weights']}",
                                  "VGG-11-bn in torchvision's layout")
    features = vgg.features
    if settings["mode"] == "frozen":
        features = FrozenFeatures(*features)
        features.requires_grad_(False)
    head = nn.Sequential(nn.Flatten(), nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                         nn.Linear(256, 10))
    return nn.Sequential(OrderedDict(features=features, head=head))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.cli.add_arguments(parser, Settings)
    parser.add_argument("--pretrained", dest="mode", action="store_const", const="pretrained",
                        help="fine-tune the whole network from the ImageNet weights (the default)")
    parser.add_argument("--scratch", dest="mode", action="store_const", const="scratch",
                        help="train the same network from random weights")
    parser.add_argument("--freeze", action="store_true",
                        help="freeze the ImageNet features (with --weights when given) and train only the new head")
    args = parser.parse_args(argv)
    if args.mode == "scratch" and (args.freeze or args.weights):
        parser.error("--scratch trains from random weights: it cannot be combined with --freeze or --weights")
    if args.freeze:
        args.mode = "frozen"
    del args.freeze
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = args.mode or "pretrained"
    recipes = {"default": RECIPES[mode], "original": RECIPES["original"]}  # 'default': ours for the mode
    return common.cli.run_experiment(args, "ex2_transfer.py", recipes, Settings, build_model, f"runs/ex2-{mode}")


if __name__ == "__main__":
    sys.exit(main())
