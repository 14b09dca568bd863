"""The corruption benchmark: deterministic corruptions, their strengths, and the accuracies computed from them."""
import json

import pytest
import torch
from conftest import call

import ex1_convnet
from common import evaluation as corruptions
from common.evaluation import corrupt, corruption_accuracies, CORRUPTIONS


def textured_images(n: int, seed: int = 0, side: int = 32) -> torch.Tensor:
    """n uint8 images (n, 3, side, side): smooth colour regions with some fine texture, as photographs have."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(side, side), mode="bilinear")
    fine = torch.rand(n, 1, side, side, generator=g) - 0.5
    return ((coarse * 0.7 + 0.15 + fine * 0.15) * 255).round().clamp(0, 255).to(torch.uint8)


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


IMAGES = textured_images(12)
EVERY = [(name, severity) for name, severities in CORRUPTIONS.items() for severity in severities]


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_is_deterministic_keeps_type_and_shape_holds_for_a_prefix_and_damages_more_with_the_severity(name):
    damage = []
    for severity in CORRUPTIONS[name]:
        out = corrupt(IMAGES, name, severity, seed=3)
        assert out.dtype == torch.uint8 and out.shape == IMAGES.shape
        assert torch.equal(out, corrupt(IMAGES.clone(), name, severity, seed=3))
        assert torch.equal(out[:5], corrupt(IMAGES[:5], name, severity, seed=3))
        damage.append(mean_abs_diff(out, IMAGES))
    assert len(damage) >= 2 and 0 < damage[0] and all(a < b for a, b in zip(damage, damage[1:], strict=False)), damage


def test_noise_depends_on_the_seed_holds_for_a_prefix_of_any_image_size_and_has_its_sigma_in_pixel_units():
    assert not torch.equal(corrupt(IMAGES, "gaussian_noise", 8, seed=0), corrupt(IMAGES, "gaussian_noise", 8, seed=1))
    odd = textured_images(9, side=5)  # 75 values an image: not a multiple of torch's 16 normal values at a time
    whole = corruptions.gaussian_noise(odd, 8, torch.Generator().manual_seed(0))
    for k in (1, 4, 8):
        assert torch.equal(whole[:k], corruptions.gaussian_noise(odd[:k], 8, torch.Generator().manual_seed(0)))
    grey = torch.full((20, 3, 32, 32), 128, dtype=torch.uint8)
    for sigma, tolerance in ((8, 0.02), (2, 0.03)):  # at 2 too: rounded, not truncated towards 0
        difference = corruptions.gaussian_noise(grey, sigma, torch.Generator().manual_seed(0)).float() - 128
        assert abs(difference.mean().item()) < 0.1 and difference.std().item() == pytest.approx(sigma, rel=tolerance)


def test_zero_strengths_leave_the_images_as_they_are_and_the_others_compute_exact_pixels():
    """Shift moves right and down and mirrors the border in; brightness and contrast round to the nearest level."""
    assert torch.equal(corruptions.gaussian_noise(IMAGES, 0, torch.Generator().manual_seed(0)), IMAGES)
    assert torch.equal(corruptions.shift(IMAGES, 0), IMAGES)
    assert torch.equal(corruptions.contrast(IMAGES, 1.0), IMAGES)
    assert torch.equal(corruptions.brightness(IMAGES, 1.0), IMAGES)
    assert torch.equal(corruptions.downscale(IMAGES, 32), IMAGES)
    assert mean_abs_diff(corruptions.jpeg(IMAGES, 100), IMAGES) < 1.5  # JPEG halves colour resolution at any quality
    reflected = corruptions.shift(IMAGES, 2)
    assert torch.equal(reflected[..., 2:, 2:], IMAGES[..., :-2, :-2])
    assert torch.equal(reflected[..., 2:, 0], IMAGES[..., :-2, 2])  # column -2 mirrors column 2 across column 0
    image = torch.full((1, 3, 4, 4), 102, dtype=torch.uint8)
    assert corruptions.brightness(image, 1.3).unique().tolist() == [133]  # 132.6; torchvision's uint8 path truncates
    assert corruptions.brightness(image, 3.0).unique().tolist() == [255]
    image[..., :2, :] = 202  # mean grey 152 (151.98)
    assert corruptions.contrast(image, 0.5).unique().tolist() == [127, 177]  # 126.99 and 176.99


def test_corrupt_refuses_unknown_names_severities_and_other_images_and_accuracies_check_the_classifier(capsys):
    code, _, err = call(ex1_convnet.main, ["--corruptions", "-1"], capsys)
    assert code == 2 and "--corruptions: must be 0 or more (got -1)" in err
    with pytest.raises(ValueError, match="shape"):
        corruption_accuracies(lambda batch: torch.zeros(3, dtype=torch.long), IMAGES[:4], torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(IMAGES, "fog", 1, seed=0)
    with pytest.raises(ValueError, match="jpeg has no severity 10"):
        corrupt(IMAGES, "jpeg", 10, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(IMAGES.float(), "shift", 1, seed=0)


def test_accuracies_and_drops_come_from_the_same_images():
    """A classifier that knows every batch corruption_accuracies can show it (any other: KeyError): right on the clean
    images, wrong on the first j images of the j-th corrupted batch in the table's order."""
    images, labels = textured_images(20, seed=1), torch.arange(20) % 10
    answers = {images.numpy().tobytes(): labels.clone()}
    for j, (name, severity) in enumerate(EVERY, 1):
        predictions = labels.clone()
        predictions[:j] = (labels[:j] + 1) % 10
        answers[corrupt(images, name, severity, seed=5).numpy().tobytes()] = predictions
    assert len(answers) == len(EVERY) + 1  # no two batches alike
    record = corruption_accuracies(lambda batch: answers[batch.numpy().tobytes()], images, labels, seed=5)
    n, k = 20, len(EVERY)
    assert {"gaussian_noise", "jpeg", "gaussian_blur", "contrast", "brightness", "shift",
            "downscale"} <= set(CORRUPTIONS)
    assert record["images"] == n and record["seed"] == 5 and record["clean_accuracy"] == 1.0
    assert [(r["corruption"], r["severity"]) for r in record["results"]] == EVERY
    for j, result in enumerate(record["results"], 1):
        assert result["accuracy"] == (n - j) / n and result["drop"] == j / n
        assert result["level"] == CORRUPTIONS[result["corruption"]].index(result["severity"]) + 1
    assert record["mean_accuracy"] == pytest.approx(sum(n - j for j in range(1, k + 1)) / (n * k), abs=1e-12)
    assert record["mean_drop"] == pytest.approx(1 - record["mean_accuracy"], abs=1e-12)
    assert record["worst"] == record["results"][-1]
    assert all(type(r["accuracy"]) is float and type(r["drop"]) is float for r in record["results"])
    assert json.loads(json.dumps(record)) == record


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_corrupt_gives_the_same_on_the_gpu():
    for name, severity in EVERY:
        out = corrupt(IMAGES.cuda(), name, severity, seed=0)
        assert out.device.type == "cuda" and torch.equal(out.cpu(), corrupt(IMAGES, name, severity, seed=0))
