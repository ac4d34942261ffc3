"""`cure plot`: valid PNG figures from run directories, per-layer figures when layer_stats.csv exists, errors."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import pytest  # noqa: E402
from tiny_runs import write_run_dir  # noqa: E402

from cure.cli import main  # noqa: E402
from cure.plots import PlotError, load_run, plot_runs  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0.01  # not a blank canvas


def test_plot_command_writes_valid_pngs(tmp_path, capsys):
    cure = write_run_dir(tmp_path / "cure_run", layer_stats=True)
    at = write_run_dir(tmp_path / "at_run", method="at", revision=False, summary=False, epochs=3)
    out = tmp_path / "figures"
    assert main(["plot", str(cure), str(at), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["curves.png", "layers_cure_run.png", "revision_cure_run.png"]
    for p in out.iterdir():
        _check_png(p)
    printed = capsys.readouterr().out
    assert "at_run: no layer_stats.csv; the per-layer figures are skipped" in printed
    assert "written:" in printed


def test_best_epoch_from_summary_or_from_the_selection_rule(tmp_path):
    with_summary = load_run(write_run_dir(tmp_path / "a", epochs=5))
    assert with_summary.best_epoch == 4  # summary.json
    without = load_run(write_run_dir(tmp_path / "b", epochs=5, summary=False))
    assert without.best_epoch == 4  # highest validation PGD-20 (the last epoch drops)
    st = load_run(write_run_dir(tmp_path / "c", epochs=5, summary=False, method="st", revision=False))
    assert st.best_epoch == 5  # ST: highest validation natural accuracy
    assert (st.method, st.dataset, st.arch) == ("st", "fashion-mnist", "cnn")
    assert not st.has("rev_val_nat_acc") and with_summary.has("rev_val_nat_acc")


def test_runs_without_config_or_with_partial_layer_stats_still_plot(tmp_path):
    bare = write_run_dir(tmp_path / "bare", config=False, summary=False, layer_stats=True)
    # layer_stats.csv with only the kept fraction
    (bare / "layer_stats.csv").write_text("epoch,layer,kept_fraction\n1,w1,0.7\n1,w2,0.6\n2,w1,0.72\n2,w2,0.65\n")
    written, notes = plot_runs([bare], tmp_path / "out")
    assert {p.name for p in written} == {"curves.png", "revision_bare.png", "layers_bare.png"}
    for p in written:
        _check_png(p)
    assert any("no config.json" in n for n in notes)


def test_directory_without_metrics_fails_with_a_clear_message(tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    good = write_run_dir(tmp_path / "good")
    out = tmp_path / "figures"
    with pytest.raises(SystemExit) as info:
        main(["plot", str(good), str(empty), "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "not_a_run has no metrics.csv" in err and "cure train" in err
    assert not out.exists()  # every directory is checked before anything is written
    with pytest.raises(PlotError, match="is not a directory"):
        load_run(tmp_path / "missing")
    (empty / "metrics.csv").write_text("")
    with pytest.raises(PlotError, match="no epoch rows"):
        load_run(empty)


def test_curves_leave_out_panels_without_data(tmp_path):
    """A run whose metrics.csv has validation columns only gets the two validation panels (one row), not
    four panels with two of them empty."""
    import csv

    full = write_run_dir(tmp_path / "full", revision=False)
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    with open(full / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(sparse / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "val_nat_acc", "val_pgd20_acc"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    heights = {}
    for run in (full, sparse):
        out = tmp_path / f"fig_{run.name}"
        plot_runs([run], out)
        heights[run.name] = mpimg.imread(out / "curves.png").shape[0]
    assert heights["sparse"] < 0.6 * heights["full"]
