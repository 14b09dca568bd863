"""--seeds: N runs that differ only in their seed, their spread in seeds.json and seeds.png; with the dropout sweep,
a grid; finished runs reused, unfinished ones resumed; --compare takes a seeds folder as its mean."""
import shutil
import statistics
from pathlib import Path

import pytest
from conftest import assert_png, call, error_line, fake_training, in_process, metrics, narrow, QUICK, read_json

import common
import ex1_convnet
import ex2_transfer

RUN = [*QUICK, "--epochs", "2", "--limit-train", "64"]
SPREAD_KEYS = ("test_accuracy", "test_accuracy_first1000", "best_val_accuracy")


@pytest.fixture(scope="module")
def two_seeds(cifar_dir, tmp_path_factory) -> dict:
    """`ex1_convnet.py --seeds 2 --seed 3` on the fixture data (the network narrow): its out-dir and stdout."""
    out_dir = tmp_path_factory.mktemp("seeds") / "run"
    with pytest.MonkeyPatch.context() as patch:
        narrow(patch)
        code, stdout = in_process(ex1_convnet.main, *RUN, "--data-dir", cifar_dir, "--out-dir", out_dir, "--seeds",
                                  "2", "--seed", "3")
    assert code == 0, stdout[-3000:]
    return {"out_dir": out_dir, "stdout": stdout}


@pytest.mark.slow
def test_a_run_per_seed_seeds_json_agrees_with_them_and_compare_takes_their_mean(two_seeds, tmp_path, capsys):
    out_dir = two_seeds["out_dir"]
    runs = [metrics(out_dir / "seed3"), metrics(out_dir / "seed4")]
    assert [m["settings"]["seed"] for m in runs] == [3, 4]
    assert read_json(out_dir / "seed3" / "history.json") != read_json(out_dir / "seed4" / "history.json")
    assert not (out_dir / "metrics.json").exists()  # no run of its own at the top
    summary = read_json(out_dir / "seeds.json")
    assert summary["seeds"] == [3, 4]
    for key in SPREAD_KEYS:
        values = [m[key] for m in runs]
        assert summary[key]["values"] == values
        assert summary[key]["mean"] == pytest.approx(statistics.mean(values))
        assert summary[key]["std"] == pytest.approx(statistics.stdev(values))  # the sample standard deviation
        assert (summary[key]["min"], summary[key]["max"]) == (min(values), max(values))
    assert common.plots.spread([0.5])["std"] is None and common.plots.format_spread(common.plots.spread([0.5])) == \
        "50.0%"  # one seed's: no std (--seeds 0: tests/test_robustness.py's refusals)
    assert_png(out_dir / "seeds.png")
    mean, std = summary["test_accuracy"]["mean"] * 100, summary["test_accuracy"]["std"] * 100
    assert f"test accuracy {mean:.1f} ± {std:.1f}% over 2 seeds" in two_seeds["stdout"]
    # --compare takes the seeds folder as its mean
    code, out, _ = call(ex1_convnet.main, ["--compare", out_dir, out_dir / "seed3", "--out-dir", tmp_path], capsys)
    assert code == 0
    seeds_row, single_row = read_json(tmp_path / "compare.json")["runs"]
    assert seeds_row["seeds"] == [3, 4]
    assert seeds_row["test_accuracy"] == summary["test_accuracy"]["mean"]
    assert seeds_row["test_accuracy_std"] == summary["test_accuracy"]["std"]
    histories = [read_json(out_dir / f"seed{s}" / "history.json") for s in (3, 4)]
    assert seeds_row["val_accuracy"] == pytest.approx([statistics.mean(h[i]["val_accuracy"] for h in histories)
                                                        for i in range(2)])
    assert single_row["test_accuracy"] == metrics(out_dir / "seed3")["test_accuracy"] and "seeds" not in single_row
    assert "mean of 2 seeds" in out


@pytest.mark.slow
def test_a_second_call_reuses_the_runs_and_resume_finishes_an_unfinished_one(two_seeds, cifar_dir, tmp_path, capsys,
                                                                           narrow_ex1):
    copy = tmp_path / "run"
    shutil.copytree(two_seeds["out_dir"], copy)
    (copy / "seed4" / "metrics.json").unlink()  # seed 4 as a run killed after its last epoch's checkpoint
    argv = [*RUN, "--data-dir", cifar_dir, "--out-dir", copy, "--seeds", "2", "--seed", "3"]
    code, _, err = call(ex1_convnet.main, argv, capsys)
    assert code == 2 and "unfinished run" in error_line(err) and "--resume" in error_line(err)

    code, out, _ = call(ex1_convnet.main, [*argv, "--resume"], capsys)
    assert code == 0
    assert f"{copy / 'seed3'} is finished; using its results" in out
    assert "resuming after epoch 2 of 2" in out
    assert metrics(copy / "seed4")["test_accuracy"] == metrics(two_seeds["out_dir"] / "seed4")["test_accuracy"]
    resumed, first = read_json(copy / "seeds.json"), read_json(two_seeds["out_dir"] / "seeds.json")
    assert {k: resumed[k] for k in SPREAD_KEYS} == {k: first[k] for k in SPREAD_KEYS}


def test_dropout_values_times_seeds_is_a_grid_with_mean_and_std_per_p(tmp_path, fake_runs, capsys):
    argv = [*QUICK, "--data-dir", tmp_path / "unused", "--out-dir", tmp_path, "--epochs", "1",
            "--dropout", "0.1", "0.5", "--seeds", "3"]
    code, out, _ = call(ex1_convnet.main, argv, capsys)
    assert code == 0
    grid = [tmp_path / f"p{p}" / f"seed{s}" for p in ("0.1", "0.5") for s in (0, 1, 2)]
    assert [c["run_dir"] for c in fake_runs] == grid
    assert [(c["dropout"], c["seed"]) for c in fake_runs] == [(p, s) for p in (0.1, 0.5) for s in (0, 1, 2)]
    assert all(c["augment"] == [] for c in fake_runs)  # the dropout sweep's rule holds in every cell
    tests = [0.45, 0.46, 0.47]  # the fake's test accuracy of seeds 0, 1, 2
    for p in ("0.1", "0.5"):
        assert read_json(tmp_path / f"p{p}" / "seeds.json")["test_accuracy"]["values"] == pytest.approx(tests)
        assert_png(tmp_path / f"p{p}" / "seeds.png")
    rows = read_json(tmp_path / "dropout_sweep.json")["runs"]
    assert [r["p"] for r in rows] == [0.1, 0.5] \
        and [Path(r["run"]) for r in rows] == [tmp_path / "p0.1", tmp_path / "p0.5"]
    for row, p in zip(rows, (0.1, 0.5), strict=False):
        assert row["seeds"] == [0, 1, 2]
        assert row["test_accuracy"] == pytest.approx(statistics.mean(tests))
        assert row["test_accuracy_std"] == pytest.approx(statistics.stdev(tests))
        assert row["final_train_accuracy"] == pytest.approx(0.5 - p / 2) \
            and row["final_train_accuracy_std"] == pytest.approx(0)
        assert row["val_accuracy"] == pytest.approx([0.41])  # the mean curve over the seeds
    assert_png(tmp_path / "dropout_sweep.png")
    assert "over 3 seeds" in out

    code, _, _ = call(ex1_convnet.main, argv, capsys)
    assert code == 0 and len(fake_runs) == 6  # every cell reused


def test_seeds_in_ex2_train_in_seed_folders_of_the_modes_folder(tmp_path, fake_runs, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, _ = call(ex2_transfer.main, [*QUICK, "--scratch", "--epochs", "1", "--seeds", "2"], capsys)
    assert code == 0
    assert [c["run_dir"] for c in fake_runs] == [Path("runs/ex2-scratch/seed0"), Path("runs/ex2-scratch/seed1")]
    assert read_json(tmp_path / "runs/ex2-scratch/seeds.json")["seeds"] == [0, 1]


def test_a_finished_member_with_other_settings_is_refused_and_seeds_json_records_each_commit(tmp_path, fake_runs,
                                                                                             capsys):
    argv = [*QUICK, "--data-dir", tmp_path / "unused", "--out-dir", tmp_path, "--seeds", "2"]
    assert call(ex1_convnet.main, [*argv, "--epochs", "1"], capsys)[0] == 0 and len(fake_runs) == 2
    before = read_json(tmp_path / "seeds.json")

    code, out, err = call(ex1_convnet.main, [*argv, "--epochs", "30", "--no-bn"], capsys)
    assert code == 2 and len(fake_runs) == 2
    message = error_line(err)
    assert str(tmp_path / "seed0") in message and "trained with other settings" in message
    assert "epochs: 1 -> 30" in message and "batch_norm: True -> False" in message and "--overwrite" in message
    assert "using its results" not in out and read_json(tmp_path / "seeds.json") == before

    code, out, _ = call(ex1_convnet.main, [*argv, "--epochs", "1"], capsys)  # the same settings: reused
    assert code == 0 and len(fake_runs) == 2 and f"{tmp_path / 'seed1'} is finished; using its results" in out
    code, _, _ = call(ex1_convnet.main, [*argv, "--epochs", "3", "--overwrite"], capsys)
    assert code == 0 and [c["epochs"] for c in fake_runs[2:]] == [3, 3]
    for seed, commit in ((0, "a" * 40), (1, "b" * 40)):  # seeds.json records each run's commit, says they differ
        common.files.save_json({**metrics(tmp_path / f"seed{seed}"), "git_commit": commit},
                               tmp_path / f"seed{seed}" / "metrics.json")
    code, out, _ = call(ex1_convnet.main, [*argv, "--epochs", "3"], capsys)
    assert code == 0 and len(fake_runs) == 4
    assert read_json(tmp_path / "seeds.json")["git_commits"] == ["a" * 40, "b" * 40]
    assert "trained by 2 different commits of the project (aaaaaaa, bbbbbbb)" in out


def test_under_a_time_budget_the_first_seed_plans_and_the_others_train_its_plan(tmp_path, monkeypatch, capsys):
    calls = []
    fake = fake_training(calls)
    made = common.train.Plan(32, 8, 40, budget_minutes=5.0, chosen={"label_smoothing": 0.17})

    def planning_fake(kind, settings, *args, plan=None, **kwargs):  # the first run plans, as its timed steps would
        return fake(kind, settings, *args, plan=plan or made, **kwargs)

    monkeypatch.setattr(common.cli, "train_run", planning_fake)
    argv = [*QUICK, "--data-dir", tmp_path / "unused", "--out-dir", tmp_path, "--seeds", "3", "--time-budget", "5"]
    assert call(ex1_convnet.main, argv, capsys)[0] == 0
    assert calls[0]["plan"] is made and calls[0]["label_smoothing"] == 0.17
    for later in calls[1:]:  # the first run's plan, read from its metrics.json, trained as it is
        assert later["plan"] == made._replace(fixed=True) and later["label_smoothing"] == 0.17
    assert call(ex1_convnet.main, argv, capsys)[0] == 0 and len(calls) == 3  # and they are reused as such
