"""Training speed of Exercise 1's ConvNet on one device, on the same images: (1) common.train.train_one_epoch without
augmentation, (2) the same loop with ex1's default recipe, (3) the original pipeline (PIL transforms in DataLoader
workers, fp32, NCHW, Adam) and (4) augmentation alone, batched (common.data.augment_batch) against PIL per image.
--inference CHECKPOINT measures inference on the CPU instead: PyTorch eager fp32 and the --export in ONNX Runtime
(fp32, int8), batch 1 and 256, uint8 pictures to probabilities, with each model file's size.

    python benchmarks/speed.py --data-dir data [--device cuda] [--json speed.json]
    python benchmarks/speed.py --data-dir data --inference runs/ex1/best.pt
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import ex1_convnet  # noqa: E402

CPU = torch.device("cpu")
RATIOS = {  # key: (label, numerator, denominator, target on a 2-core CPU)
    "loop_vs_model": ("2/1 loop vs step alone", "loop_img_s", "model_img_s", 0.9),
    "loop_vs_original": ("2/3 loop vs original pipeline", "loop_img_s", "original_img_s", 2.0),
    "aug_batched_vs_pil": ("4 batched vs PIL augmentation", "aug_batched_img_s", "aug_pil_img_s", 20.0)}
ORIGINAL_TRANSFORM = transforms.Compose([  # the original pipeline's per-image augmentation
    transforms.RandomHorizontalFlip(), transforms.RandomCrop(32, padding=3), transforms.RandomRotation(15),
    transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1),
    transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def recipe_settings(name: str, images: torch.Tensor, **flags) -> ex1_convnet.Settings:
    """Settings as the driver resolves them for `ex1_convnet.py --recipe name` with `flags`, mean/std from `images`."""
    mean, std = common.data.channel_mean_std(images)
    return common.cli.resolve_settings({**flags, "mean": mean, "std": std}, ex1_convnet.RECIPES[name],
                                       ex1_convnet.Settings)


def original_batch(pairs: list) -> list[torch.Tensor]:
    """The original pipeline's DataLoader batch: each uint8 image (32, 32, 3) through ORIGINAL_TRANSFORM as PIL."""
    return torch.utils.data.default_collate([(ORIGINAL_TRANSFORM(Image.fromarray(x.numpy())), y) for x, y in pairs])


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, the device's queued work included."""
    common.device.synchronize(device)
    start = time.perf_counter()
    fn()
    common.device.synchronize(device)
    return time.perf_counter() - start


def images_per_s(run, images: torch.Tensor, batch_size: int, warmup: int, device: torch.device = CPU) -> float:
    """Images/s of `run(batch)` over `images` in batches of `batch_size`, after `warmup` untimed batches."""
    batches = images.split(batch_size)
    for batch in batches[:warmup]:
        run(batch)
    return len(images) / timed(lambda: [run(batch) for batch in batches], device)


def bench_loop(images, labels, settings, ctx, warmup: int) -> float:
    """1 and 2 (1: settings.augment []): images/s of common.train.train_one_epoch, set up as a run sets it up."""
    training = common.train.set_up_training(settings, ex1_convnet.build_model, ctx)
    steps = len(images) // settings.batch_size
    plan = common.train.Plan(settings.batch_size, steps, settings.epochs * steps, settings.lr_decay)
    if warmup:
        common.train.train_one_epoch(training, images, labels, settings, plan, 0, ctx, steps=warmup)
    return common.train.train_one_epoch(training, images, labels, settings, plan, 1, ctx)["images_per_s"]


def bench_original(images, labels, settings, device: torch.device, warmup: int, workers: int) -> float:
    """3: images/s of the original pipeline: PIL transforms in DataLoader workers, fp32, NCHW, Adam."""
    bs, dataset = settings.batch_size, torch.utils.data.TensorDataset(common.tasks.nhwc(images), labels)
    training = common.train.set_up_training(settings, ex1_convnet.build_model,
                                            common.device.TrainContext(device, torch.float32))
    model = training.model.to(memory_format=torch.contiguous_format)

    def epoch(steps: int):  # a fresh loader each time: worker start-up is part of an epoch
        subset = torch.utils.data.Subset(dataset, range(steps * bs))
        for x, y in torch.utils.data.DataLoader(subset, batch_size=bs, shuffle=True, num_workers=workers,
                                                collate_fn=original_batch, drop_last=True):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            training.optimizer.zero_grad()
            loss.backward()
            training.optimizer.step()

    if warmup:
        epoch(warmup)
    steps = len(images) // bs
    return steps * bs / timed(lambda: epoch(steps), device)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (never downloaded; default: data)")
    add("--device", default="auto", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    add("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="of 1 and 2 (3: fp32)")
    add("--batch-size", type=int, help="of 1 and 2 (default: the default recipe's, 256; 3: the original's, 200)")
    add("--images", type=int, help="training images each of measurements 1-3 uses, rounded down to whole batches "
                                   "(default: 49,000 on CUDA, 4,096 elsewhere)")
    add("--aug-images", type=int, help="images measurement 4 augments (default: --images, at most 10,000)")
    add("--warmup", type=int, help="untimed steps before each measurement (default: 5 on CUDA, 2 elsewhere)")
    add("--workers", type=int, default=os.cpu_count(),
        help=f"DataLoader workers of the original pipeline (default: one per core, {os.cpu_count()} here)")
    add("--inference", metavar="CHECKPOINT", help="measure inference of this ex1 checkpoint instead (5: PyTorch eager, "
                                                   "ONNX Runtime fp32 and int8 on the CPU, batch 1 and 256)")
    add("--json", metavar="FILE", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def report_inference(args: argparse.Namespace, data: common.data.CifarData) -> dict:
    """5 as a table: per engine (PyTorch eager fp32, ONNX Runtime fp32 and int8) its model file's size and images/s
    at batch 1 and at batch 256; returns the figures --json writes."""
    single, batched = min(args.images or 500, len(data.test_images)), min(args.images or 2560, len(data.test_images))
    checkpoint_path, cpu = Path(args.inference), common.device.TrainContext(CPU, torch.float32)
    checkpoint, model = common.tasks.open_checkpoint("ex1_convnet.py", checkpoint_path, ex1_convnet.build_model, cpu)
    classifier = common.tasks.PicturesToProbabilities(model.eval(), checkpoint["settings"]["mean"],
                                                      checkpoint["settings"]["std"])
    pictures = common.tasks.nhwc(data.test_images)
    _, ort = common.tasks.export_packages()
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        fp32, int8 = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        common.tasks.export_onnx(classifier, fp32, {})
        common.tasks.quantize_int8(fp32, int8, common.tasks.nhwc(data.train_images[:common.tasks.CALIBRATION_IMAGES]))
        engines = [("PyTorch eager fp32", checkpoint_path, classifier)]
        for name, path in (("ONNX Runtime fp32", fp32), ("ONNX Runtime int8", int8)):
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            engines.append((name, path, lambda batch, session=session: session.run(None, {"images": batch.numpy()})))
        rows = [{"engine": name, "file_mb": path.stat().st_size / 1e6,
                 "batch1_img_s": images_per_s(run, pictures[:single], 1, 10),
                 "batch256_img_s": images_per_s(run, pictures[:batched], 256, 1)} for name, path, run in engines]
    print(f"inference on the CPU ({common.files.cpu_name()}, {torch.get_num_threads()} threads), uint8 test pictures "
          f"to probabilities: batch 1 over {single} pictures, batch 256 over {batched}")
    print(f"{'engine':<22}{'file MB':>9}{'batch 1 img/s':>15}{'batch 256 img/s':>17}")
    for row in rows:
        print(f"{row['engine']:<22}{row['file_mb']:>9.1f}{row['batch1_img_s']:>15.0f}{row['batch256_img_s']:>17.0f}")
    return {"inference": rows, "checkpoint": args.inference, "cpu": common.files.cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def report_training(args: argparse.Namespace, ctx: common.device.TrainContext, data: common.data.CifarData) -> dict:
    """Measurements 1-4 and their ratios as a table; returns the figures --json writes."""
    cuda = ctx.device.type == "cuda"
    n = min(args.images or (49_000 if cuda else 4_096), len(data.train_images))
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    images, labels = data.train_images[:n], data.train_labels[:n]
    ours = recipe_settings("default", images, **({"batch_size": args.batch_size} if args.batch_size else {}))
    original = recipe_settings("original", images)
    bs, bs_orig = ours.batch_size, original.batch_size
    if n < max(1, warmup) * max(bs, bs_orig):
        raise common.files.UsageError(f"--images {n} must hold at least one batch and the {warmup} warm-up steps "
                                      f"(batch sizes {bs} and {bs_orig})")
    n_aug = min(args.aug_images or min(n, 10_000), len(data.train_images))
    precision = common.device.precision_name(ctx.dtype)
    print(f"device {ctx.device}  precision {precision}  batch {bs} (original: {bs_orig}, fp32, {args.workers} workers)"
          f"  images {n // bs * bs} (original: {n // bs_orig * bs_orig}; augmentation: {n_aug})  warm-up {warmup} "
          f"steps  torch {torch.__version__}  threads {torch.get_num_threads()}", flush=True)

    on_device = images.to(ctx.device), labels.to(ctx.device)
    ops, generator = common.data.augmentation(original.augment, original), torch.Generator(ctx.device).manual_seed(0)
    aug = data.train_images[:n_aug]

    def augment(batch):  # 4, batched: the original recipe's ops on the device, to normalised tensors
        common.data.normalize(common.data.augment_batch(batch, ops, generator), original.mean, original.std)

    results = {}
    for key, label, measure in [
        ("model_img_s", "1 training loop without augmentation",
         lambda: bench_loop(*on_device, dataclasses.replace(ours, augment=[]), ctx, warmup)),
        ("loop_img_s", "2 training loop (train_one_epoch)", lambda: bench_loop(*on_device, ours, ctx, warmup)),
        ("original_img_s", "3 original pipeline (PIL, DataLoader)",
         lambda: bench_original(images, labels, original, ctx.device, warmup, args.workers)),
        ("aug_batched_img_s", "4 augmentation batched (augment_batch)",
         lambda: images_per_s(augment, aug.to(ctx.device), bs, warmup, ctx.device)),
        ("aug_pil_img_s", "  augmentation PIL per image",
         lambda: images_per_s(lambda x: ORIGINAL_TRANSFORM(Image.fromarray(x[0].numpy())), common.tasks.nhwc(aug),
                              1, warmup * bs)),
    ]:
        results[key] = measure()
        print(f"{label:<40}{results[key]:>10.0f} images/s", flush=True)

    print(f"\n{'ratio':<40}{'value':>10}   target on a 2-core CPU")
    for key, (label, numerator, denominator, target) in RATIOS.items():
        results[key] = results[numerator] / results[denominator]
        print(f"{label:<40}{results[key]:>10.2f}   >= {target:g} ({'met' if results[key] >= target else 'not met'})")
    return {**results, "device": str(ctx.device), "precision": precision, "batch_size": bs,
            "original_batch_size": bs_orig, "images": n // bs * bs, "original_images": n // bs_orig * bs_orig,
            "aug_images": n_aug, "warmup_steps": warmup, "workers": args.workers, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = common.device.resolve_device(args.device)
        ctx = common.device.TrainContext(device, common.device.resolve_precision(args.precision, device))
        data = common.data.load_cifar10(args.data_dir, download=False)
        torch.backends.cudnn.benchmark = device.type == "cuda"  # as the training scripts do
        figures = report_inference(args, data) if args.inference else report_training(args, ctx, data)
    except common.files.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        common.files.save_json(figures, Path(args.json))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
