"""Compile every Triton kernel of cure_kernels for CUDA GPUs on a machine without one, through the real launchers.

The public ops (``cure_kernels.rgp_mask_``, ``rgp_select``, ``rgp_sgd_step_``, ``revise_``, backend "triton")
run on small CPU tensors with Triton's active driver replaced by a stand-in that reports a CUDA target
(sm_80, sm_90). ``JITFunction.run`` is wrapped so that each launch goes through Triton's own binder and
specialisation with the real arguments (pointer dtypes, 16-byte alignment, integers equal to 1 or divisible
by 16, constexprs) and compiles for that target -- the launch Triton itself does with ``warmup=True`` -- but
runs nothing. Every compiled kernel is recorded once (the JIT's per-device cache deduplicates repeated
launches of one specialisation; the stand-in gives each target its own device index, hence its own cache).

What is covered: float32, bfloat16 and float16; gradient lists that are views of one buffer (as
``ProminenceMasker`` keeps them) and separate allocations (packed by the launchers, or for the written lists
of the fused step addressed through pointer tables: the INDIRECT variants); a tensor above the bracket
cutoff and small ones (sampling bracket, radix path with all its select levels); both radix digit widths of
``triton_rgp_mask._radix_digits``; every flag combination of the fused step (mask_mode grad/update, with and
without revision, skip and given thresholds). A control compiles the mask and fused-step kernels again with
``enable_fp_fusion=True``, which must show ``fma`` in their PTX: the check can see contraction.

Checks, on every kernel as launched: it compiles; its PTX has no ``fma`` and no ``.ftz`` instruction and its
SASS no FFMA/HFMA2 (the contract rounds every product and sum, and flushes no subnormal: docs/method.md,
section 2); registers and local memory (spills) within :data:`CEILINGS`
(read from the cubin with the cuobjdump Triton bundles); the streaming kernels' full-chunk path loads vectors.

Usage:  python scripts/triton_aot_check.py [--arch 80 90] [--json FILE]
        (TRITON_INTERPRET must be unset; set TRITON_CACHE_DIR to an empty directory for a cold compile.)
Exit status: 0 when every check passes, 1 otherwise (the failures are printed and in the JSON report).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot_check.py compiles for a GPU target: run it with TRITON_INTERPRET unset")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import cure_kernels as ck  # noqa: E402
from cure_kernels import backends, triton_revise, triton_rgp_mask, triton_sgd_step  # noqa: E402

KERNEL_MODULES = (triton_rgp_mask, triton_sgd_step, triton_revise)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DIGIT_WIDTHS = ((8, 8, 8, 7), (11, 10, 10))  # the two choices of triton_rgp_mask._radix_digits

# Per kernel: the most registers per thread and bytes of local memory per thread (spills and stack) allowed.
# Measured with Triton 3.8.0 and the ptxas it bundles (CUDA 13), over sm_80 and sm_90 and every variant this
# script compiles (registers sm_80 / sm_90, the largest of the variants; local memory 0 unless stated); the
# ceilings leave a few registers of margin. A kernel that needs more after a change deserves a look: these
# kernels run 8 warps per program, and 64 registers per thread fit 4 programs on an SM, 128 two, 255 one.
CEILINGS: dict[str, tuple[int, int]] = {
    "_sample_kernel": (255, 3584),  # 32 / 255 registers; 3120 B local on sm_80, 904 B on sm_90: it spills.
    # One program of 16384 sampled keys per tensor (64 per thread) and two 4-level 256-bin selections; it
    # runs once per tensor and step.
    "_bracket_kernel": (88, 0),  # 80 / 79
    "_resolve_kernel": (72, 0),  # 62 / 60
    "_histogram_kernel": (84, 0),  # 62 / 75
    "_select_kernel": (112, 0),  # 104 / 99 (2048 bins at level 1 of the 11/10/10-bit digits)
    "_refine_kernel": (88, 0),  # 80 / 80
    "_candidate_kernel": (72, 0),  # 64 / 64
    "_mask_kernel": (88, 0),  # 58 / 80
    "_sgd_step_kernel": (255, 128),  # 172 / 255 registers; on sm_90 the float32 and float16 variants with
    # revision reach 255 and spill up to 72 B (104 B with every list addressed through pointer tables and
    # mask_mode "grad"): one 8-warp program per SM. 16 elements per thread of six to eight streams.
    "_revise_kernel": (40, 0),  # 35 / 32
}

# Kernels whose full chunks must load vectors (ld.global.v2/v4) when their lists are one flat buffer.
VECTOR_KERNELS = ("_bracket_kernel", "_histogram_kernel", "_refine_kernel", "_mask_kernel", "_sgd_step_kernel",
                  "_revise_kernel")


def jit_kernels() -> dict[str, JITFunction]:
    """The launchable kernels of the Triton backend: every JIT function named ``*_kernel`` in its modules."""
    return {name: obj for module in KERNEL_MODULES for name, obj in vars(module).items()
            if isinstance(obj, JITFunction) and name.endswith("_kernel")}


# --- compiling instead of launching ----------------------------------------------------------------------
class StandInDriver:
    """Triton's driver as far as ``JITFunction.run`` and ``triton.compile`` ask it: a current CUDA target of
    compute capability ``arch`` (device index ``arch``, so every target has its own JIT cache) and stream 0.
    Nothing that loads or launches a binary is provided: the launches are compile-only (:func:`compile_only`)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclasses.dataclass
class Compiled:
    """One compiled specialisation of a kernel for one target, and what the checks read from it."""

    kernel: str
    arch: int
    variant: str  # pointer dtype and constexprs, e.g. "*bf16 BLOCK=4096 FREEZE=True ..."
    fusion: bool  # enable_fp_fusion (False as the launchers compile; True in the control)
    launches: int
    ptx_fma: int
    ptx_ftz: int
    sass_ffma: int | None  # FFMA / HFMA2 / DFMA in the SASS ptxas made (None: not disassembled, see _record)
    vector_loads: int  # ld.global.v2 / .v4 in the PTX
    registers: int
    local_bytes: int  # local memory per thread (spills, stack); Triton's n_spills is this / 4
    compile_s: float


def _variant(jit: JITFunction, kernel) -> str:
    """The data dtype (of the first argument when it is a pointer to floats) and the constexprs."""
    src = kernel.src
    first = src.signature.get(jit.arg_names[0])
    consts = {jit.arg_names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
    dtype = [first] if isinstance(first, str) and first.startswith("*") and first[1] in "fb" else []
    return " ".join(dtype + [f"{name}={consts[name]}" for name in jit.arg_names if name in consts])


def _cuobjdump() -> str:
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cubin_facts(cubin: bytes, sass: bool) -> tuple[int, int, int | None]:
    """(registers, local bytes, FFMA/HFMA2/DFMA count or None when ``sass`` is False) of the kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage"] + (["-sass"] if sass else []) + [f.name],
                             capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    regs, stack, local = (int(x) for x in found.groups())
    return regs, stack + local, len(re.findall(r"\b(?:FFMA|HFMA2|DFMA)\b", out)) if sass else None


class Recorder:
    """Wraps ``JITFunction.run`` (what ``kernel[grid](...)`` calls) so that a launch compiles and returns."""

    def __init__(self):
        self.compiled: dict[tuple[int, str], Compiled] = {}  # (arch, kernel hash) -> record
        self._seen: dict[int, tuple[int, str]] = {}  # id of a CompiledKernel -> its record's key
        self._disassembled: set[tuple] = set()
        self.arch = 0

    @contextlib.contextmanager
    def targeting(self, arch: int) -> Iterator[None]:
        """Launches inside compile for sm_``arch`` instead of running."""
        original = JITFunction.run
        recorder = self

        def run(jit, *args, grid, warmup, **kwargs):
            start = time.perf_counter()
            kernel = original(jit, *args, grid=grid, warmup=True, **kwargs)  # binds, specialises, compiles
            recorder._record(jit, kernel, time.perf_counter() - start)
            return kernel

        driver.set_active(StandInDriver(arch))
        JITFunction.run = run
        self.arch = arch
        try:
            yield
        finally:
            JITFunction.run = original
            driver.set_active(None)  # Triton's own driver again, created on its next use

    def _record(self, jit: JITFunction, kernel, seconds: float) -> None:
        key = self._seen.get(id(kernel))
        if key is not None:
            self.compiled[key].launches += 1
            return
        key = (self.arch, kernel.hash)
        self._seen[id(kernel)] = key
        ptx = kernel.asm["ptx"]
        variant = _variant(jit, kernel)
        # Disassembling takes about 0.5 s a kernel, most of this check's time if done for all: the SASS is
        # read for the first variant of each kernel, dtype and target (ptxas gets --fmad=false from
        # enable_fp_fusion=False; the PTX of every variant is checked).
        first = (self.arch, jit.__name__, variant.split(" ")[0], bool(kernel.metadata.enable_fp_fusion))
        regs, local, ffma = _cubin_facts(kernel.asm["cubin"], sass=first not in self._disassembled)
        self._disassembled.add(first)
        self.compiled[key] = Compiled(
            kernel=jit.__name__, arch=self.arch, variant=variant,
            fusion=bool(kernel.metadata.enable_fp_fusion), launches=1,
            ptx_fma=len(re.findall(r"\bfma\.", ptx)), ptx_ftz=len(re.findall(r"\.ftz\b", ptx)), sass_ffma=ffma,
            vector_loads=len(re.findall(r"\bld\.global(?:\.\w+)*\.v[24]\.", ptx)), registers=regs,
            local_bytes=local, compile_s=round(seconds, 3))


@contextlib.contextmanager
def triton_on_cpu_tensors() -> Iterator[None]:
    """Let backend="triton" take CPU tensors (otherwise only in Triton's interpreter) and address separate
    written tensors through pointer tables (otherwise only on CUDA): the launches only compile."""
    probe, tables = backends.PROBE, triton_sgd_step.pointer_tables_usable
    backends.PROBE = dataclasses.replace(probe, triton_interpret=True)
    triton_sgd_step.pointer_tables_usable = lambda device: triton_sgd_step.POINTER_TABLES
    try:
        yield
    finally:
        backends.PROBE, triton_sgd_step.pointer_tables_usable = probe, tables


# --- the calls ------------------------------------------------------------------------------------------
# One tensor above the bracket cutoff (sampling bracket), small ones (radix path); several chunks each.
SIZES = (max(triton_rgp_mask.BRACKET_MIN, 4 * triton_rgp_mask.SAMPLE_TILE * triton_rgp_mask.SAMPLE_TILES) + 4099,
         3 * triton_rgp_mask.BLOCK + 17, 300)


def _list(dtype: torch.dtype, flat: bool) -> list[torch.Tensor]:
    """Tensors of SIZES: views of one buffer (``flat``) or separate allocations."""
    if flat:
        return list(torch.zeros(sum(SIZES), dtype=dtype).split(SIZES))
    return [torch.zeros(n, dtype=dtype) for n in SIZES]


def calls(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) for every op and variant on ``dtype`` tensors."""
    common = dict(alpha=0.1, p=0.3, backend="triton")
    for flat in (True, False):
        layout = "flat" if flat else "separate"
        yield (f"rgp_mask_ {layout}",
               lambda flat=flat: ck.rgp_mask_(_list(dtype, flat), _list(dtype, flat), _list(dtype, flat), **common))
        yield f"rgp_select {layout}", lambda flat=flat: ck.rgp_select(_list(dtype, flat), _list(dtype, flat), **common)
        yield (f"revise_ {layout}",
               lambda flat=flat: ck.revise_(_list(dtype, flat), _list(dtype, flat), decay=0.999, backend="triton"))
    # The fused step: the gradients flat (ProminenceMasker's buffers); params, buffers, revision as given.
    layouts = {"trainer": (True, False), "flat": (True, True), "separate": (False, False)}
    for mode in ("grad", "update"):
        for revise in (False, True):
            for skip in (False, True):
                for given in (False, True):
                    for name, (grads_flat, state_flat) in layouts.items():
                        if name != "trainer" and (given or mode == "grad" or skip != revise):
                            continue  # the other layouts (INDIRECT bits): with and without revision

                        def step(mode=mode, revise=revise, skip=skip, given=given, grads_flat=grads_flat,
                                 state_flat=state_flat):
                            nat, adv = _list(dtype, grads_flat), _list(dtype, grads_flat)
                            extra = {}
                            if given:
                                extra["thresholds"], extra["nonfinite"] = ck.rgp_select(nat, adv, **common)
                            return ck.rgp_sgd_step_(
                                _list(dtype, state_flat), _list(dtype, grads_flat), nat, adv,
                                _list(dtype, state_flat), lr=0.1, momentum=0.9, weight_decay=5e-4, mask_mode=mode,
                                revision=_list(dtype, state_flat) if revise else None, decay=0.999,
                                skip=torch.zeros(1, dtype=torch.int32) if skip else None, **common, **extra)

                        yield (f"rgp_sgd_step_ {name} mask_mode={mode} revision={revise} skip={skip} "
                               f"thresholds={'given' if given else 'selected'}"), step


def run_all(archs: list[int]) -> tuple[Recorder, list[str], dict]:
    recorder = Recorder()
    failures: list[str] = []
    calls_made = 0
    with triton_on_cpu_tensors():
        for arch in archs:
            with recorder.targeting(arch):
                for digits in DIGIT_WIDTHS:
                    triton_rgp_mask.RADIX_DIGITS = digits
                    for dtype in DTYPES:
                        for label, call in calls(dtype):
                            if digits != DIGIT_WIDTHS[0] and not label.startswith(("rgp_mask_ flat", "rgp_select")):
                                continue  # the digit widths concern the selection only
                            calls_made += 1
                            try:
                                call()
                            except Exception as exc:  # noqa: BLE001  (recorded; the other calls still run)
                                tb = traceback.format_exc(limit=-3)
                                failures.append(f"sm_{arch} {dtype} digits {digits} {label}: does not compile: "
                                                f"{type(exc).__name__}: {exc}\n{tb}")
                # The control: with contraction allowed, fma must appear (so the checks below can see it).
                options = triton_rgp_mask._STREAM_OPTIONS
                options["enable_fp_fusion"] = True
                try:
                    for label, call in calls(torch.float32):
                        if label in ("rgp_mask_ flat", "rgp_sgd_step_ flat mask_mode=update revision=True skip=True "
                                                       "thresholds=selected"):
                            call()
                finally:
                    options["enable_fp_fusion"] = False
            triton_rgp_mask.RADIX_DIGITS = triton_rgp_mask._radix_digits(triton.__version__)
    return recorder, failures, {"calls": calls_made}


def check(recorder: Recorder, archs: list[int]) -> list[str]:
    failures = []
    records = list(recorder.compiled.values())
    exact = [r for r in records if not r.fusion]
    for r in exact:
        where = f"sm_{r.arch} {r.kernel} [{r.variant}]"
        if r.ptx_fma or r.sass_ffma:  # (None: not disassembled)
            failures.append(f"{where}: {r.ptx_fma} fma in the PTX, {r.sass_ffma} FFMA/HFMA2/DFMA in the SASS "
                            f"(the contract rounds every product and sum; launch with enable_fp_fusion=False)")
        if r.ptx_ftz:
            failures.append(f"{where}: {r.ptx_ftz} .ftz instructions in the PTX (subnormals must not be flushed)")
        if r.kernel not in CEILINGS:
            failures.append(f"{where}: no entry in CEILINGS ({r.registers} registers, {r.local_bytes} B local)")
            continue
        max_regs, max_local = CEILINGS[r.kernel]
        if r.registers > max_regs:
            failures.append(f"{where}: {r.registers} registers per thread, above its ceiling of {max_regs}")
        if r.local_bytes > max_local:
            failures.append(f"{where}: {r.local_bytes} B of local memory per thread (spills), above its ceiling "
                            f"of {max_local} B")
    for arch in archs:
        mine = [r for r in exact if r.arch == arch]
        missing = sorted(set(jit_kernels()) - {r.kernel for r in mine})
        if missing:
            failures.append(f"sm_{arch}: never launched: {', '.join(missing)}")
        for r in mine:
            if r.kernel in VECTOR_KERNELS and r.vector_loads == 0:
                failures.append(f"sm_{arch} {r.kernel} [{r.variant}]: no vector loads in the PTX (its full chunks "
                                f"should load ld.global.v2/v4)")
        controls = [r for r in records if r.fusion and r.arch == arch]
        for name in ("_mask_kernel", "_sgd_step_kernel"):
            if not any(r.kernel == name and r.ptx_fma > 0 and r.sass_ffma for r in controls):
                failures.append(f"sm_{arch}: the control {name} compiled with enable_fp_fusion=True shows no fma in "
                                f"its PTX or no FFMA in its SASS: the checks cannot see contraction")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--json", help="write the report (every compiled kernel, the failures) to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    recorder, failures, info = run_all(args.arch)
    failures += check(recorder, args.arch)
    records = sorted(recorder.compiled.values(), key=lambda r: (r.arch, r.kernel, r.fusion, r.variant))
    print(f"Triton {triton.__version__}: {info['calls']} op calls, {len(records)} compiled kernels "
          f"in {time.perf_counter() - start:.0f}s")
    print(f"{'arch':>5} {'kernel':<18} {'regs':>4} {'local':>5} {'fma':>3} {'v4':>3} {'launches':>8}  variant")
    for r in records:
        print(f"sm_{r.arch:<2} {r.kernel:<18} {r.registers:>4} {r.local_bytes:>5} {r.ptx_fma:>3} {r.vector_loads:>3} "
              f"{r.launches:>8}  {r.variant}{'  (control: fp fusion)' if r.fusion else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "archs": args.arch, "calls": info["calls"],
                       "compiled": [dataclasses.asdict(r) for r in records], "failures": failures,
                       "ceilings": CEILINGS}, f, indent=1)
    for failure in failures:
        print("FAILED:", failure)
    print("ok" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
