"""--predict on image files of every kind, and test-time augmentation (--tta), with the session's run (conftest.ex1_run,
trained with --tta)."""
import csv
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import call, CLASS_NAMES, error_line
from PIL import Image

import common
import ex1_convnet
import ex2_transfer

KIND = "ex1_convnet.py"
CPU = ["--device", "cpu", "--precision", "fp32"]


def cifar_test_images(cifar_dir: Path) -> torch.Tensor:
    """The fixture's test images, (N, 3, 32, 32) uint8, as the evaluation path reads them."""
    return common.data.load_cifar10(cifar_dir, download=False).test_images


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black greyscale PNG of any size; it compresses to a few hundred KB even at 400M pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """PNG files over Pillow's decompression-bomb limits: one it refuses (> 2 * MAX_IMAGE_PIXELS), one it only
    warns about (> MAX_IMAGE_PIXELS), which --predict refuses too."""
    folder = tmp_path_factory.mktemp("bombs")
    side_error = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    side_warning = int((1.1 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    assert Image.MAX_IMAGE_PIXELS < side_warning ** 2 < 2 * Image.MAX_IMAGE_PIXELS < side_error ** 2
    return {"DecompressionBombError": write_blank_png(folder / "bomb.png", side_error, side_error),
            "DecompressionBombWarning": write_blank_png(folder / "big.png", side_warning, side_warning)}


# ----------------------------------------------------------------------------- test-time augmentation views

def test_tta_views_mirror_along_the_width_translate_with_zero_fill_and_predict_averages_their_softmax():
    x = torch.rand(2, 3, 8, 10)  # not square and random: a vertical mirror or a transpose cannot pass
    views = common.evaluation.tta_views(x)
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x)
    assert torch.equal(views[3], x.flip(-1)) and not torch.equal(views[3], x.flip(-2))
    for plain, view in ((x, views[1]), (x.flip(-1), views[4])):  # shifted by (+2, +2): content moves down-right
        assert torch.equal(view[..., 2:, 2:], plain[..., :-2, :-2])
        assert not view[..., :2, :].any() and not view[..., :, :2].any()
    for plain, view in ((x, views[2]), (x.flip(-1), views[5])):  # shifted by (-2, -2)
        assert torch.equal(view[..., :-2, :-2], plain[..., 2:, 2:])
        assert not view[..., -2:, :].any() and not view[..., :, -2:].any()
    torch.manual_seed(0)  # predict with tta averages the softmax of the views
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    settings = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    ctx = common.device.TrainContext(torch.device("cpu"), torch.float32)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    expected = torch.stack([model(common.data.normalize(v, settings["mean"], settings["std"])).softmax(1)
                            for v in common.evaluation.tta_views(images.float() / 255)]).mean(0)
    got = common.evaluation.predict(model, images, settings["mean"], settings["std"], ctx, tta=True).softmax(1)
    assert torch.allclose(got, expected, atol=1e-6)
    plain = common.evaluation.predict(model, images, settings["mean"], settings["std"], ctx).softmax(1)
    assert not torch.allclose(plain, expected, atol=1e-3)


def test_tta_and_predict_are_runtime_flags_that_resume_accepts():
    assert {"tta", "predict"} <= common.cli.RUNTIME_KEYS
    saved = dict(common.cli.resolve_settings({}, ex1_convnet.RECIPES["default"], ex1_convnet.Settings))
    assert common.train.resumed_settings(ex1_convnet.Settings(), {"tta": True, "predict": ["x.png"]},
                                         saved)["tta"] is True


# ----------------------------------------------------------------------------- reading image files

def test_the_shorter_side_is_resized_to_32_and_the_centre_cropped(tmp_path):
    wide = np.zeros((40, 120, 3), np.uint8)  # three 40x40 squares: red, green, blue
    wide[:, :40, 0] = wide[:, 40:80, 1] = wide[:, 80:, 2] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = common.data.load_image(tmp_path / "wide.png")
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    inside = image[:, :, 2:-2]  # the resampling filter reads a little past the square's edges
    assert (inside[1] >= 250).all() and (inside[[0, 2]] <= 5).all()  # only the green centre is left
    tall = np.random.default_rng(0).integers(0, 256, (100, 32, 3), dtype=np.uint8)  # shorter side 32: cropped only
    Image.fromarray(tall).save(tmp_path / "tall.png")
    assert torch.equal(common.data.load_image(tmp_path / "tall.png"), torch.from_numpy(tall[34:66]).permute(2, 0, 1))


def image_kinds(folder: Path) -> dict[Path, tuple | None]:
    """A picture in every format and mode --predict reads, written into `folder`: path -> (the pixels (32, 32, 3) it
    must decode to, the largest mean absolute error), or None where reading it is all. RGB pixels come back exactly;
    a grey image's grey in all three channels; transparency on white; EXIF's orientation applied; lossy formats and
    an image upscaled 8 times within a small error; a 1x1 image as a solid square; an animated GIF as its first
    frame."""
    rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    grey = np.repeat(np.asarray(base.convert("L"))[..., None], 3, 2)
    palette = base.convert("P")  # an adaptive palette: its own pixels are what it shows
    shown = np.asarray(palette.convert("RGB")).copy()
    transparent = palette.getpixel((0, 0))
    shown_on_white = shown.copy()
    shown_on_white[np.asarray(palette) == transparent] = 255
    assert (shown_on_white == 255).all(axis=2).any()  # the transparent entry is in use
    ramp = np.linspace(0, 255, 32)  # lossy codecs keep a smooth image close, not noise
    smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2,
                       np.add.outer(255 - ramp, ramp) / 2], 2).astype(np.uint8)
    photo = Image.fromarray(smooth)
    red = Image.new("RGB", (40, 40), "red")
    see_through = np.zeros((32, 32, 4), np.uint8)  # opaque red, transparent blue, half-transparent black
    see_through[:, :16], see_through[:, 16:24], see_through[:, 24:] = (255, 0, 0, 255), (0, 0, 255, 0), (0, 0, 0, 128)
    on_white = np.full((32, 32, 3), 255)
    on_white[:, :16], on_white[:, 24:] = (255, 0, 0), 127
    grey_on_white = on_white.copy()
    grey_on_white[:, :16] = 76  # red's luma
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees clockwise when shown: the stored image's left half on top
    stored, turned = np.zeros((32, 64, 3), np.uint8), np.zeros((32, 32, 3))
    stored[:, :32], turned[:16] = (255, 0, 0), (255, 0, 0)  # the turned image's centre: red above, black below
    cases = {  # name: (writer, expected pixels or None, largest mean absolute error)
        "rgb.png": (lambda p: base.save(p), rgb, 0), "bitmap.bmp": (lambda p: base.save(p), rgb, 0),
        "scan.tif": (lambda p: base.save(p), rgb, 0), "scan.tiff": (lambda p: base.save(p), rgb, 0),
        "lossless.webp": (lambda p: base.save(p, lossless=True), rgb, 0),
        "cmyk.tif": (lambda p: base.convert("CMYK").save(p), rgb, 0),
        "rgba.png": (lambda p: base.convert("RGBA").save(p), rgb, 0),
        "grey.png": (lambda p: base.convert("L").save(p), grey, 0),
        "la.png": (lambda p: base.convert("LA").save(p), grey, 0),
        "grey16.png": (lambda p: Image.fromarray(grey[..., 0].astype(np.uint16) * 257).save(p), grey, 0),  # I;16
        "grey32.tif": (lambda p: Image.fromarray(grey[..., 0].astype(np.int32) * 257).save(p), grey, 0),  # mode I
        "palette.png": (lambda p: palette.save(p), shown, 0),
        "palette_transparent.png": (lambda p: palette.save(p, transparency=transparent), shown_on_white, 0),
        "photo.webp": (lambda p: photo.save(p, quality=95), smooth, 4),
        "photo.jpg": (lambda p: photo.save(p, quality=95), smooth, 4),
        "upper.JPEG": (lambda p: photo.save(p, "JPEG", quality=95), smooth, 4),
        "cmyk.jpg": (lambda p: photo.convert("CMYK").save(p, quality=95), smooth, 4),
        "upscaled.png": (lambda p: photo.resize((256, 256), Image.Resampling.NEAREST).save(p), smooth, 4),
        "dot.png": (lambda p: Image.new("RGB", (1, 1), (10, 200, 30)).save(p), np.full((32, 32, 3), (10, 200, 30)), 0),
        "anim.gif": (lambda p: red.save(p, save_all=True, append_images=[Image.new("RGB", (40, 40), "blue")]),
                     np.full((32, 32, 3), (255, 0, 0)), 0),  # the first frame
        "transparent.png": (lambda p: Image.fromarray(see_through, "RGBA").save(p), on_white, 0.5),
        "transparent_la.png": (lambda p: Image.fromarray(see_through, "RGBA").convert("LA").save(p), grey_on_white,
                               0.5),
        "exif_turned.jpg": (lambda p: Image.fromarray(stored).save(p, exif=exif, quality=95), turned, 4),
        "wide.png": (lambda p: base.resize((90, 30)).save(p), None, 0),
    }
    kinds = {}
    for name, (write, pixels, tolerance) in cases.items():
        write(folder / name)
        kinds[folder / name] = None if pixels is None else (pixels, tolerance)
    return kinds


def test_every_image_kind_decodes_to_the_pixels_it_was_made_from(tmp_path):
    for path, expected in image_kinds(tmp_path).items():
        got = common.data.load_image(path)
        assert got.shape == (3, 32, 32) and got.dtype == torch.uint8, path.name
        if expected is not None:
            error = np.abs(got.permute(1, 2, 0).numpy().astype(float) - expected[0]).mean()
            assert error <= expected[1], (path.name, error)


# ----------------------------------------------------------------------------- the command line

def test_predict_and_eval_only_refuse_the_same_checkpoints_and_default_to_best_pt(tmp_path, cifar_dir, capsys,
                                                                                  monkeypatch):
    """--predict and --eval-only read best.pt of --out-dir by one rule (without it, that of the script's run folder),
    and refuse another script's checkpoint alike."""
    monkeypatch.chdir(tmp_path)
    to_pil(cifar_test_images(cifar_dir)[0]).save(tmp_path / "cat.png")
    torch.save({"kind": "ex2_transfer.py", "settings": {}, "model": {}}, tmp_path / "ex2.pt")
    for checkpoint, words in ((["--out-dir", "my-run"], "checkpoint my-run/best.pt does not exist"),
                              (["--checkpoint", "ex2.pt"], "a checkpoint of ex2_transfer.py, not of ex1_convnet.py")):
        errors = []
        for task in (["--predict", "cat.png"], ["--eval-only", "--data-dir", cifar_dir, "--no-download"]):
            code, _, err = call(ex1_convnet.main, [*task, *checkpoint, *CPU], capsys)
            assert code == 2 and words in error_line(err), err
            errors.append(error_line(err))
        assert errors[0] == errors[1]
    assert not (tmp_path / "predict").exists() and not (tmp_path / "eval").exists()
    for main, flags, expected in ((ex1_convnet.main, [], "runs/ex1/best.pt"),
                                  (ex2_transfer.main, [], "runs/ex2-pretrained/best.pt"),
                                  (ex2_transfer.main, ["--scratch"], "runs/ex2-scratch/best.pt")):
        code, _, err = call(main, ["--predict", "cat.png", *flags, *CPU], capsys)
        assert code == 2 and f"checkpoint {expected} does not exist" in error_line(err), err
    assert "train a run first (python ex2_transfer.py), or name a checkpoint with --checkpoint PATH" in error_line(err)
    # a missing path or an empty folder: exit 2 before the model loads
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    absent_checkpoint = tmp_path / "no-such-checkpoint.pt"
    for path, reason in ((tmp_path / "missing.jpg", "no such file or folder"),
                         (tmp_path / "empty", "a folder with no image file")):
        code, _, err = call(ex1_convnet.main, ["--predict", path, "--checkpoint", absent_checkpoint, *CPU], capsys)
        assert code == 2 and f"{path}: {reason}" in error_line(err), err
        assert str(absent_checkpoint) not in err


# ----------------------------------------------------------------------------- with a trained model

def test_the_final_test_reports_the_tta_accuracy_of_all_and_of_the_first_1000():
    """On 1,010 test images, with a network whose views disagree: test_accuracy_tta and test_accuracy_first1000_tta
    are the averaged views' accuracies on all and on the first 1,000, not the plain ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1010, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (1010,), generator=generator)
    mean, std = [0.5] * 3, [0.25] * 3
    ctx = common.device.TrainContext(torch.device("cpu"), torch.float32)
    metrics, _ = common.evaluation.test_results(model, images, labels, tuple(CLASS_NAMES), mean, std, ctx,
                                                tta=True)  # the figures metrics.json holds, by its names
    plain = common.evaluation.predict(model, images, mean, std, ctx).argmax(1)
    tta = common.evaluation.predict(model, images, mean, std, ctx, tta=True).argmax(1)
    assert (plain != tta).sum() > 100  # the views change many predictions
    for key, predicted in (("test_accuracy", plain), ("test_accuracy_first1000", plain[:1000]),
                           ("test_accuracy_tta", tta), ("test_accuracy_first1000_tta", tta[:1000])):
        assert metrics[key] == pytest.approx((predicted == labels[:len(predicted)]).float().mean().item()), key
    assert len({metrics["test_accuracy_tta"], metrics["test_accuracy_first1000_tta"], metrics["test_accuracy"],
                metrics["test_accuracy_first1000"]}) == 4  # four different figures, so no key can stand for another


@pytest.mark.slow
@pytest.mark.parametrize("tta", [False, True])
def test_png_files_predict_what_the_evaluation_path_predicts(ex1_run, cifar_dir, tmp_path, capsys, tta):
    images = cifar_test_images(cifar_dir)[:30]
    for i, image in enumerate(images):
        to_pil(image).save(tmp_path / f"test_{i:03d}.png")
    out = tmp_path / "out"
    code, stdout, err = call(ex1_convnet.main, ["--predict", tmp_path, "--checkpoint", ex1_run / "best.pt",
                                                "--out-dir", out, *CPU, *(["--tta"] if tta else [])], capsys)
    assert code == 0, err[-3000:]
    checkpoint = common.files.load_checkpoint(ex1_run / "best.pt", KIND)
    model, settings = ex1_convnet.build_model(checkpoint["settings"]), checkpoint["settings"]
    model.load_state_dict(checkpoint["model"])
    ctx = common.device.TrainContext(torch.device("cpu"), torch.float32)
    expected = common.evaluation.predict(model, images, settings["mean"], settings["std"], ctx, tta=tta).softmax(1)
    rows = json.loads((out / "predictions.json").read_text())
    assert [row["path"] for row in rows] == [str(tmp_path / f"test_{i:03d}.png") for i in range(len(images))]
    assert [row["label"] for row in rows] == [CLASS_NAMES[i] for i in expected.argmax(1).tolist()]
    got = torch.tensor([[top["probability"] for top in row["top3"]] for row in rows])
    assert torch.allclose(got, expected.topk(3, dim=1).values, atol=1e-5)
    assert all(row["probability"] == row["top3"][0]["probability"] for row in rows)
    assert "test_000.png" in stdout and f"{len(images)} predicted, 0 skipped" in stdout


@pytest.mark.slow
def test_every_image_kind_is_predicted_and_unreadable_files_are_skipped_with_exit_1(ex1_run, tmp_path, bombs, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = sorted(image_kinds(folder))
    (folder / "fake.jpg").write_text("not an image")
    (folder / "notes.md").write_text("not an image file name: left out")
    (folder / "sub").mkdir()
    shutil.copy(folder / "rgb.png", folder / "sub" / "inner.png")  # a subfolder: left out
    (folder / "truncated.png").write_bytes((folder / "rgb.png").read_bytes()[:-300])
    for path in bombs.values():
        shutil.copy(path, folder / path.name)
    (tmp_path / "notes.txt").write_text("named on the command line: tried, then skipped")
    shutil.copy(ex1_run / "best.pt", tmp_path / "best.pt")
    code, stdout, stderr = call(ex1_convnet.main, ["--predict", folder, tmp_path / "notes.txt", "--checkpoint",
                                                   tmp_path / "best.pt", *CPU], capsys)
    assert code == 1, stderr[-3000:]
    skipped = {line.split(": ", 1)[0].removeprefix("skipped "): line.split(": ", 1)[1]
               for line in stderr.splitlines() if line.startswith("skipped ")}
    assert skipped.keys() == {str(folder / "fake.jpg"), str(folder / "truncated.png"), str(folder / "bomb.png"),
                              str(folder / "big.png"), str(tmp_path / "notes.txt")}
    assert "cannot identify image file" in skipped[str(folder / "fake.jpg")]
    assert "truncated" in skipped[str(folder / "truncated.png")]
    assert skipped[str(folder / "bomb.png")].startswith("DecompressionBombError")
    assert skipped[str(folder / "big.png")].startswith("DecompressionBombWarning")
    assert f"{len(paths)} predicted, 5 skipped" in stdout
    out = tmp_path / "predict"  # the default: beside the checkpoint
    rows = json.loads((out / "predictions.json").read_text())
    assert [row["path"] for row in rows] == [str(p) for p in paths]
    for row in rows:
        assert row["label"] in CLASS_NAMES and len(row["top3"]) == 3 and 0 < row["probability"] <= 1
        assert row["path"] in stdout
    with open(out / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(common.tasks.PREDICTION_COLUMNS)
    assert [(r["path"], r["label"], float(r["probability"]), r["top3_label"]) for r in table] == \
           [(r["path"], r["label"], r["probability"], r["top3"][2]["label"]) for r in rows]
    with Image.open(out / "predictions.png") as preview:
        assert preview.format == "PNG" and min(preview.size) > 100
