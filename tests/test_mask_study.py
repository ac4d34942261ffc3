"""scripts/mask_study.py end to end on a tiny budget: the shared natural run, six methods as separate
`cure train` processes, the table, the CSV and the figures; a second call skips finished runs and
re-renders the same table."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mask_study.py"
TINY = [
    "--arch", "resnet20", "--seeds", "0", "--pretrain-samples", "64", "--pretrain-val-size", "16", "--epochs", "1",
    "--train-samples", "32", "--val-size", "16", "--eval-samples", "16", "--attack-steps", "1", "--jobs", "2",
    "--batch-size", "16",
]  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_tiny_study_writes_table_csv_and_figures_and_skips_finished_runs(tmp_path):
    runs, output = tmp_path / "runs", tmp_path / "results" / "study.md"
    done = _run("--runs", str(runs), "--output", str(output), *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    table = output.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == ["CURE", "AT (Madry)", "CURE without RGP mask", "TRADES", "CURE without revision", "MART"]
    with open(output.with_suffix(".csv"), newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["run"] for r in records] == ["cure", "at", "cure_no_mask", "trades", "cure_no_revision", "mart"]
    for r in records:
        assert 0.0 <= float(r["last_nat"]) <= 100.0 and 0.0 <= float(r["last_pgd20"]) <= 100.0
        kept = float(r["kept_fraction"])
        assert (kept == 1.0) == (r["run"] not in ("cure", "cure_no_revision")), r  # only masked runs drop entries
    # The rendered commands are the ones that ran: every run directory named in them exists.
    commands = [line for line in table.splitlines() if line.startswith("cure train")]
    assert len(commands) == 7 and all((runs / line.split("--out ")[1].split()[0].split("/")[-1]).is_dir()
                                      for line in commands)  # fmt: skip
    assert output.with_suffix(".png").stat().st_size > 10_000
    assert (output.with_suffix("") / "curves.png").is_file()
    assert (output.with_suffix("") / "layers_cure_s0.png").is_file()
    assert (output.with_suffix("") / "losses_cure_s0.png").is_file()
    for r in records:  # every run's metrics and summary beside the table; the collapse flag per run
        for file in ("metrics.csv", "summary.json"):
            assert (output.with_suffix("") / "runs" / f"{r['run']}_s0" / file).is_file()
        assert r["collapsed"] in ("True", "False") and float(r["max_val_nat_drop"]) >= 0
    assert all(row.split("|")[-2].strip() in ("no",) or row.split("|")[-2].strip().startswith("s0") for row in rows)
    # Second call: nothing retrained, the same table.
    again = _run("--runs", str(runs), "--output", str(output), *TINY)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done already") == 7
    assert output.read_text().split("## Protocol")[1] == table.split("## Protocol")[1]


def test_every_committed_study_row_has_its_run_files_in_the_repository():
    """Each run of a committed study table has its per-epoch metrics.csv and summary.json beside it, tracked
    by git (a `runs/` ignore pattern once kept them out of every commit), and the summary is that run's."""
    import json

    tracked = set(subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    if not tracked:
        import pytest

        pytest.skip("not a git checkout")
    tables = sorted((ROOT / "results").glob("*_study_*_resnet20.csv"))
    assert tables, "no committed study tables"
    for table in tables:
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows, table
        for row in rows:
            name = row["run"] if row["run"].endswith(f"_s{row['seed']}") else f"{row['run']}_s{row['seed']}"
            run_dir = table.with_suffix("") / "runs" / name
            for name in ("metrics.csv", "summary.json"):
                assert str((run_dir / name).relative_to(ROOT)) in tracked, f"{run_dir / name} is not committed"
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["seed"] == int(row["seed"]), run_dir
