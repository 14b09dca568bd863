"""What a student reads in the pictures: titles that say what and which images, accuracies in percent, every epoch
visible and the best one marked, true → predicted, the units of the corruptions' strengths, the predictions' files
on a grid that fits them."""
import numpy as np
import pytest
import torch
from conftest import call, save_untrained_checkpoint
from PIL import Image

import common
import ex1_convnet

IMAGES = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plots draw, caught instead of saved."""
    caught = []
    monkeypatch.setattr(common.plots, "save_figure", lambda fig, path: caught.append(fig))
    return caught


def texts(fig) -> str:
    """Every title (the figure's and its panels'), axis label and text of a figure, one a line."""
    parts = [fig.get_suptitle()]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
    return "\n".join(parts)


def in_percent(ax) -> bool:
    return ax.yaxis.get_major_formatter()(0.25, 0) == "25%"


def test_the_history_shows_a_one_epoch_run_its_learning_rate_and_the_best_epoch_under_a_title(figures, tmp_path):
    history = [{"epoch": 1, "train_loss": 2.3, "val_loss": 2.4, "train_accuracy": 0.19, "val_accuracy": 0.18,
                "lr": 2e-4}]
    common.plots.plot_history(history, 1, tmp_path / "history.png", 2000, 1000)
    fig = figures.pop()
    assert "2,000 training images" in fig.get_suptitle() and "1,000 validation images" in fig.get_suptitle()
    data = [line for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert len(data) == 5 and all(line.get_marker() not in ("None", "", None) for line in data)
    assert any("learning rate" in ax.get_ylabel() and [2e-4] in [list(line.get_ydata()) for line in ax.get_lines()]
               for ax in fig.axes)
    (accuracy,) = [ax for ax in fig.axes if ax.get_ylabel() == "accuracy"]
    assert in_percent(accuracy)
    # the best epoch: a vertical line in the loss and accuracy panels, named in their legends
    history = [{**history[0], "epoch": epoch, "val_accuracy": val} for epoch, val in enumerate((0.3, 0.6, 0.5), 1)]
    common.plots.plot_history(history, 2, tmp_path / "history.png", 64, 64)
    for ax in figures.pop().axes[:2]:
        assert [line for line in ax.get_lines() if list(line.get_xdata()) == [2, 2]], "no line at the best epoch"
        assert any("best epoch" in text.get_text() and "2" in text.get_text() for text in ax.get_legend().get_texts())


def test_the_test_figures_say_what_they_show_on_which_images_with_units(figures, tmp_path, capsys):
    labels = torch.tensor([0, 1, 2, 3])
    record = common.evaluation.corruption_accuracies(lambda batch: torch.zeros(len(batch), dtype=torch.long), IMAGES,
                                                     labels)
    predictions = torch.tensor([0, 2, 2, 1])
    report = {"test_accuracy": 0.5, "test_accuracy_first1000": 0.5, "corruptions": record,
                "per_class_accuracy": common.evaluation.per_class_accuracy(labels, predictions, common.data.CLASSES),
                "confusion_matrix": common.evaluation.confusion_matrix(labels, predictions).tolist()}
    data = common.data.CifarData(IMAGES, labels, IMAGES, labels, tuple(common.data.CLASSES))
    common.evaluation.write_report(report, predictions, data, torch.nn.Linear(1, 1), torch.device("cpu"), {}, {},
                                   tmp_path)
    per_class, confusion, misclassified, corruptions, examples = map(texts, figures)
    for text in (per_class, confusion, misclassified, corruptions):
        assert "4 test images" in text
    assert "test image under each corruption" in examples
    assert "true automobile\n→ bird" in misclassified and "true → predicted" in misclassified
    assert in_percent(figures[0].axes[0]) and in_percent(figures[3].axes[0])
    for unit in ("2/255", "quality 90", "σ 0.5 px", "×0.6", "2 px", "16×16 px"):
        assert unit in corruptions and unit in examples


def test_predictions_name_each_file_on_a_grid_fitted_to_five(figures, tmp_path, capsys):
    settings = ex1_convnet.Settings(mean=[0.5] * 3, std=[0.5] * 3)
    checkpoint = save_untrained_checkpoint("ex1_convnet.py", settings, ex1_convnet.build_model(settings),
                                           tmp_path / "best.pt")
    for i in range(5):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"photo{i}.png")
    code, out, err = call(ex1_convnet.main, ["--predict", *sorted(tmp_path.glob("*.png")), "--checkpoint", checkpoint,
                                             "--out-dir", tmp_path / "predict", "--device", "cpu"], capsys)
    assert code == 0, err
    (fig,) = figures
    assert len(fig.axes) == 5 and "picture" in fig.get_suptitle()
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == [f"photo{i}.png" for i in range(5)]


def test_the_study_figures_have_titles(figures, tmp_path, capsys):
    """compare.png and dropout_sweep.png say what they show."""
    row = {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.4}
    for name in ("p0.1", "p0.5"):
        (tmp_path / name).mkdir()
        common.files.save_json([row], tmp_path / name / "history.json")
        common.files.save_json({"test_accuracy": 0.4, "test_accuracy_first1000": 0.4, "best_val_accuracy": 0.4,
                                "best_epoch": 1, "epochs_run": 1}, tmp_path / name / "metrics.json")
    common.plots.compare_runs([tmp_path / "p0.1", tmp_path / "p0.5"], tmp_path / "compare")
    ex1_convnet.report_dropout_sweep([0.1, 0.5], [tmp_path / "p0.1", tmp_path / "p0.5"], tmp_path)
    assert "Validation loss and accuracy per epoch of 2 runs" in figures[0].get_suptitle()
    assert "Dropout" in figures[1].get_suptitle() and in_percent(figures[1].axes[0])
