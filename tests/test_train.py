"""The training parts a run relies on, worked out by hand: the precision choice and the data fingerprint that
--resume checks."""
import pytest
import torch

import common
from conftest import write_cifar

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("capability, gpu, expected", [
    ((7, 0), "V100", torch.float16), ((7, 5), "T4", torch.float16), ((6, 1), "P40", torch.float16),
    ((8, 0), "A100", torch.bfloat16), ((8, 6), "RTX 3090", torch.bfloat16), ((9, 0), "H100", torch.bfloat16),
])
def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, gpu, expected):
    """torch says bf16 is supported on a T4 or V100 too (emulated, slow): auto must still choose fp16 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert common.resolve_precision("auto", CUDA) == expected, gpu


def test_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert common.resolve_precision("bf16", CUDA) == torch.bfloat16
    assert common.resolve_precision("fp32", CUDA) == torch.float32


def test_data_fingerprint_follows_the_content_not_the_folder(tmp_path):
    """The same files in another folder give the same fingerprint; other images, labels or split sizes do not."""
    def fingerprint(root, val_size=64):
        return common.data_fingerprint(common.split_train_val(common.load_cifar10(root, download=False), val_size, None))

    original = fingerprint(write_cifar(tmp_path / "a", per_batch=16, n_test=10))
    assert fingerprint(write_cifar(tmp_path / "moved" / "b", per_batch=16, n_test=10)) == original
    assert fingerprint(write_cifar(tmp_path / "c", per_batch=16, n_test=10, seed=1)) != original
    assert fingerprint(tmp_path / "a", val_size=32) != original
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    assert common.data_fingerprint([images, labels]) != common.data_fingerprint([images, torch.tensor([0, 1, 2, 4])])
