"""Batched augmentation: each op does what its name says, per image, reproducibly."""
import pytest
import torch
import torch.nn.functional as F

import common

ALL_OPS = {"flip": 0.5, "crop": 4, "rotate": 15.0, "jitter": 0.3, "gray": 0.5}  # every op, as augmentation() gives them


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 32, seed: int = 0) -> torch.Tensor:
    """n random float images in [0, 1]: no image equals its own mirror or any shift of itself."""
    return torch.rand(n, 3, 32, 32, generator=gen(seed))


def luma(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel luma (N, H, W) of RGB images, with the weights of batch_grayscale."""
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def test_flip_mirrors_exactly_some_images_and_grayscale_makes_luma():
    """Each output is its input or the input's exact left-right mirror, and both happen in one batch; p 1 flips all,
    as does the mirror batch_rotate folds in. Grayscale p 1 gives three equal channels of luma."""
    x = images()
    out = common.data.batch_flip_lr(x, 0.5, gen())
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=False)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=False)]
    assert all(s or m for s, m in zip(same, mirrored, strict=False)) and any(same) and any(mirrored)
    assert torch.equal(common.data.batch_flip_lr(x, 1.0, gen()), x.flip(-1))
    assert torch.equal(common.data.batch_rotate(x, 1e-9, gen(), flip_p=1.0), x.flip(-1))  # the mirror rotate folds in
    gray = common.data.batch_grayscale(x, 1.0, gen())
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert torch.allclose(gray[:, 0], luma(x), atol=1e-5)


@pytest.mark.parametrize("fill, shifted", [
    ("zeros", lambda x: common.data.batch_crop(x, 4, gen())),
    ("reflect", lambda x: common.data.batch_crop(x, 4, gen(), fill="reflect")),
    ("zeros", lambda x: common.data.batch_rotate(x, 1e-9, gen(), pad=4))], ids=["crop", "crop-reflect", "rotate"])
def test_crop_and_the_shift_a_rotation_folds_in_give_a_window_of_the_padded_image(fill, shifted):
    """Each output equals one 32x32 window of its input padded with zeros, or by mirroring (no zeros come in), at
    offsets that vary across the batch."""
    x = images()
    out = shifted(x)
    padded = F.pad(x, (4, 4, 4, 4), mode="constant" if fill == "zeros" else fill)
    offsets = []
    for o, p in zip(out, padded, strict=False):
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.allclose(o, p[:, dy:dy + 32, dx:dx + 32], atol=1e-5)]
        assert len(found) == 1 or fill == "reflect" and found
        offsets += found
    assert len(set(offsets)) > 1 and (out.min() > 0) == (fill == "reflect")  # random images hold no exact zero


def test_rotate_and_crop_with_reflect_fill_bring_in_no_zeros():
    """Where zeros fill darkens the corners a turn and shift uncover, reflect fill keeps a white image white, as
    augment_batch hands the fill to batch_rotate (test_a_training_step_crops_with_its_fill: to batch_crop)."""
    x = torch.full((8, 3, 32, 32), 255, dtype=torch.uint8)
    assert common.data.augment_batch(x, {"rotate": 45.0, "crop": 4}, gen()).min() < 0.5
    assert common.data.augment_batch(x, {"rotate": 45.0, "crop": 4}, gen(), fill="reflect").min() > 0.99


def test_each_op_of_strength_zero_is_identity_and_grayscale_draws_per_image():
    """(The other ops' parameters vary across a batch: the flip, window, angle and jitter tests.)"""
    x = images()
    assert torch.equal(common.data.batch_flip_lr(x, 0.0, gen()), x)
    assert torch.equal(common.data.batch_grayscale(x, 0.0, gen()), x)
    assert torch.allclose(common.data.batch_rotate(x, 0.0, gen()), x, atol=1e-5)
    assert torch.allclose(common.data.batch_color_jitter(x, 0.0, gen()), x, atol=1e-5)
    grey = [torch.equal(o[0], o[1]) for o in common.data.batch_grayscale(x, 0.5, gen())]
    assert any(grey) and not all(grey)


def test_augment_batch_returns_float32_in_unit_range_reproducibly_each_image_in_its_place():
    """Every op: float32 in [0, 1], the input untouched, the same seed the same result; no op: only rescaled. Images
    stay in batch order (their labels still match): flip, crop and rotate keep each image's colour at the centre."""
    x = (images() * 255).to(torch.uint8)
    original = x.clone()
    out = common.data.augment_batch(x, ALL_OPS, gen(7))
    assert out.dtype == torch.float32 and out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, original)
    assert torch.equal(out, common.data.augment_batch(x, ALL_OPS, gen(7)))
    assert not torch.equal(out, common.data.augment_batch(x, ALL_OPS, gen(8)))
    assert torch.equal(common.data.augment_batch(x, {}, gen()), x.float() / 255)
    colours = torch.randint(0, 256, (32, 3), generator=gen())
    x = colours[:, :, None, None].expand(-1, -1, 32, 32).to(torch.uint8)
    out = common.data.augment_batch(x, {op: ALL_OPS[op] for op in ("flip", "crop", "rotate")}, gen())
    assert torch.allclose(out[:, :, 16, 16], colours.float() / 255, atol=1e-4)


def test_jitter_scales_brightness_stretches_contrast_and_changes_colour_but_not_luma():
    """One seed draws the same factors whatever the images: flat grey is multiplied by the brightness b, detail becomes
    b * (c * (x - mean) + mean); on colour images so does the luma while the colours change; grey stays grey."""
    n, s = 64, 0.3
    brightness = common.data.batch_color_jitter(torch.full((n, 3, 32, 32), 0.5), s, gen(3))[:, 0].mean((1, 2)) / 0.5
    assert ((1 - s - 1e-5 <= brightness) & (brightness <= 1 + s + 1e-5)).all()
    assert (brightness < 0.95).any() and (brightness > 1.05).any()  # darker and brighter images both occur

    detail = (0.4 + 0.2 * torch.rand(n, 1, 32, 32, generator=gen(4))).expand(-1, 3, -1, -1)
    out = common.data.batch_color_jitter(detail, s, gen(3))[:, 0]
    x = detail[:, 0]
    mean = x.mean((1, 2), keepdim=True)
    contrast = ((out - out.mean((1, 2), keepdim=True)) / (x - mean)).median(-1).values.median(-1).values / brightness
    assert ((1 - s - 1e-4 <= contrast) & (contrast <= 1 + s + 1e-4)).all()
    assert (contrast < 0.95).any() and (contrast > 1.05).any()
    b, c = brightness[:, None, None], contrast[:, None, None]
    assert torch.allclose(out, b * (c * (x - mean) + mean), atol=1e-4)

    x = 0.4 + 0.2 * torch.rand(n, 3, 32, 32, generator=gen(6))
    out = common.data.batch_color_jitter(x, s, gen(3))
    y_in, y_out = luma(x), luma(out)
    mean = y_in.mean((1, 2), keepdim=True)
    assert torch.allclose(y_out, b * (c * (y_in - mean) + mean), atol=1e-4)
    chroma_in, chroma_out = x - y_in[:, None], out - y_out[:, None]  # colour apart from brightness
    unchanged = torch.isclose(chroma_out, chroma_in * (b * c)[:, None], atol=1e-3)
    assert not unchanged.flatten(1).all(1).any()
    level = 0.3 + 0.4 * torch.rand(32, 1, 32, 32, generator=gen(1))
    out = common.data.batch_color_jitter(level.expand(-1, 3, -1, -1), 0.5, gen())
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_rotation_angle_stays_within_the_chosen_degrees():
    """A marker 11 px right of the centre stays 11 px away, turned by at most max_degrees, to both sides in a batch."""
    n, max_degrees = 64, 15.0
    x = torch.zeros(n, 1, 32, 32)
    x[:, :, 15:17, 26:28] = 1.0  # centred at (15.5, 26.5): the image centre is (15.5, 15.5)
    out = common.data.batch_rotate(x, max_degrees, gen())[:, 0]
    weights = out.flatten(1) / out.flatten(1).sum(1, keepdim=True)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    dy, dx = (weights @ ys.flatten()) - 15.5, (weights @ xs.flatten()) - 15.5
    angle = torch.rad2deg(torch.atan2(dy, dx))
    assert torch.allclose(torch.hypot(dx, dy), torch.full((n,), 11.0), atol=0.3)
    assert angle.abs().max() <= max_degrees + 0.5
    assert angle.max() > max_degrees / 2 and angle.min() < -max_degrees / 2


@pytest.mark.parametrize("fill", common.data.FILLS)
def test_a_training_step_crops_with_its_fill(fill):
    """train_one_epoch hands the settings' fill to the augmentation: white pictures cropped with reflect fill reach
    the network white, with zeros fill with black borders."""
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].min().item()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training = common.train.Training(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), [0.1])
    settings = common.cli.Settings(augment=["crop"], crop_pad=4, crop_fill=fill, mean=[0.0] * 3, std=[1.0] * 3)
    images = torch.full((16, 3, 32, 32), 255, dtype=torch.uint8)
    common.train.train_one_epoch(training, images, torch.zeros(16, dtype=torch.long), settings,
                                 common.train.Plan(batch_size=8, steps_per_epoch=2, total_steps=2), 1,
                                 common.device.TrainContext(torch.device("cpu"), torch.float32))
    assert len(seen) == 2
    assert (min(seen) == 1.0) == (fill == "reflect")
