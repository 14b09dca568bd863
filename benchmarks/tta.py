"""Test-time augmentation variants on trained checkpoints: the test accuracy each set of views gives.

    python benchmarks/tta.py --data-dir data runs/ex1/best.pt [more/best.pt ...] [--out tta.json]

For each checkpoint: no views, the mirror alone, and the image with its mirror each shifted diagonally both ways by 2
pixels with zero fill (what --tta averages), by 1 with reflected fill (airbench's) or by 1 with zero fill, with equal
weights (--tta's average of softmaxes) or half the weight on the unshifted pair. On the CPU, on the whole test set;
the figures go to stdout and --out with the precision they were computed in.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import ex1_convnet  # noqa: E402
import ex2_transfer  # noqa: E402

BUILDERS = {"ex1_convnet.py": ex1_convnet.build_model, "ex2_transfer.py": ex2_transfer.build_model}


SHIFTS = ((2, "constant"), (1, "reflect"), (1, "constant"))  # (pixels, fill): the first is --tta's


@torch.no_grad()
def view_log_probs(model, images: torch.Tensor, mean, std, ctx: common.device.TrainContext) -> dict[str, torch.Tensor]:
    """Log-softmax (views, N, 10): of the image and its mirror ("plain"), and for each of SHIFTS of the two shifts of
    the image and of the mirror."""
    model.eval()
    mean, std = torch.tensor(mean), torch.tensor(std)
    out = {name: [] for name in ("plain", *SHIFTS)}
    for start in range(0, len(images), common.evaluation.EVAL_BATCH):
        x = images[start:start + common.evaluation.EVAL_BATCH].float().div(255)
        views = {"plain": [x, x.flip(-1)]}  # tta_views: the image, its two shifts, the mirror, the mirror's two shifts
        views.update({key: [common.evaluation.tta_views(x, *key)[i] for i in (1, 2, 4, 5)] for key in SHIFTS})
        with common.device.autocast(ctx):
            for name, batch in views.items():
                out[name].append(torch.stack([model(common.augment.normalize(v, mean, std)).float().log_softmax(1) for v in batch]))
    return {name: torch.cat(parts, 1) for name, parts in out.items()}


def accuracy(log_probs: torch.Tensor, weights: list[float], labels: torch.Tensor) -> float:
    """Accuracy of the weighted average of the views' softmaxes."""
    w = torch.tensor(weights, dtype=log_probs.dtype).log()[:, None, None]
    return ((log_probs + w).logsumexp(0).argmax(1) == labels).float().mean().item()


def variants(log_probs: dict, labels: torch.Tensor) -> dict[str, float]:
    """The accuracy of each set of views, by name."""
    plain = log_probs["plain"]
    result = {"none": accuracy(plain[:1], [1], labels), "mirror": accuracy(plain, [1, 1], labels)}
    for shift, padding in SHIFTS:
        views = torch.cat([plain, log_probs[(shift, padding)]])
        result[f"mirror+shift{shift}-{padding}"] = accuracy(views, [1] * 6, labels)
        result[f"mirror+shift{shift}-{padding}, unshifted half"] = accuracy(views, [2, 2, 1, 1, 1, 1], labels)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="best.pt files of ex1_convnet.py or ex2_transfer.py runs")
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default: data)")
    parser.add_argument("--out", help="write the accuracies as JSON to this file")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto (default): bf16 on a CPU with native bf16, else fp32")
    args = parser.parse_args(argv)
    data = common.data.load_cifar10(args.data_dir, download=False)
    precision = common.device.resolve_precision(args.precision, torch.device("cpu"))
    cpu = common.device.TrainContext(torch.device("cpu"), precision)
    rows = {}
    for path in args.checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = common.tasks.model_from_checkpoint(checkpoint, BUILDERS[checkpoint["kind"]], cpu)
        mean, std = checkpoint["settings"]["mean"], checkpoint["settings"]["std"]
        rows[path] = variants(view_log_probs(model, data.test_images, mean, std, cpu), data.test_labels)
        print(path)
        for name, value in rows[path].items():
            print(f"  {name:<40}{value:.2%}")
    if len(rows) > 1:
        print(f"mean over {len(rows)} checkpoints (± sample std)")
        for name in next(iter(rows.values())):
            spread = common.studies.spread([row[name] for row in rows.values()])
            print(f"  {name:<40}{spread['mean']:.2%} ± {spread['std']:.2%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"test_images": len(data.test_labels), "precision": str(cpu.dtype), "accuracy": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
