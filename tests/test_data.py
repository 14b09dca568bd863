"""Loading CIFAR-10: both folder levels, both key styles, refused and broken files (also through the scripts, fresh and
under --resume), the train/validation split."""
import os
import pickle
import pickletools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call, CLASS_NAMES, error_line, make_images, QUICK, write_cifar

import common
import ex1_convnet

BATCHES = "cifar-10-batches-py"


def raw_batch(path: Path) -> dict:
    """A batch file of the fixture as written (plain pickle: these are our own files)."""
    with open(path, "rb") as f:
        return pickle.load(f)


def rewrite_batch(path: Path, **changes) -> None:
    """Replace some entries of one batch file of the fixture."""
    record = {**raw_batch(path), **changes}
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=4)


class CreatesFile:
    """A pickle payload that creates `path` when a plain unpickler loads it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_loads_from_either_folder_the_files_rows_as_they_are_and_splits_off_validation_from_the_end(cifar_dir):
    """--data-dir may name the folder holding cifar-10-batches-py/ or that folder itself; both give the same data."""
    outer = common.data.load_cifar10(cifar_dir, download=False)
    inner = common.data.load_cifar10(cifar_dir / BATCHES, download=False)
    for a, b in zip(outer[:4], inner[:4], strict=False):
        assert torch.equal(a, b)
    assert outer.classes == inner.classes == tuple(CLASS_NAMES)
    data = outer  # images (N, 3, 32, 32) uint8 in batch order 1..5, labels int64 in 0..9, matching the files' rows
    for images, labels, n in ((data.train_images, data.train_labels, 320), (data.test_images, data.test_labels, 120)):
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
    assert set(data.train_labels.tolist()) == set(range(10))
    second = raw_batch(cifar_dir / BATCHES / "data_batch_2")
    assert np.array_equal(data.train_images[64:128].numpy(), second["data"].reshape(64, 3, 32, 32))
    assert data.train_labels[64:128].tolist() == second["labels"]
    test = raw_batch(cifar_dir / BATCHES / "test_batch")
    assert np.array_equal(data.test_images.numpy(), test["data"].reshape(120, 3, 32, 32))
    assert data.test_labels.tolist() == test["labels"]
    # training = the first N - val_size images, validation = the last val_size; --limit-train N keeps the first N
    for limit, kept in ((None, 256), (100, 100), (1000, 256)):
        train_x, train_y, val_x, val_y = common.data.split_train_val(data, 64, limit)
        assert torch.equal(train_x, data.train_images[:kept]) and torch.equal(train_y, data.train_labels[:kept])
        assert torch.equal(val_x, data.train_images[256:]) and torch.equal(val_y, data.train_labels[256:])


def python2_pickle(obj) -> bytes:
    """`obj` (what a CIFAR-10 batch holds) pickled as Python 2's cPickle and numpy 1 wrote the official files, which
    Python 3 cannot: byte strings as (SHORT_)BINSTRING, arrays by `numpy.core.multiarray _reconstruct`."""
    def dump(value) -> bytes:
        if isinstance(value, dict):
            return b"}(" + b"".join(dump(k) + dump(v) for k, v in value.items()) + b"u"
        if isinstance(value, list):
            return b"](" + b"".join(dump(v) for v in value) + b"e"
        if isinstance(value, bytes):
            if len(value) < 256:
                return b"U" + bytes([len(value)]) + value
            return b"T" + len(value).to_bytes(4, "little") + value
        if isinstance(value, int) and 0 <= value < 256:
            return b"K" + bytes([value])
        if isinstance(value, int) and 0 <= value < 65536:
            return b"M" + value.to_bytes(2, "little")
        if isinstance(value, np.ndarray) and value.dtype == np.uint8:
            shape = b"(" + b"".join(dump(d) for d in value.shape) + b"t"
            dtype = b"cnumpy\ndtype\n" + dump(b"u1") + b"K\x00K\x01\x87R" \
                    + b"(K\x03" + dump(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + dump(b"b") + b"\x87R"
                    + b"(K\x01" + shape + dtype + b"\x89" + dump(value.tobytes()) + b"tb")
        raise TypeError(f"no Python 2 form for {type(value).__name__} here")

    return b"\x80\x02" + dump(obj) + b"."


def test_reads_the_official_python2_pickles(tmp_path):
    """Protocol 2, byte-string keys and values, numpy.core names: the form of the files users download."""
    rng = np.random.default_rng(7)
    (tmp_path / BATCHES).mkdir()
    records = {}
    for name, n, label in [(f"data_batch_{i}", 20, f"training batch {i} of 5") for i in range(1, 6)] \
            + [("test_batch", 10, "testing batch 1 of 1")]:
        data, labels = make_images(n, rng)
        records[name] = {b"batch_label": label.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{name}_{j}.png".encode() for j in range(n)]}
    records["batches.meta"] = {b"num_cases_per_batch": 20, b"label_names": [c.encode() for c in CLASS_NAMES],
                               b"num_vis": 3072}
    for name, record in records.items():
        (tmp_path / BATCHES / name).write_bytes(python2_pickle(record))
    stream = (tmp_path / BATCHES / "data_batch_1").read_bytes()
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]
    assert ops[0] == ("PROTO", 2)
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops and ("GLOBAL", "numpy dtype") in ops
    assert {"SHORT_BINSTRING", "BINSTRING"} <= {name for name, _ in ops}
    assert ("SHORT_BINSTRING", "training batch 1 of 5") in ops  # a byte-string value, not only keys
    data = common.data.load_cifar10(tmp_path, download=False)
    train = [records[f"data_batch_{i}"] for i in range(1, 6)]
    assert np.array_equal(data.train_images.numpy(), np.concatenate([r[b"data"] for r in train]).reshape(-1, 3, 32, 32))
    assert data.train_labels.tolist() == sum((r[b"labels"] for r in train), [])
    assert np.array_equal(data.test_images.numpy(), records["test_batch"][b"data"].reshape(-1, 3, 32, 32))
    assert data.test_labels.tolist() == records["test_batch"][b"labels"]
    assert data.classes == tuple(CLASS_NAMES)


@pytest.mark.slow
def test_data_errors_exit_2_with_one_line_naming_the_folder_fresh_and_under_resume(ex1_run, tmp_path, capsys):
    faults = {"missing": (lambda f: (f / "data_batch_5").unlink(), "CIFAR-10 not found"),
              "truncated": (lambda f: (f / "data_batch_3").write_bytes((f / "data_batch_3").read_bytes()[:5000]),
                            "data_batch_3: not a CIFAR-10 batch file (pickle data was truncated)"),
              "malicious": (lambda f: (f / "data_batch_1").write_bytes(
                  pickle.dumps({"data": CreatesFile(tmp_path / "PWNED")})), "refusing to load global")}
    unfinished = tmp_path / "unfinished"  # the session run's last.pt alone: a run to resume
    unfinished.mkdir()
    shutil.copy(ex1_run / "last.pt", unfinished / "last.pt")
    before = (unfinished / "last.pt").read_bytes()
    for name, (damage, expected) in faults.items():
        data_dir = write_cifar(tmp_path / name)
        damage(data_dir / BATCHES)
        fresh = call(ex1_convnet.main, [*QUICK, "--data-dir", data_dir, "--out-dir", tmp_path / "fresh" / name], capsys)
        resumed = call(ex1_convnet.main, ["--resume", "--out-dir", unfinished, "--data-dir", data_dir, "--no-download"],
                       capsys)
        for label, (code, _, err) in (("fresh", fresh), ("resume", resumed)):
            assert code == 2, f"{name} ({label}): exit {code}\n{err[-2000:]}"
            assert expected in error_line(err) and str(data_dir) in error_line(err), f"{name} ({label}): {err[-2000:]}"
            assert "Traceback" not in err
        assert error_line(fresh[2]) == error_line(resumed[2])
    assert not (tmp_path / "PWNED").exists()
    assert (unfinished / "last.pt").read_bytes() == before and not (unfinished / "metrics.json").exists()


@pytest.mark.parametrize("damage, expected", [
    (lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]), "truncated"),
    (lambda path: path.write_bytes(b"<html><body>404 Not Found</body></html>"), "not a CIFAR-10 batch file"),
    (lambda path: path.write_bytes(b"\x80\x04\x8e" + (2 ** 63 + 5).to_bytes(8, "little")), "truncated or corrupt"),
    (lambda path: path.write_bytes(pickle.dumps({"data": CreatesFile(path.parent / "PWNED"), "labels": [0]})),
     "refusing to load global"),
    (lambda path: rewrite_batch(path, labels=[10] + [0] * 9), "labels outside 0..9"),
    (lambda path: rewrite_batch(path, labels=[-1] + [0] * 9), "labels outside 0..9"),
    (lambda path: rewrite_batch(path, labels=[0] * 9), "10 images but 9 labels"),
    (lambda path: rewrite_batch(path, data=np.zeros((10, 3071), np.uint8)), "expected uint8 data of shape (N, 3072)"),
    (lambda path: rewrite_batch(path, data=np.zeros((10, 3072), np.float32)), "expected uint8 data of shape"),
], ids=["truncated", "html", "absurd-length", "malicious", "label-10", "label-minus-1", "too-few-labels",
        "wrong-shape", "wrong-dtype"])
def test_a_corrupt_malicious_or_wrong_file_is_refused_naming_the_file(tmp_path, damage, expected):
    """Also a file whose pickle would run code: its payload, live under a plain unpickler, never runs."""
    pickle.loads(pickle.dumps(CreatesFile(tmp_path / "live"))).close()
    assert (tmp_path / "live").exists()
    root = write_cifar(tmp_path, per_batch=10, n_test=10)
    damage(root / BATCHES / "data_batch_2")
    with pytest.raises(common.files.UsageError) as error:
        common.data.load_cifar10(root, download=False)
    assert str(error.value).startswith(f"{root / BATCHES / 'data_batch_2'}: ") and expected in str(error.value)
    assert not (root / BATCHES / "PWNED").exists()


@pytest.mark.skipif(not os.environ.get("CIFAR10_DIR"), reason="set CIFAR10_DIR to a real CIFAR-10 copy")
def test_real_cifar10_loads():
    """The official files (Python 2 pickles) pass the restricted unpickler: 50,000 + 10,000 images, 5,000 per class."""
    data = common.data.load_cifar10(os.environ["CIFAR10_DIR"], download=False)
    assert data.train_images.shape == (50000, 3, 32, 32) and data.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train_labels).tolist() == [5000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    assert data.classes == common.data.CLASSES
