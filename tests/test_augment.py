"""Batched augmentation: each op does what its name says, per image, reproducibly."""
import torch
import torch.nn.functional as F

import common

ALL_OPS = {"augment": list(common.AUGMENT_OPS), "crop_pad": 4, "rotate_deg": 15.0, "jitter": 0.3, "gray_p": 0.5}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 32, seed: int = 0) -> torch.Tensor:
    """n random float images in [0, 1]: no image equals its own mirror or any shift of itself."""
    return torch.rand(n, 3, 32, 32, generator=gen(seed))


def copies(n: int = 16) -> torch.Tensor:
    """n copies of one image, so that any difference between outputs comes from per-image parameters."""
    return images(1).expand(n, -1, -1, -1).contiguous()


def distinct(outputs: torch.Tensor) -> int:
    """How many different images a batch holds."""
    return len({tuple(o.flatten().tolist()) for o in outputs})


def test_flip_mirrors_exactly_some_images():
    """Each output is its input or the input's exact left-right mirror, and both happen in one batch."""
    x = images()
    out = common.batch_flip_lr(x, 0.5, gen())
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)


def test_flip_probability_zero_and_one():
    x = images(8)
    assert torch.equal(common.batch_flip_lr(x, 0.0, gen()), x)
    assert torch.equal(common.batch_flip_lr(x, 1.0, gen()), x.flip(-1))


def test_crop_is_a_window_of_the_zero_padded_image():
    """Each output equals one 32x32 window of its zero-padded input, at offsets that vary across the batch."""
    x = images()
    out = common.batch_crop(x, 4, gen())
    padded = F.pad(x, (4, 4, 4, 4))
    offsets = []
    for o, p in zip(out, padded):
        found = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(o, p[:, dy:dy + 32, dx:dx + 32])]
        assert len(found) == 1
        offsets += found
    assert len(set(offsets)) > 1


def test_rotate_by_zero_degrees_is_identity():
    x = images(8)
    assert torch.allclose(common.batch_rotate(x, 0.0, gen()), x, atol=1e-5)


def test_rotate_keeps_the_centre_and_fills_corners_with_zeros():
    """A rotation turns about the centre: the middle stays, and 45 degree turns bring zeros into the corners."""
    x = torch.ones(8, 3, 32, 32)
    out = common.batch_rotate(x, 45.0, gen())
    assert torch.allclose(out[:, :, 14:18, 14:18], torch.ones(8, 3, 4, 4), atol=1e-5)
    assert (out[:, :, 0, 0] < 1).any()
    assert out.min() >= 0 and out.max() <= 1 + 1e-6


def test_jitter_of_strength_zero_is_identity():
    x = images(8)
    assert torch.allclose(common.batch_color_jitter(x, 0.0, gen()), x, atol=1e-5)


def test_jitter_stays_in_range():
    out = common.batch_color_jitter(images(), 0.5, gen())
    assert out.min() >= 0 and out.max() <= 1


def test_grayscale_p1_gives_equal_channels_p0_leaves_images():
    x = images(8)
    gray = common.batch_grayscale(x, 1.0, gen())
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(gray[:, 0], luma, atol=1e-5)
    assert torch.equal(common.batch_grayscale(x, 0.0, gen()), x)


def test_parameters_differ_between_images_of_one_batch():
    """Identical inputs come out different: every op draws its own parameters per image."""
    x = copies()
    assert distinct(common.batch_flip_lr(x, 0.5, gen())) == 2
    assert distinct(common.batch_crop(x, 4, gen())) > 1
    assert distinct(common.batch_rotate(x, 15.0, gen())) > 1
    assert distinct(common.batch_color_jitter(x, 0.3, gen())) > 1
    assert distinct(common.batch_grayscale(x, 0.5, gen())) == 2


def test_augment_batch_returns_float32_in_unit_range():
    x = (images() * 255).to(torch.uint8)
    original = x.clone()
    out = common.augment_batch(x, ALL_OPS, gen())
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, original)


def test_augment_batch_without_ops_only_rescales():
    x = (images() * 255).to(torch.uint8)
    out = common.augment_batch(x, {**ALL_OPS, "augment": []}, gen())
    assert torch.equal(out, x.float() / 255)


def test_augment_batch_keeps_each_image_in_its_place():
    """Images stay in batch order, so their labels still match: flip, crop and rotate keep each image's colour at the centre."""
    colours = torch.randint(0, 256, (32, 3), generator=gen())
    x = colours[:, :, None, None].expand(-1, -1, 32, 32).to(torch.uint8)
    out = common.augment_batch(x, {**ALL_OPS, "augment": ["flip", "crop", "rotate"]}, gen())
    assert torch.allclose(out[:, :, 16, 16], colours.float() / 255, atol=1e-4)


def test_same_seed_same_result_other_seed_other_result():
    x = (images() * 255).to(torch.uint8)
    first = common.augment_batch(x, ALL_OPS, gen(7))
    assert torch.equal(first, common.augment_batch(x, ALL_OPS, gen(7)))
    assert not torch.equal(first, common.augment_batch(x, ALL_OPS, gen(8)))


def test_rotate_folds_in_an_exact_mirror_and_a_crop_window():
    """With a negligible angle, the mirror batch_rotate folds in is exact and its shift is a padded-crop window."""
    x = images(16)
    assert torch.equal(common.batch_rotate(x, 1e-9, gen(), flip_p=1.0), x.flip(-1))
    out = common.batch_rotate(x, 1e-9, gen(1), pad=3)
    padded = F.pad(x, (3, 3, 3, 3))
    offsets = set()
    for i in range(len(x)):
        match = [(a, b) for a in range(7) for b in range(7) if torch.allclose(out[i], padded[i, :, a:a + 32, b:b + 32], atol=1e-5)]
        assert match, f"image {i} is no window of the padded image"
        offsets.add(match[0])
    assert len(offsets) > 1
