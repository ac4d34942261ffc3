"""The benchmarks of bench/gpu_check.sh: mask pass, fused step, and a CURE-versus-TRADES training step.

Subcommands (each writes one CSV under --out, named with the GPU, row by row as it is measured and flushed,
so a crash or a time cap keeps what was measured; the file is rewritten complete at the end of the part):

  correctness  every fast backend on the device (triton, cuda; in a dry run also the torch backend, standing in
          for them) against the torch backend, bit for bit: rgp_mask_, rgp_select, rgp_sgd_step_ (grad
          mode with revision; update mode with skip; the apply pass given rgp_select's thresholds) and
          revise_, on the parameter lists of ResNet-18, WRN-34-10 and one tensor above 2^24 elements, in
          float32 and bfloat16, random and with 30 % exact zeros. One row per case: provider, case, op,
          dtype, data, ok, detail.
  mask    rgp mask pass over the gradients of ResNet-18, WRN-34-10 and a list holding one tensor above
          2^24 elements; random gradients, and gradients with 30 % exact zeros. Providers: official
          (per tensor: score to the host, numpy.percentile), every PyTorch baseline on the device
          (kthvalue, sort, quantile; the fastest is marked torch-best), cure-triton, cure-cuda.
          Every provider's mask is compared with the reference's (exact column).
  step    the fused step (mask + SGD with momentum and weight decay + revision EMA) against the same
          work done with the official mask or the best PyTorch mask followed by torch's fused/foreach
          SGD and a foreach EMA; cure-triton and cure-cuda checked bit for bit against the reference op.
          cure-triton-apply and cure-cuda-apply: the fused step given the thresholds of rgp_select
          (computed once, untimed): the apply pass alone, what a CURE step on CUDA waits for after its
          last backward pass when the selection overlaps that pass.
  train   one training step of CURE and of TRADES on ResNet-18, CIFAR-shaped synthetic batches
          (bench/bench_step.py's round-robin timing), and their ratio.

Gradients (g_nat, g_adv, the update) are views of flat buffers, as cure_kernels.ProminenceMasker keeps
them; params, momentum buffers and revision are separate tensors, as a model's are.

GPU times: CUDA events around the kernels only, L2 flushed (256 MB written) before every repetition,
after warm-up (bench/gpu_timing.py); host time reported separately. GB/s counts 16 B/param for the mask
(read g_nat, g_adv and the update, write it) and 40 B/param for the fused step with revision (read
g_nat, g_adv, g, param, buf, rev; write g, param, buf, rev).

--dry-run: tiny shapes on the CPU (Triton in its interpreter when TRITON_INTERPRET=1), one repetition:
checks every step end to end without a GPU.

Usage:  python bench/gpu_check.py PART [PART ...] [--out DIR] [--dry-run] [--reps N] [--budget S]
        (PART: correctness, mask, step, train; --budget: seconds per part, after which its remaining
        configurations are recorded as not run; the exit status is nonzero if a case of ours failed or was
        not exact)
Environment: GPU_CHECK_FAIL_PROVIDER=NAME makes backend NAME raise wherever this script calls it (checks
that one failing provider leaves the other rows written: tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cure_kernels as ck  # noqa: E402
from bench import bench_mask  # noqa: E402
from bench.common import environment, print_table  # noqa: E402
from bench.gpu_timing import L2Flusher, gpu_name, time_gpu  # noqa: E402
from cure_kernels import reference  # noqa: E402
from cure_kernels.sgd_step import rgp_sgd_step_reference  # noqa: E402

ALPHA, P = bench_mask.ALPHA, bench_mask.P
LR, MOMENTUM, WD, DECAY = 0.1, 0.9, 5e-4, 0.999
MASK_BYTES, STEP_BYTES = 16, 40
TORCH_BASELINES = ("torch-kthvalue", "torch-sort", "torch-quantile")
DRY_SHAPES = {"resnet18": [(16, 3, 3, 3), (16,), (10, 16)], "wrn-34-10": [(32, 16, 3, 3), (32,)],
              "large": [(3 * 4096 + 5,), (7,)]}


def _shapes(model: str, dry: bool) -> list[tuple[int, ...]]:
    return DRY_SHAPES[model] if dry else bench_mask.param_shapes(model)


def _flat_views(values: list[torch.Tensor], device) -> list[torch.Tensor]:
    """``values`` copied into one flat buffer on ``device``, returned as views of it in order: the layout
    of cure_kernels.ProminenceMasker's gradient buffers, which the kernels read with zero copies."""
    flat = torch.cat([v.reshape(-1) for v in values]).to(device)
    return [piece.view(v.shape) for piece, v in zip(flat.split([v.numel() for v in values]), values)]


def _gradients(shapes, device, zeros: float, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """g_nat, g_adv (views of two flat buffers): normal, with a fraction ``zeros`` of the entries exactly 0
    in both (dead units)."""
    gen = torch.Generator().manual_seed(seed)
    nat, adv = [], []
    for s in shapes:
        a, b = torch.randn(s, generator=gen), torch.randn(s, generator=gen)
        if zeros:
            dead = torch.rand(s, generator=gen) < zeros
            a[dead] = 0
            b[dead] = 0
        nat.append(a)
        adv.append(b)
    return _flat_views(nat, device), _flat_views(adv, device)


def _our_backends(device: torch.device) -> list[str]:
    return [b for b in ("triton", "cuda") if b in ck.available_backends(device)]


class CsvRows:
    """A CSV under ``out_dir`` written row by row and flushed after each row: whatever was measured before a
    crash or a time cap is on disk. :meth:`finish` rewrites it complete (columns derived at the end)."""

    def __init__(self, out_dir: str, name: str, fields: list[str]):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, name)
        self.fields = list(fields)
        self._fh = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fields, restval="")
        self._writer.writeheader()
        self._fh.flush()

    def add(self, row: dict) -> dict:
        new = [k for k in row if k not in self.fields]
        if new:
            raise KeyError(f"{self.path}: columns {new} are not among the declared fields {self.fields}")
        self._writer.writerow(row)
        self._fh.flush()
        return row

    def finish(self, rows: list[dict]) -> str:
        self._fh.close()
        fields = list(dict.fromkeys(self.fields + [k for r in rows for k in r]))
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        return self.path


def _injected_failure(backend: str) -> None:
    """Raise when GPU_CHECK_FAIL_PROVIDER names ``backend`` (tests: one failing provider, the rest recorded)."""
    if os.environ.get("GPU_CHECK_FAIL_PROVIDER") == backend:
        raise RuntimeError(f"injected failure of backend {backend!r} (GPU_CHECK_FAIL_PROVIDER)")


def _timed(fn, device, *, reps, warmup, setup, flusher):
    """time_gpu, or (None, the error as a note) when it raises (an illegal access, a timeout of ours...)."""
    try:
        return time_gpu(fn, device, reps=reps, warmup=warmup, setup=setup, flusher=flusher), None
    except Exception as exc:  # noqa: BLE001  (recorded in the row; the next rows still run)
        return None, f"timing failed: {type(exc).__name__}: {exc}".split("\n")[0][:160]


def _row(common: dict, provider: str, t, n_params: int, nbytes: int, **extra) -> dict:
    if t is None:  # timing failed: the note says why
        return {**common, "provider": provider, **extra}
    return {**common, "provider": provider, "gpu_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
            "host_ms": t.host_ms, "reps": t.reps, "GB/s": n_params * nbytes / (t.median_ms * 1e-3) / 1e9, **extra}


def _mark_best_torch(rows: list[dict]) -> None:
    timed = [r for r in rows if r["provider"] in TORCH_BASELINES and r.get("gpu_ms") and r.get("exact")]
    if timed:
        best = min(timed, key=lambda r: r["gpu_ms"])
        rows.append({**best, "provider": "torch-best", "note": best["provider"]})
    official = next((r["gpu_ms"] for r in rows if r["provider"] == "official" and r.get("gpu_ms")), None)
    best_ms = min((r["gpu_ms"] for r in timed), default=None)
    for r in rows:
        if r.get("gpu_ms"):
            r["vs official"] = official / r["gpu_ms"] if official else None
            r["vs torch-best"] = best_ms / r["gpu_ms"] if best_ms else None


def _out_of_time(deadline: float, common: dict, rows: list[dict], env: dict, sink: CsvRows) -> bool:
    if time.perf_counter() < deadline:
        return False
    rows.append(sink.add({**common, "provider": "-", "note": "not run: time budget spent", **env}))
    print(f"  {common}: not run, time budget spent", file=sys.stderr)
    return True


def bench_mask_pass(device: torch.device, models: list[str], reps: int, dry: bool, env: dict,
                    flusher: L2Flusher, deadline: float, sink: CsvRows) -> list[dict]:
    rows = []
    for model in models:
        shapes = _shapes(model, dry)
        n_params = sum(math.prod(s) for s in shapes)
        for zeros in (0.0, 0.3):
            common = {"bench": "mask", "model": model, "params_M": n_params / 1e6, "tensors": len(shapes),
                      "zeros": zeros}
            if _out_of_time(deadline, common, rows, env, sink):
                continue
            nat, adv = _gradients(shapes, device, zeros, seed=1)
            gen = torch.Generator().manual_seed(2)
            original = [torch.randn(s, generator=gen).to(device) for s in shapes]
            updates = _flat_views(original, device)  # the update gradients: the masker's third flat buffer
            expected = [o.clone() for o in original]
            reference.rgp_mask_reference(expected, nat, adv, ALPHA, P)

            def restore(updates=updates, original=original):
                torch._foreach_copy_(updates, original)

            providers = {name: bench_mask.BASELINES[name] for name in ("official",) + TORCH_BASELINES}
            providers |= {f"cure-{b}": functools.partial(_mask_with, b) for b in _our_backends(device)}
            group = []
            for name, fn in providers.items():
                try:
                    restore()
                    fn(updates, nat, adv)
                except RuntimeError as exc:  # torch.quantile above 2^24 elements (a baseline's own limit)
                    failed = name.startswith("cure-")
                    group.append(sink.add({**common, "provider": name, "note": str(exc).split("\n")[0][:120],
                                           **({"exact": False} if failed else {}), **env}))
                    continue
                except Exception as exc:  # one of ours failed: reported (exit status), the others still run
                    group.append(sink.add({**common, "provider": name, "exact": False,
                                           "note": f"{type(exc).__name__}: {exc}".split("\n")[0][:120], **env}))
                    continue
                exact = all(torch.equal(u, e) for u, e in zip(updates, expected))
                n_reps = max(1, min(reps, 3)) if name == "official" else reps
                warm = 0 if dry or name == "official" else 3  # the exactness run above compiled and warmed up
                t, note = _timed(functools.partial(fn, updates, nat, adv), device, reps=n_reps, warmup=warm,
                                 setup=restore, flusher=flusher)
                extra = {"exact": exact} if note is None else {"exact": exact, "note": note}
                if name == "cure-triton" and note is None:
                    extra["bracket_tensors"], extra["bracket_misses"] = _triton_misses()
                group.append(sink.add(_row(common, name, t, n_params, MASK_BYTES, **extra, **env)))
                print(f"  mask {model:10s} zeros={zeros:.1f} {name:15s} "
                      + (f"{t.median_ms:9.3f} ms (host {t.host_ms:.3f} ms)" if t else note) + f" exact={exact}",
                      file=sys.stderr)
            _mark_best_torch(group)
            if group and group[-1]["provider"] == "torch-best":
                sink.add({k: v for k, v in group[-1].items() if not k.startswith("vs ")})
            rows += group
    return rows


def _mask_with(backend: str, updates, nat, adv):
    _injected_failure(backend)
    return ck.rgp_mask_(updates, nat, adv, alpha=ALPHA, p=P, backend=backend)


def _triton_misses() -> tuple[int, int]:
    from cure_kernels import triton_rgp_mask

    return triton_rgp_mask.last_bracket_misses()


def _torch_sgd_ema(params, grads, bufs, revs) -> None:
    """torch's SGD (fused where the device has it, else foreach) then the revision EMA with foreach ops."""
    torch.optim._functional.sgd(params, grads, bufs, weight_decay=WD, momentum=MOMENTUM, lr=LR, dampening=0.0,
                                nesterov=False, maximize=False, foreach=params[0].device.type == "cpu",
                                fused=params[0].device.type == "cuda")
    torch._foreach_mul_(revs, DECAY)
    torch._foreach_add_(revs, params, alpha=1 - DECAY)


def bench_fused_step(device: torch.device, models: list[str], reps: int, dry: bool, env: dict,
                     flusher: L2Flusher, deadline: float, sink: CsvRows) -> list[dict]:
    rows = []
    for model in models:
        shapes = _shapes(model, dry)
        n_params = sum(math.prod(s) for s in shapes)
        for zeros in (0.0, 0.3):
            common = {"bench": "step", "model": model, "params_M": n_params / 1e6, "tensors": len(shapes),
                      "zeros": zeros}
            if _out_of_time(deadline, common, rows, env, sink):
                continue
            nat, adv = _gradients(shapes, device, zeros, seed=3)
            gen = torch.Generator().manual_seed(4)
            state0 = [[(torch.randn(s, generator=gen) * scale).to(device) for s in shapes]
                      for scale in (1.0, 1.0, 0.1, 1.0)]  # params, grads, momentum buffers, revision
            # Params, momentum buffers and revision: separate tensors, as a model's are; grads: one flat buffer.
            work = [_flat_views(ts, device) if i == 1 else [t.clone() for t in ts] for i, ts in enumerate(state0)]

            def restore(work=work, state0=state0):
                for dst, src in zip(work, state0):
                    torch._foreach_copy_(dst, src)

            expected = [[t.clone() for t in ts] for ts in state0]
            q, g, v, r = expected
            rgp_sgd_step_reference(q, g, nat, adv, v, r, LR, MOMENTUM, WD, ALPHA, P, "grad", DECAY)

            def ours(backend, work=work, nat=nat, adv=adv):
                _injected_failure(backend)
                q, g, v, r = work
                ck.rgp_sgd_step_(q, g, nat, adv, v, lr=LR, momentum=MOMENTUM, weight_decay=WD, alpha=ALPHA, p=P,
                                 revision=r, decay=DECAY, backend=backend)

            def apply_only(backend, given, work=work, nat=nat, adv=adv):
                # What remains after the last backward pass when the selection ran on a side stream during it.
                _injected_failure(backend)
                if isinstance(given, Exception):
                    raise given
                q, g, v, r = work
                ck.rgp_sgd_step_(q, g, nat, adv, v, lr=LR, momentum=MOMENTUM, weight_decay=WD, alpha=ALPHA, p=P,
                                 revision=r, decay=DECAY, thresholds=given[0], nonfinite=given[1], backend=backend)

            def unfused(mask_fn, work=work, nat=nat, adv=adv):
                q, g, v, r = work
                mask_fn(g, nat, adv)
                _torch_sgd_ema(q, g, v, r)

            providers = {"official+torch-sgd": functools.partial(unfused, bench_mask.BASELINES["official"])}
            providers |= {f"{b}+torch-sgd": functools.partial(unfused, bench_mask.BASELINES[b])
                          for b in ("torch-kthvalue", "torch-sort")}
            providers |= {f"cure-{b}": functools.partial(ours, b) for b in _our_backends(device)}
            for b in _our_backends(device):
                try:
                    given = ck.rgp_select(nat, adv, alpha=ALPHA, p=P, backend=b)
                except Exception as exc:  # noqa: BLE001  (recorded below as that provider's failure)
                    given = exc
                providers[f"cure-{b}-apply"] = functools.partial(apply_only, b, given)
            for name, fn in providers.items():
                try:
                    restore()
                    fn()
                except Exception as exc:  # a provider that fails is reported, the others still run
                    rows.append(sink.add({**common, "provider": name, "exact": False,
                                          "note": f"{type(exc).__name__}: {exc}".split("\n")[0][:120], **env}))
                    print(f"  step {model} {name} FAILED: {exc}", file=sys.stderr)
                    continue
                # Ours must match the reference op bit for bit; the unfused baselines round their own way.
                exact = all(torch.equal(a.view(torch.int32), b.view(torch.int32))
                            for xs, ys in zip(work, expected) for a, b in zip(xs, ys))
                n_reps = max(1, min(reps, 3)) if name.startswith("official") else reps
                warm = 0 if dry or name.startswith("official") else 3
                t, note = _timed(fn, device, reps=n_reps, warmup=warm, setup=restore, flusher=flusher)
                extra = {"exact": exact} if name.startswith("cure-") else {"exact": None}
                if note is not None:
                    extra["note"] = note
                rows.append(sink.add(_row(common, name, t, n_params, STEP_BYTES, **extra, **env)))
                print(f"  step {model:10s} zeros={zeros:.1f} {name:22s} "
                      + (f"{t.median_ms:9.3f} ms (host {t.host_ms:.3f} ms)" if t else note)
                      + f" exact={extra['exact']}", file=sys.stderr)
    return rows


def bench_train(device: torch.device, steps: int, dry: bool, env: dict) -> list[dict]:
    from bench import bench_step

    arch, dataset, batch = ("cnn", "fashion-mnist", 8) if dry else ("resnet18", "cifar10", 128)
    t0 = time.perf_counter()
    rows = bench_step.time_variants(["trades", "cure"], arch, dataset, device, batch, steps, 1 if dry else 5, False)
    by = {r["provider"]: r["median_ms"] for r in rows}
    for r in rows:
        r["bench"] = "train"
        r["vs trades"] = r["median_ms"] / by["trades"]
        r.update(env)
    print(f"  train {arch}: cure/trades = {by['cure'] / by['trades']:.3f} ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr)
    return rows


# --- correctness: every fast backend against the torch backend, bit for bit ------------------------------
CORRECTNESS_FIELDS = ["provider", "case", "op", "dtype", "data", "ok", "detail"]
CORRECTNESS_OPS = ("rgp_mask_", "rgp_select", "rgp_sgd_step_ grad+revision", "rgp_sgd_step_ update+skip",
                   "rgp_sgd_step_ apply (given thresholds)", "revise_")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _differences(got: list[torch.Tensor], want: list[torch.Tensor], names: list[str]) -> str:
    """'' when every tensor of ``got`` has the bits of ``want``; else where they differ, briefly."""
    for name, a, b in zip(names, got, want):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{name}: {a.dtype}{tuple(a.shape)} instead of {b.dtype}{tuple(b.shape)}"
        diff = _bits(a) != _bits(b)
        if bool(diff.any()):
            first = int(diff.reshape(-1).nonzero()[0])
            return (f"{name}: {int(diff.sum())} of {a.numel()} differ, first at {first}: "
                    f"{a.reshape(-1)[first].item()!r} instead of {b.reshape(-1)[first].item()!r}")
    return ""


def _run_op(op: str, backend: str, shapes, dtype, zeros: float, device) -> tuple[list[torch.Tensor], list[str]]:
    """The op on fresh, seeded inputs (the same for every backend); every output and written tensor."""
    nat, adv = _gradients(shapes, device, zeros, seed=11)
    nat, adv = _flat_views([t.to(dtype) for t in nat], device), _flat_views([t.to(dtype) for t in adv], device)
    gen = torch.Generator().manual_seed(12)
    state = [[(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in shapes]
             for scale in (1.0, 1.0, 0.1, 1.0)]  # params, grads, momentum buffers, revision
    params, grads, bufs, revs = state
    grads = _flat_views(grads, device)  # as ProminenceMasker keeps them; params etc. separate, as a model's
    common = dict(alpha=ALPHA, p=P, backend=backend)
    step = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD, **common)
    if op == "rgp_mask_":
        stats = ck.rgp_mask_(grads, nat, adv, **common)
        return [*stats, *grads], ["thresholds", "kept", "nonfinite"] + [f"update[{i}]" for i in range(len(grads))]
    if op == "rgp_select":
        return list(ck.rgp_select(nat, adv, **common)), ["thresholds", "nonfinite"]
    if op == "revise_":
        ck.revise_(revs, params, decay=DECAY, backend=backend)
        return revs, [f"revision[{i}]" for i in range(len(revs))]
    if op == "rgp_sgd_step_ grad+revision":
        stats = ck.rgp_sgd_step_(params, grads, nat, adv, bufs, mask_mode="grad", revision=revs, decay=DECAY, **step)
    elif op == "rgp_sgd_step_ update+skip":
        stats = ck.rgp_sgd_step_(params, grads, nat, adv, bufs, mask_mode="update",
                                 skip=torch.zeros(1, dtype=torch.int32, device=device), **step)
    else:
        thresholds, nonfinite = ck.rgp_select(nat, adv, **common)
        stats = ck.rgp_sgd_step_(params, grads, nat, adv, bufs, revision=revs, decay=DECAY, thresholds=thresholds,
                                 nonfinite=nonfinite, **step)
    lists = {"param": params, "grad": grads, "momentum": bufs, "revision": revs}
    return ([*stats] + [t for ts in lists.values() for t in ts],
            ["thresholds", "kept", "nonfinite"] + [f"{k}[{i}]" for k, ts in lists.items() for i in range(len(ts))])


def check_correctness(device: torch.device, models: list[str], dry: bool, sink: CsvRows, deadline: float
                      ) -> list[dict]:
    providers = _our_backends(device)
    if dry:  # the torch backend stands in for a fast one (trivially exact): the rows and the CSV are what is checked
        providers.append("torch")
    print(f"correctness: {providers} against the torch backend", file=sys.stderr)
    rows = []
    for model in models:
        shapes = _shapes(model, dry)
        for dtype in (torch.float32, torch.bfloat16):
            for zeros in (0.0, 0.3):
                data = "30% zeros" if zeros else "random"
                for op in CORRECTNESS_OPS:
                    base = {"case": model, "op": op, "dtype": str(dtype).removeprefix("torch."), "data": data}
                    if time.perf_counter() > deadline:
                        rows.append(sink.add({"provider": "-", **base, "ok": False,
                                              "detail": "not run: time budget spent"}))
                        continue
                    try:
                        want, names = _run_op(op, "torch", shapes, dtype, zeros, device)
                    except Exception as exc:  # noqa: BLE001  (the oracle itself failed: every provider's row says so)
                        want, oracle_error = None, f"the torch backend raised {type(exc).__name__}: {exc}"
                    for provider in providers:
                        try:
                            if want is None:
                                raise RuntimeError(oracle_error)
                            _injected_failure(provider)
                            got, _ = _run_op(op, provider, shapes, dtype, zeros, device)
                            if device.type == "cuda":
                                torch.cuda.synchronize(device)  # an asynchronous fault shows here, in this row
                            detail = _differences(got, want, names)
                        except Exception as exc:  # noqa: BLE001  (recorded; the next cases still run)
                            detail = f"{type(exc).__name__}: {exc}".split("\n")[0][:200]
                        row = sink.add({"provider": provider, **base, "ok": not detail, "detail": detail})
                        rows.append(row)
                        if detail:
                            print(f"  {provider} {model} {op} {base['dtype']} {data}: {detail}", file=sys.stderr)
    return rows


MASK_COLUMNS = ["model", "zeros", "provider", "gpu_ms", "host_ms", "GB/s", "vs official", "vs torch-best", "exact",
                "bracket_misses", "note"]
STEP_COLUMNS = ["model", "zeros", "provider", "gpu_ms", "host_ms", "GB/s", "exact", "note"]
TRAIN_COLUMNS = ["provider", "arch", "batch", "median_ms", "p20_ms", "p80_ms", "images/s", "vs trades"]
_BENCH_FIELDS = ["bench", "model", "params_M", "tensors", "zeros", "provider", "gpu_ms", "p20_ms", "p80_ms", "host_ms",
                 "reps", "GB/s", "exact"]
FIELDS = {"correctness": CORRECTNESS_FIELDS,
          "mask": _BENCH_FIELDS + ["bracket_tensors", "bracket_misses", "note"],
          "step": _BENCH_FIELDS + ["note"],
          "train": ["bench", "provider", "arch", "batch", "median_ms", "p20_ms", "p80_ms", "images/s", "vs trades"]}


def run_part(what: str, args: argparse.Namespace, device: torch.device, env: dict, flusher: L2Flusher) -> bool:
    """One part; writes its CSV (row by row) and prints its table. False if a case of ours failed."""
    dry = args.dry_run
    deadline = time.perf_counter() + args.budget
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sink = CsvRows(args.out, f"gpu_check_{what}_{gpu_name(device)}.csv",
                   FIELDS[what] + ([] if what == "correctness" else list(env)))
    if what == "correctness":
        rows = check_correctness(device, models, dry, sink, deadline)
        columns = CORRECTNESS_FIELDS
    elif what == "mask":
        rows = bench_mask_pass(device, models, args.reps or (1 if dry else 20), dry, env, flusher, deadline, sink)
        columns = MASK_COLUMNS
    elif what == "step":
        rows = bench_fused_step(device, models, args.reps or (1 if dry else 10), dry, env, flusher, deadline, sink)
        columns = STEP_COLUMNS
    else:
        rows = bench_train(device, args.steps or (1 if dry else 10), dry, env)
        columns = TRAIN_COLUMNS
    path = sink.finish(rows)
    print(f"\n{what} on {env['machine']} (torch {env['torch']}, triton {env['triton']}, git {env['git_sha']})")
    print_table(rows, columns)
    print(f"wrote {path}")
    bad = sorted({r["provider"] for r in rows
                  if r.get("exact") is False or r.get("ok") is False
                  or (str(r.get("provider", "")).startswith("cure-") and str(r.get("note", "")).startswith("timing"))})
    if bad:
        print(f"FAILED in {what}: {bad}", file=sys.stderr)
    return not bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=("correctness", "mask", "step", "train"))
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "results"), help="directory of the CSVs (default: $OUT if set, else bench/results)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, one repetition")
    parser.add_argument("--models", default="resnet18,wrn-34-10,large")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions (default 20 for mask, 10 for step; 1 in a dry run)")
    parser.add_argument("--steps", type=int, default=None, help="train: timed steps (default 10; 1 in a dry run)")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds per part (default: no limit)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if not args.dry_run and device.type != "cuda":
        parser.error("no CUDA GPU here; use --dry-run to check the script on the CPU")
    env = environment(device)
    print(f"backends on {device}: {ck.available_backends(device)}", file=sys.stderr)
    flusher = L2Flusher(device)
    ok = True
    for what in args.parts:
        t0 = time.perf_counter()
        try:
            ok &= run_part(what, args, device, env, flusher)
        except Exception as exc:  # report, and still run the other parts
            import traceback

            traceback.print_exc()
            print(f"{what} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            ok = False
        print(f"[{what}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
