"""Every Triton kernel compiled for sm_80 and sm_90 without a GPU, driven through the real launchers.

scripts/triton_aot_check.py runs the public ops on CPU tensors with a stand-in Triton driver, so each launch
specialises on its real arguments and compiles for the target instead of running; it checks the PTX (no fma,
no .ftz), a sample of the SASS (no FFMA), registers and spills against its ceilings, and vector loads in the
streaming kernels. Here: the script passes, and its report covers every variant the launchers can produce.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_aot_check.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # a cold compile: nothing comes from an earlier run
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "80", "90", "--json", str(tmp / "report.json")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0 and "ptxas" in proc.stderr and not (tmp / "report.json").exists():
        pytest.skip(f"Triton cannot run ptxas here: {proc.stderr.strip().splitlines()[-1]}")
    assert (tmp / "report.json").exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp / "report.json").read_text())
    data["returncode"], data["stdout"] = proc.returncode, proc.stdout
    return data


def _variants(report, kernel, arch, fusion=False):
    return [r["variant"] for r in report["compiled"] if r["kernel"] == kernel and r["arch"] == arch
            and r["fusion"] == fusion]


@pytest.mark.slow
def test_every_kernel_compiles_exactly_within_its_register_and_spill_ceilings(report):
    # The script's own checks: compiled, no fma / .ftz / FFMA, ceilings, vector loads, the fusion control.
    assert report["failures"] == [] and report["returncode"] == 0, "\n".join(report["failures"]) or report["stdout"]
    exact = [r for r in report["compiled"] if not r["fusion"]]
    assert all(r["ptx_fma"] == 0 and r["ptx_ftz"] == 0 and not r["sass_ffma"] for r in exact)
    assert sum(r["sass_ffma"] is not None for r in exact) >= 40  # a sample of every kernel's SASS was read
    for r in exact:
        regs, local = report["ceilings"][r["kernel"]]
        assert r["registers"] <= regs and r["local_bytes"] <= local, r
    # The control: contraction allowed shows in the PTX and the SASS, so the zeros above mean something.
    controls = [r for r in report["compiled"] if r["fusion"]]
    assert {r["kernel"] for r in controls if r["ptx_fma"] > 0 and r["sass_ffma"]} >= {"_mask_kernel",
                                                                                      "_sgd_step_kernel"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_the_launches_reach_every_variant(report, arch):
    kernels = {r["kernel"] for r in report["compiled"] if r["arch"] == arch and not r["fusion"]}
    assert kernels == {"_sample_kernel", "_bracket_kernel", "_resolve_kernel", "_histogram_kernel", "_select_kernel",
                       "_refine_kernel", "_candidate_kernel", "_mask_kernel", "_sgd_step_kernel", "_revise_kernel"}
    for kernel in ("_sample_kernel", "_bracket_kernel", "_histogram_kernel", "_refine_kernel", "_mask_kernel",
                   "_sgd_step_kernel", "_revise_kernel"):
        dtypes = {v.split(" ")[0] for v in _variants(report, kernel, arch)}
        assert dtypes == {"*fp32", "*bf16", "*fp16"}, (kernel, dtypes)
    # Both radix digit widths: 256-bin (8/8/8/7) and 2048-bin (11/10/10) first levels, every select level.
    assert {v.split("NB=")[1] for v in _variants(report, "_histogram_kernel", arch)} == {"256", "2048"}
    selects = _variants(report, "_select_kernel", arch)
    assert {("WIDTH=8" in v or "WIDTH=7" in v, v.split("LEVEL=")[1][0], "LAST=True" in v) for v in selects} == {
        (True, "1", False), (True, "2", False), (True, "3", False), (True, "4", True),
        (False, "1", False), (False, "2", False), (False, "3", True)}
    # The fused step: every flag combination in every dtype, and the pointer-table (INDIRECT) variants of the
    # trainer's layout (gradients flat; params, buffers, revision separate: 6 / 14) and of all separate (7 / 15).
    steps = _variants(report, "_sgd_step_kernel", arch)
    for dtype, freeze, revise, skip in itertools.product(("fp32", "bf16", "fp16"), *[("False", "True")] * 3):
        flags = f"FREEZE={freeze} REVISE={revise} SKIP={skip}"
        assert any(v.startswith(f"*{dtype} ") and flags in v for v in steps), (dtype, flags)
    assert {v.split("INDIRECT=")[1] for v in steps} == {"0", "6", "7", "14", "15"}
