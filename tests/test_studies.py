"""The assignment's studies, one command each: BatchNorm (--no-bn and --compare), early stopping (the last and the
best epoch's model), augmentation (a flag per op) and dropout (a sweep over several --dropout values)."""
import shutil
from pathlib import Path

import pytest
from conftest import assert_png, call, ex1_settings, EX1_TRAIN, in_process, QUICK, read_json

import ex1_convnet

TEST_FIGURES = ["per_class.png", "confusion.png", "misclassified.png"]


@pytest.fixture(scope="module")
def no_bn_run(cifar_dir, tmp_path_factory) -> Path:
    """A --no-bn run with the settings of the session's run (conftest.ex1_run), which has BatchNorm; and
    --no-tensorboard, which is no setting."""
    out_dir = tmp_path_factory.mktemp("study-no-bn") / "run"
    assert in_process(ex1_convnet.main, *EX1_TRAIN, "--no-bn", "--no-tensorboard", "--data-dir", cifar_dir,
                      "--out-dir", out_dir)[0] == 0
    return out_dir


# ----------------------------------------------------------------------------- BatchNorm

@pytest.mark.slow
def test_the_no_bn_run_has_no_batchnorm_and_compare_writes_a_figure_json_and_table_that_agree_with_the_runs(
        ex1_run, no_bn_run, tmp_path, capsys):
    """The two runs differ in BatchNorm only: settings, printed model and parameter count say so. (--no-tensorboard
    changed no setting and wrote no event file.)"""
    assert list(ex1_run.glob("events.out.tfevents.*")) and not list(no_bn_run.rglob("events.out.*"))
    bn, no_bn = (read_json(run / "metrics.json") for run in (ex1_run, no_bn_run))
    assert bn["settings"]["batch_norm"] is True and no_bn["settings"]["batch_norm"] is False
    assert "BatchNorm2d" in (ex1_run / "train.log").read_text()
    assert "BatchNorm2d" not in (no_bn_run / "train.log").read_text()
    assert bn["params"] - no_bn["params"] == 2 * sum(ex1_convnet.WIDTHS)  # weight and bias of each BatchNorm
    assert {k: v for k, v in bn["settings"].items() if k not in ("batch_norm", "mean", "std")} == \
           {k: v for k, v in no_bn["settings"].items() if k not in ("batch_norm", "mean", "std")}

    out_dir = tmp_path / "compare"
    code, out, err = call(ex1_convnet.main, ["--compare", ex1_run, no_bn_run, "--out-dir", out_dir], capsys)
    assert code == 0, err[-3000:]
    assert_png(out_dir / "compare.png", min_side=100)
    summary = read_json(out_dir / "compare.json")
    dirs = [ex1_run, no_bn_run]
    assert [Path(r["run"]) for r in summary["runs"]] == dirs
    lines = out.splitlines()
    assert any("test" in line and "first 1000" in line for line in lines)
    for run_dir, row in zip(dirs, summary["runs"], strict=False):
        metrics, history = read_json(run_dir / "metrics.json"), read_json(run_dir / "history.json")
        for key in ("test_accuracy", "test_accuracy_first1000", "best_val_accuracy", "best_epoch", "epochs_run"):
            assert row[key] == metrics[key], (run_dir.name, key)
        assert row["val_accuracy"] == [h["val_accuracy"] for h in history]
        assert row["val_loss"] == [h["val_loss"] for h in history]
        assert len(row["val_accuracy"]) == 3
        table_row = next((line for line in lines if line.startswith(str(run_dir))), None)
        assert table_row is not None and f"{metrics['test_accuracy']:.2%}" in table_row, f"no table row for {run_dir}"


@pytest.mark.slow
def test_eval_only_rebuilds_the_no_bn_model_of_last_pt_into_eval_beside_it(no_bn_run, cifar_dir, tmp_path, capsys):
    """--eval-only --checkpoint without --out-dir (and without --no-bn) writes the test reports into eval/ beside the
    checkpoint, no training files; of last.pt, the run's test_accuracy_last (best.pt's: tests/test_ex1.py)."""
    run_dir = tmp_path / "run"
    shutil.copytree(no_bn_run, run_dir)
    code, out, err = call(ex1_convnet.main, [*QUICK, "--data-dir", cifar_dir, "--eval-only", "--checkpoint",
                                             run_dir / "last.pt"], capsys)
    assert code == 0, err[-3000:]
    m, trained = read_json(run_dir / "eval" / "metrics.json"), read_json(run_dir / "metrics.json")
    assert m["params"] == trained["params"] and m["settings"]["batch_norm"] is False
    assert m["test_accuracy"] == trained["test_accuracy_last"]
    if trained["best_epoch"] == trained["epochs_run"]:
        assert trained["test_accuracy_last"] == trained["test_accuracy"]
    for name in TEST_FIGURES:
        assert_png(run_dir / "eval" / name)
    assert not any((run_dir / "eval" / name).exists() for name in ("history.json", "best.pt", "last.pt"))
    assert "epoch   1/" not in out


# ----------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize("flags, expected", [
    ((), ["flip", "crop"]),                                              # the default recipe's ops
    (("--rotate-deg", "10"), ["flip", "crop", "rotate"]),                # a strength > 0 turns its op on
    (("--jitter", "0.2", "--gray-p", "0.1"), ["flip", "crop", "jitter", "gray"]),
    (("--crop-pad", "0"), ["flip"]),                                     # a strength of 0 turns its op off
    (("--augment", "none"), []),
    (("--augment", "rotate,flip"), ["flip", "rotate"]),                  # --augment chooses the ops
    (("--augment", "flip,rotate", "--rotate-deg", "0"), ["flip"]),
    (("--augment", "flip", "--crop-pad", "2"), ["flip", "crop"]),
    (("--augment", "none", "--gray-p", "0.3"), ["gray"]),                # ... also over no ops at all
])
def test_per_op_flags_turn_ops_on_and_off(flags, expected):
    assert ex1_settings(*flags)["augment"] == expected


def test_strength_flags_set_the_strength_and_override_the_recipe_and_crop_fill_its_fill():
    settings = ex1_settings("--recipe", "original", "--rotate-deg", "5", "--jitter", "0", "--crop-pad", "2")
    # the original recipe's flip,crop,rotate,jitter less jitter
    assert settings["augment"] == ["flip", "crop", "rotate"]
    assert settings["rotate_deg"] == 5 and settings["crop_pad"] == 2 and settings["jitter"] == 0
    assert ex1_settings("--recipe", "original")["augment"] == ["flip", "crop", "rotate", "jitter"]
    # what train_one_epoch crops with (tests/test_augment.py)
    assert ex1_settings("--recipe", "short").crop_fill == "reflect"
    assert ex1_settings("--crop-fill", "zeros", "--recipe", "short").crop_fill == "zeros"


# ----------------------------------------------------------------------------- dropout

def test_dropout_sweep_with_augment_keeps_it_and_reuses_finished_runs(tmp_path, fake_runs):
    """--augment flip reaches every sub-run; a second call uses the finished sub-runs instead of training again."""
    argv = [*QUICK, "--data-dir", str(tmp_path / "unused"), "--out-dir", str(tmp_path), "--epochs", "1",
            "--augment", "flip", "--dropout", "0.2", "0.4", "0.6"]
    assert ex1_convnet.main(argv) == 0
    assert [c["run_dir"] for c in fake_runs] == [tmp_path / "p0.2", tmp_path / "p0.4", tmp_path / "p0.6"]
    assert [c["dropout"] for c in fake_runs] == [0.2, 0.4, 0.6]
    assert all(c["augment"] == ["flip"] for c in fake_runs)
    for p in ("0.2", "0.4", "0.6"):
        assert read_json(tmp_path / f"p{p}" / "metrics.json")["settings"]["augment"] == ["flip"]
    summary = read_json(tmp_path / "dropout_sweep.json")
    assert [r["final_train_accuracy"] for r in summary["runs"]] == pytest.approx([0.4, 0.3, 0.2])
    assert_png(tmp_path / "dropout_sweep.png", min_side=100)

    assert ex1_convnet.main(argv) == 0
    assert len(fake_runs) == 3  # nothing trained again
    assert read_json(tmp_path / "dropout_sweep.json") == summary
