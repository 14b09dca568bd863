"""Training speed of Exercise 1's ConvNet on one device, measured in one run on the same images:

  1. model      the training loop without augmentation (common.train.train_one_epoch, --augment none): forward,
                backward and optimizer step on batches on the device
  2. loop       the project's training loop, augmentation included (common.train.train_one_epoch, ex1 default recipe)
  3. original   the original pipeline: PIL images through torchvision transforms in a DataLoader with one
                worker per core, fp32, NCHW, Adam (ex1's original recipe)
  4. aug        augmentation alone: batched (common.data.augment_batch) against PIL per image, original recipe's ops

With --inference CHECKPOINT it measures inference on the CPU instead: the checkpoint's network as PyTorch runs it
(eager, fp32) and as ONNX Runtime runs its --export in fp32 and int8, at batch 1 and 256, from uint8 test pictures
to probabilities, with the size of each model file (needs the optional packages of --export).

    python benchmarks/speed.py --data-dir data
    python benchmarks/speed.py --data-dir data --device cuda --json speed.json
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
import torch.nn as nn
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import ex1_convnet  # noqa: E402

TARGETS = {"loop_vs_model": 0.9, "loop_vs_original": 2.0, "aug_batched_vs_pil": 20.0}  # on a 2-core CPU


def recipe_settings(name: str, images: torch.Tensor) -> ex1_convnet.Settings:
    """Settings as the driver resolves them for `ex1_convnet.py --recipe name`, mean/std from `images`."""
    settings = common.cli.resolve_settings({}, ex1_convnet.RECIPES[name], ex1_convnet.Settings)
    mean, std = common.data.channel_mean_std(images)
    return dataclasses.replace(settings, mean=mean, std=std)


def original_transform() -> transforms.Compose:
    """The original pipeline's per-image augmentation."""
    return transforms.Compose([
        transforms.RandomHorizontalFlip(), transforms.RandomCrop(32, padding=3), transforms.RandomRotation(15),
        transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1),
        transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


class PilDataset(torch.utils.data.Dataset):
    """uint8 images (N, 3, 32, 32) handed out one by one as PIL images through `transform`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC for PIL
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, the device's queued work included."""
    common.device.synchronize(device)
    start = time.perf_counter()
    fn()
    common.device.synchronize(device)
    return time.perf_counter() - start


def new_training(settings: ex1_convnet.Settings, ctx: common.device.TrainContext, channels_last: bool = True
                 ) -> common.train.Training:
    """The network (seed 0) with its optimizer and gradient scaler, as a run of `settings` starts them."""
    torch.manual_seed(0)
    model = ex1_convnet.build_model(settings).to(ctx.device)
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    optimizer = common.train.make_optimizer(list(model.parameters()), settings.optimizer, settings.lr,
                                            settings.weight_decay)
    return common.train.Training(model, model, optimizer, common.device.make_scaler(ctx), [settings.lr])


def bench_loop(images, labels, settings, ctx, n_steps: int, warmup: int) -> float:
    """2 (1 with settings.augment []): images/s of common.train.train_one_epoch, set up as a run sets it up."""
    bs = settings["batch_size"]
    images, labels = images.to(ctx.device), labels.to(ctx.device)
    training = new_training(settings, ctx)
    plan = common.train.Plan(bs, n_steps, settings.epochs * n_steps, settings.lr_decay)
    if warmup:
        common.train.train_one_epoch(training, images, labels, settings, plan, 0, ctx, steps=warmup)
    return n_steps * bs / timed(lambda: common.train.train_one_epoch(training, images, labels, settings, plan, 1, ctx),
                                ctx.device)


def bench_original(images, labels, settings, device: torch.device, n_steps: int, warmup: int, workers: int) -> float:
    """3: images/s of the original pipeline: PIL transforms in DataLoader workers, fp32, NCHW, Adam."""
    bs = settings["batch_size"]
    training = new_training(settings, common.device.TrainContext(device, torch.float32), channels_last=False)
    dataset = PilDataset(images, labels, original_transform())

    def epoch(count: int):  # a fresh loader each time: worker start-up is part of an epoch
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(count * bs)), batch_size=bs,
                                             shuffle=True, num_workers=workers, drop_last=True)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(training.model(x), y)
            training.optimizer.zero_grad()
            loss.backward()
            training.optimizer.step()

    if warmup:
        epoch(warmup)
    return n_steps * bs / timed(lambda: epoch(n_steps), device)


def bench_augment(images, settings, device: torch.device, batch_size: int, warmup: int) -> tuple[float, float]:
    """4: images/s of the original recipe's augmentation (to normalised tensors), batched and PIL per image."""
    on_device = images.to(device)
    generator = torch.Generator(device).manual_seed(0)
    ops = common.data.augmentation(settings.augment, settings)

    def batched(n: int):
        for s in range(0, n, batch_size):
            x = common.data.augment_batch(on_device[s:s + batch_size], ops, generator)
            common.data.normalize(x, settings["mean"], settings["std"])

    pil_images = images.permute(0, 2, 3, 1).contiguous().numpy()
    transform = original_transform()

    def per_image(n: int):
        for i in range(n):
            transform(Image.fromarray(pil_images[i]))

    batched(warmup * batch_size)
    per_image(warmup * batch_size)
    n = len(images)
    return n / timed(lambda: batched(n), device), n / timed(lambda: per_image(n), torch.device("cpu"))


def images_per_s(run, pictures: torch.Tensor, batch_size: int, warmup: int) -> float:
    """Images/s of `run(batch)` over `pictures` in batches of `batch_size`, after `warmup` untimed batches."""
    batches = list(pictures.split(batch_size))
    for batch in batches[:warmup]:
        run(batch)
    return len(pictures) / timed(lambda: [run(batch) for batch in batches], torch.device("cpu"))


def bench_inference(checkpoint_path: Path, data: common.data.CifarData, single: int, batched: int) -> list[dict]:
    """5: per engine (PyTorch eager fp32, ONNX Runtime fp32 and int8) its model file's size and images/s at batch 1
    (`single` test pictures) and at batch 256 (`batched` of them)."""
    cpu = common.device.TrainContext(torch.device("cpu"), torch.float32)
    checkpoint, model = common.tasks.open_checkpoint("ex1_convnet.py", checkpoint_path, checkpoint_path.parent,
                                                     ex1_convnet.build_model, cpu)
    model.eval()
    saved = checkpoint["settings"]
    classifier = common.tasks.PicturesToProbabilities(model, saved["mean"], saved["std"])
    pictures = common.tasks.nhwc(data.test_images)
    _, ort = common.tasks.export_packages()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        fp32, int8 = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        common.tasks.export_onnx(classifier, fp32, {})
        common.tasks.quantize_int8(fp32, int8, common.tasks.nhwc(data.train_images[:common.tasks.CALIBRATION_IMAGES]))

        @torch.no_grad()
        def eager(batch):
            classifier(batch)

        engines = [("PyTorch eager fp32", checkpoint_path, eager)]
        for name, path in (("ONNX Runtime fp32", fp32), ("ONNX Runtime int8", int8)):
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            engines.append((name, path, lambda batch, session=session: session.run(None, {"images": batch.numpy()})))
        for name, path, run in engines:
            rows.append({"engine": name, "file_mb": path.stat().st_size / 1e6,
                         "batch1_img_s": images_per_s(run, pictures[:single], 1, 10),
                         "batch256_img_s": images_per_s(run, pictures[:batched], 256, 1)})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data",
                        help="folder holding cifar-10-batches-py/ (never downloaded; default: data)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="precision of measurements 1 and 2 (auto: as the training scripts choose); 3: fp32")
    parser.add_argument("--batch-size", type=int, help="batch size of measurements 1 and 2 (default: the ex1 default "
                                                       "recipe's, 256); 3 uses the original recipe's (200)")
    parser.add_argument("--images", type=int, help="training images each of measurements 1-3 uses, rounded down to "
                                                   "whole batches (default: 49,000 on CUDA, 4,096 elsewhere)")
    parser.add_argument("--aug-images", type=int, help="images measurement 4 augments (default: --images, at most "
                                                       "10,000)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each measurement (default: 5 on CUDA, 2 "
                                                   "elsewhere)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the original "
                        f"pipeline (default: one per core, {os.cpu_count()} here)")
    parser.add_argument("--inference", metavar="CHECKPOINT",
                        help="measure inference of this ex1 checkpoint instead (5: PyTorch eager, ONNX Runtime fp32 "
                             "and int8 on the CPU, batch 1 and 256)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def report_inference(args: argparse.Namespace, data: common.data.CifarData) -> int:
    """Measurement 5 as a table (and --json)."""
    single, batched = min(args.images or 500, len(data.test_images)), min(args.images or 2560, len(data.test_images))
    try:
        rows = bench_inference(Path(args.inference), data, single, batched)
    except common.files.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"inference on the CPU ({common.files.cpu_name()}, {torch.get_num_threads()} threads), uint8 test pictures "
          f"to probabilities: batch 1 over {single} pictures, batch 256 over {batched}")
    print(f"{'engine':<22}{'file MB':>9}{'batch 1 img/s':>15}{'batch 256 img/s':>17}")
    for row in rows:
        print(f"{row['engine']:<22}{row['file_mb']:>9.1f}{row['batch1_img_s']:>15.0f}{row['batch256_img_s']:>17.0f}")
    if args.json:
        common.files.save_json({"inference": rows, "checkpoint": args.inference, "cpu": common.files.cpu_name(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__}, Path(args.json))
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = common.device.resolve_device(args.device)
        ctx = common.device.TrainContext(device, common.device.resolve_precision(args.precision, device))
        data = common.data.load_cifar10(args.data_dir, download=False)
    except common.files.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.inference:
        return report_inference(args, data)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the driver does
    cuda = device.type == "cuda"
    n = min(args.images or (49_000 if cuda else 4_096), len(data.train_images))
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    images, labels = data.train_images[:n], data.train_labels[:n]
    ours = recipe_settings("default", images)
    original = recipe_settings("original", images)
    if args.batch_size:
        ours = dataclasses.replace(ours, batch_size=args.batch_size)
    bs, bs_orig = ours["batch_size"], original["batch_size"]
    if n < max(bs, bs_orig) or n < warmup * max(bs, bs_orig):
        print(f"error: --images {n} must hold at least one batch and the {warmup} warm-up steps "
              f"(batch sizes {bs} and {bs_orig})", file=sys.stderr)
        return 2
    n_aug = min(args.aug_images or min(n, 10_000), len(data.train_images))
    precision = common.device.precision_name(ctx.dtype)
    print(f"device {device}  precision {precision}  batch {bs} (original: {bs_orig}, fp32, {args.workers} workers)  "
          f"images {n // bs * bs} (original: {n // bs_orig * bs_orig}; augmentation: {n_aug})  warm-up {warmup} steps  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}", flush=True)

    results = {}
    for key, label, measure in [
        ("model_img_s", "1 training loop without augmentation",
         lambda: bench_loop(images, labels, dataclasses.replace(ours, augment=[]), ctx, n // bs, warmup)),
        ("loop_img_s", "2 training loop (train_one_epoch)",
         lambda: bench_loop(images, labels, ours, ctx, n // bs, warmup)),
        ("original_img_s", "3 original pipeline (PIL, DataLoader)",
         lambda: bench_original(images, labels, original, device, n // bs_orig, warmup, args.workers)),
    ]:
        results[key] = measure()
        print(f"{label:<40}{results[key]:>10.0f} images/s", flush=True)
    batched, pil = bench_augment(data.train_images[:n_aug], original, device, bs, warmup)
    results.update(aug_batched_img_s=batched, aug_pil_img_s=pil)
    print(f"{'4 augmentation batched (augment_batch)':<40}{batched:>10.0f} images/s")
    print(f"{'  augmentation PIL per image':<40}{pil:>10.0f} images/s")

    results.update(loop_vs_model=results["loop_img_s"] / results["model_img_s"],
                   loop_vs_original=results["loop_img_s"] / results["original_img_s"],
                   aug_batched_vs_pil=batched / pil)
    print(f"\n{'ratio':<40}{'value':>10}   target on a 2-core CPU")
    for key, label in [("loop_vs_model", "2/1 loop vs step alone"),
                       ("loop_vs_original", "2/3 loop vs original pipeline"),
                       ("aug_batched_vs_pil", "4 batched vs PIL augmentation")]:
        met = "met" if results[key] >= TARGETS[key] else "not met"
        print(f"{label:<40}{results[key]:>10.2f}   >= {TARGETS[key]:g} ({met})")
    if args.json:
        results.update(device=str(device), precision=precision, batch_size=bs, original_batch_size=bs_orig,
                       images=n // bs * bs, original_images=n // bs_orig * bs_orig, aug_images=n_aug,
                       warmup_steps=warmup, workers=args.workers, torch=torch.__version__,
                       threads=torch.get_num_threads(), cpu_count=os.cpu_count())
        common.files.save_json(results, Path(args.json))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
