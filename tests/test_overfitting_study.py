"""scripts/overfitting_study.py end to end on a tiny budget: the natural run it starts from, four methods as
separate `cure train` processes with the given milestones, the best-versus-last table, the CSV, the figure
and the per-run files; a second call skips finished runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "overfitting_study.py"
TINY = [
    "--seeds", "0", "--pretrain-samples", "64", "--pretrain-val-size", "16", "--epochs", "3", "--lr-milestones", "1,2",
    "--train-samples", "32", "--val-size", "16", "--eval-samples", "16", "--attack-steps", "1", "--jobs", "2",
    "--batch-size", "16",
]  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_tiny_overfitting_study(tmp_path):
    runs, output = tmp_path / "runs", tmp_path / "results" / "overfit.md"
    args = ["--runs", str(runs), "--pretrain-dir", str(tmp_path / "pre"), "--output", str(output), *TINY]
    done = _run(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    table = output.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == ["AT (Madry)", "CURE", "TRADES", "CURE without revision"]
    with open(output.with_suffix(".csv"), newline="") as f:
        records = list(csv.DictReader(f))
    assert sorted(r["run"] for r in records) == ["at", "cure", "cure_no_revision", "trades"]
    for r in records:
        assert float(r["best_minus_last_pgd20"]) == float(r["best_pgd20"]) - float(r["last_pgd20"])
        assert 1 <= int(r["best_epoch"]) <= 3
    for name in ("at", "trades", "cure", "cure_no_revision"):
        config = json.loads((runs / f"{name}_s0" / "config.json").read_text())
        assert config["lr_milestones"] == [1, 2] and config["epochs"] == 3
        for file in ("metrics.csv", "summary.json"):
            assert (output.with_suffix("") / "runs" / f"{name}_s0" / file).is_file()
    assert output.with_suffix(".png").stat().st_size > 10_000
    again = _run(*args, "--table-only")
    assert again.returncode == 0, again.stderr
    assert output.read_text().split("## Protocol")[1] == table.split("## Protocol")[1]
