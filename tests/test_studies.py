"""The assignment's studies, one command each: BatchNorm (--no-bn and --compare), early stopping (the last and the
best epoch's model), augmentation (a flag per op) and dropout (a sweep over several --dropout values)."""
from pathlib import Path

import pytest
import torch
from conftest import assert_png, fake_training, QUICK, read_json, run_ok

import common
import ex1_convnet

KIND = "ex1_convnet.py"
# Two epochs of two batches of 32: enough for a curve, a best epoch and a last epoch.
RUN = [*QUICK, "--epochs", "2", "--limit-train", "64"]
# A sweep over two dropout values, one batch of one epoch each.
SWEEP_PS = ["0.1", "0.5"]
SWEEP = [*QUICK, "--epochs", "1", "--limit-train", "32", "--dropout", *SWEEP_PS]
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def bn_runs(cifar_dir, tmp_path_factory) -> dict[str, Path]:
    """Out-dirs of a default run and a --no-bn run with the same small flags."""
    runs = {"bn": tmp_path_factory.mktemp("study-bn"), "no-bn": tmp_path_factory.mktemp("study-no-bn")}
    run_ok(*RUN, "--data-dir", cifar_dir, "--out-dir", runs["bn"], env=ENV)
    run_ok(*RUN, "--no-bn", "--data-dir", cifar_dir, "--out-dir", runs["no-bn"], env=ENV)
    return runs


@pytest.fixture(scope="module")
def compared(bn_runs, tmp_path_factory) -> dict:
    """`ex1_convnet.py --compare BN NO_BN --out-dir D`: its out-dir and stdout."""
    out_dir = tmp_path_factory.mktemp("study-compare") / "compare"
    stdout = run_ok("--compare", bn_runs["bn"], bn_runs["no-bn"], "--out-dir", out_dir, env=ENV)
    return {"out_dir": out_dir, "stdout": stdout}


@pytest.fixture(scope="module")
def sweep(cifar_dir, tmp_path_factory) -> dict:
    """`ex1_convnet.py --dropout 0.1 0.5` without --augment: its out-dir and stdout."""
    out_dir = tmp_path_factory.mktemp("study-dropout")
    stdout = run_ok(*SWEEP, "--data-dir", cifar_dir, "--out-dir", out_dir, env=ENV)
    return {"out_dir": out_dir, "stdout": stdout}


# ----------------------------------------------------------------------------- BatchNorm

@pytest.mark.slow
def test_no_bn_run_has_no_batchnorm(bn_runs):
    """The two runs differ in BatchNorm only: settings, printed model and parameter count say so."""
    bn, no_bn = (read_json(bn_runs[k] / "metrics.json") for k in ("bn", "no-bn"))
    assert bn["settings"]["batch_norm"] is True and no_bn["settings"]["batch_norm"] is False
    assert "BatchNorm2d" in (bn_runs["bn"] / "train.log").read_text()
    assert "BatchNorm2d" not in (bn_runs["no-bn"] / "train.log").read_text()
    assert bn["params"] - no_bn["params"] == 2 * sum(ex1_convnet.WIDTHS)  # weight and bias of each BatchNorm
    assert {k: v for k, v in bn["settings"].items() if k not in ("batch_norm", "mean", "std")} == \
           {k: v for k, v in no_bn["settings"].items() if k not in ("batch_norm", "mean", "std")}


@pytest.mark.slow
def test_compare_writes_figure_and_json_that_agree_with_the_runs(bn_runs, compared):
    out_dir = compared["out_dir"]
    assert_png(out_dir / "compare.png", min_side=100)
    summary = read_json(out_dir / "compare.json")
    dirs = [bn_runs["bn"], bn_runs["no-bn"]]
    assert [Path(r["run"]) for r in summary["runs"]] == dirs
    for run_dir, row in zip(dirs, summary["runs"], strict=False):
        metrics, history = read_json(run_dir / "metrics.json"), read_json(run_dir / "history.json")
        for key in ("test_accuracy", "test_accuracy_first1000", "best_val_accuracy", "best_epoch", "epochs_run"):
            assert row[key] == metrics[key], (run_dir.name, key)
        assert row["val_accuracy"] == [h["val_accuracy"] for h in history]
        assert row["val_loss"] == [h["val_loss"] for h in history]
        assert len(row["val_accuracy"]) == 2


@pytest.mark.slow
def test_compare_prints_a_table_naming_both_runs(bn_runs, compared):
    lines = compared["stdout"].splitlines()
    assert any("test" in line and "first 1000" in line for line in lines)
    for run_dir in (bn_runs["bn"], bn_runs["no-bn"]):
        row = next((line for line in lines if line.startswith(str(run_dir))), None)
        assert row is not None, f"no table row for {run_dir}"
        assert f"{read_json(run_dir / 'metrics.json')['test_accuracy']:.2%}" in row


# ----------------------------------------------------------------------------- early stopping

@pytest.mark.slow
def test_metrics_report_the_last_and_the_best_epochs_model(bn_runs, cifar_dir):
    """test_accuracy is best.pt's accuracy on the test set, test_accuracy_last that of last.pt."""
    run_dir = bn_runs["bn"]
    m = read_json(run_dir / "metrics.json")
    history = read_json(run_dir / "history.json")
    assert m["epochs_run"] == len(history) == 2
    assert 0 <= m["test_accuracy_last"] <= 1 and 0 <= m["test_accuracy"] <= 1
    assert 1 <= m["best_epoch"] <= m["epochs_run"]
    assert m["best_val_accuracy"] == max(h["val_accuracy"] for h in history)
    assert history[m["best_epoch"] - 1]["val_accuracy"] == m["best_val_accuracy"]
    assert (run_dir / "history.png").is_file()
    assert_png(run_dir / "history.png", min_side=100)

    data = common.data.load_cifar10(cifar_dir, download=False)
    ctx = common.device.TrainContext(torch.device("cpu"), torch.float32)
    accuracy = {}
    for name in ("best", "last"):
        checkpoint = common.files.load_checkpoint(run_dir / f"{name}.pt", KIND)
        model = ex1_convnet.build_model(checkpoint["settings"])
        model.load_state_dict(checkpoint["model"])
        model = model.to(memory_format=torch.channels_last)
        accuracy[name] = common.evaluation.evaluate(model, data.test_images, data.test_labels,
                                                    checkpoint["settings"]["mean"], checkpoint["settings"]["std"],
                                                    ctx)["accuracy"]
    one_image = 1 / len(data.test_labels)  # allow one argmax tie to fall the other way under another thread count
    assert m["test_accuracy"] == pytest.approx(accuracy["best"], abs=one_image)
    assert m["test_accuracy_last"] == pytest.approx(accuracy["last"], abs=one_image)
    if m["best_epoch"] == m["epochs_run"]:
        assert m["test_accuracy_last"] == m["test_accuracy"]


def test_history_figure_marks_the_best_epoch(tmp_path, monkeypatch):
    """plot_history draws a vertical line at the best epoch in both panels, named in the legend."""
    figures = []
    monkeypatch.setattr(common.plots, "save_figure", lambda fig, path: figures.append(fig))
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "train_accuracy": 0.2 * e,
                "val_accuracy": v, "lr": 1e-3} for e, v in zip((1, 2, 3, 4), (0.3, 0.6, 0.5, 0.55), strict=False)]
    common.plots.plot_history(history, 2, tmp_path / "history.png", 64, 64)
    assert len(figures) == 1
    axes = figures[0].axes
    assert len(axes) >= 2
    for ax in axes[:2]:
        marks = [line for line in ax.get_lines() if list(line.get_xdata()) == [2, 2]]
        assert marks, "no vertical line at the best epoch"
        legend = ax.get_legend()
        assert legend is not None and any("best epoch" in t.get_text() and "2" in t.get_text()
                                          for t in legend.get_texts())


# ----------------------------------------------------------------------------- augmentation

def augment_of(*flags: str, recipe: str = "default") -> list[str]:
    args = ex1_convnet.parse_args(list(flags))
    return common.cli.resolve_settings(common.cli.explicit_flags(args), ex1_convnet.RECIPES[recipe],
                                       ex1_convnet.Settings)["augment"]


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
    assert augment_of(*flags) == expected


def test_strength_flags_set_the_strength_and_override_the_recipe():
    args = ex1_convnet.parse_args(["--recipe", "original", "--rotate-deg", "5", "--jitter", "0", "--crop-pad", "2"])
    settings = common.cli.resolve_settings(common.cli.explicit_flags(args), ex1_convnet.RECIPES["original"],
                                           ex1_convnet.Settings)
    # the original recipe's flip,crop,rotate,jitter less jitter
    assert settings["augment"] == ["flip", "crop", "rotate"]
    assert settings["rotate_deg"] == 5 and settings["crop_pad"] == 2 and settings["jitter"] == 0
    assert augment_of(recipe="original") == ["flip", "crop", "rotate", "jitter"]


@pytest.mark.parametrize("flags, fill", [((), "reflect"), (("--crop-fill", "zeros"), "zeros")])
def test_crop_fill_flag_reaches_the_training_step(flags, fill):
    args = ex1_convnet.parse_args(list(flags))
    settings = common.cli.resolve_settings(common.cli.explicit_flags(args), ex1_convnet.RECIPES["short"],
                                           ex1_convnet.Settings)
    assert settings.crop_fill == fill  # what train_one_epoch crops with (tests/test_augment.py)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.slow
def test_dropout_sweep_trains_one_run_per_p_without_augmentation(sweep):
    for p in SWEEP_PS:
        run_dir = sweep["out_dir"] / f"p{p}"
        m = read_json(run_dir / "metrics.json")
        assert m["settings"]["dropout"] == float(p)
        assert m["settings"]["augment"] == []  # augmentation is off in a sweep unless --augment is given
        assert m["epochs_run"] == 1
        assert f"Dropout(p={p}," in (run_dir / "train.log").read_text()  # the model really had this p
    assert not (sweep["out_dir"] / "metrics.json").exists()  # no run of its own at the top


@pytest.mark.slow
def test_dropout_sweep_writes_figure_and_json_that_agree_with_the_runs(sweep):
    out_dir = sweep["out_dir"]
    assert_png(out_dir / "dropout_sweep.png", min_side=100)
    runs = read_json(out_dir / "dropout_sweep.json")["runs"]
    assert [r["p"] for r in runs] == [float(p) for p in SWEEP_PS]
    for p, r in zip(SWEEP_PS, runs, strict=False):
        run_dir = out_dir / f"p{p}"
        assert Path(r["run"]) == run_dir
        history, metrics = read_json(run_dir / "history.json"), read_json(run_dir / "metrics.json")
        assert r["final_train_accuracy"] == history[-1]["train_accuracy"]
        assert r["final_val_accuracy"] == history[-1]["val_accuracy"]
        assert r["val_accuracy"] == [h["val_accuracy"] for h in history]
        assert r["test_accuracy"] == metrics["test_accuracy"]
        assert r["best_val_accuracy"] == metrics["best_val_accuracy"]
        assert 0 <= r["final_train_accuracy"] <= 1 and 0 <= r["final_val_accuracy"] <= 1
    assert f"wrote {out_dir / 'dropout_sweep.png'}" in sweep["stdout"]


def test_dropout_sweep_with_augment_keeps_it_and_reuses_finished_runs(tmp_path, monkeypatch):
    """--augment flip reaches every sub-run; a second call uses the finished sub-runs instead of training again."""
    calls = []
    monkeypatch.setattr(common.cli, "train_run", fake_training(calls))
    argv = [*QUICK, "--data-dir", str(tmp_path / "unused"), "--out-dir", str(tmp_path), "--epochs", "1",
            "--augment", "flip", "--dropout", "0.2", "0.4", "0.6"]
    assert ex1_convnet.main(argv) == 0
    assert [c["run_dir"] for c in calls] == [tmp_path / "p0.2", tmp_path / "p0.4", tmp_path / "p0.6"]
    assert [c["dropout"] for c in calls] == [0.2, 0.4, 0.6]
    assert all(c["augment"] == ["flip"] for c in calls)
    for p in ("0.2", "0.4", "0.6"):
        assert read_json(tmp_path / f"p{p}" / "metrics.json")["settings"]["augment"] == ["flip"]
    summary = read_json(tmp_path / "dropout_sweep.json")
    assert [r["final_train_accuracy"] for r in summary["runs"]] == pytest.approx([0.4, 0.3, 0.2])
    assert_png(tmp_path / "dropout_sweep.png", min_side=100)

    assert ex1_convnet.main(argv) == 0
    assert len(calls) == 3  # nothing trained again
    assert read_json(tmp_path / "dropout_sweep.json") == summary
