"""Reproduce the Inductor cache bug behind ``cure.device.pin_inductor_cpu_isa`` (torch 2.14.1, x86-64 with AVX-512).

    .venv/bin/python scripts/repro_inductor_isa_cache.py          # compiled output is garbage in the 2nd process
    .venv/bin/python scripts/repro_inductor_isa_cache.py --pin    # with the workaround: both processes agree

Two processes compile the same small CNN (conv-BN-ReLU-max-pool twice, two linear layers; inference, eval
mode) with ``torch.compile`` on the CPU and one fresh ``TORCHINDUCTOR_CACHE_DIR``: the first with the
machine's ATen capability (AVX-512), the second with ``ATEN_CPU_CAPABILITY=avx2``. The second hits the FX-graph
cache entry of the first, whose C++ was generated for 16-float vectors, and rebuilds it with the AVX2 flags
(8-float vectors); its output differs from eager mode by huge values or NaN. ``--pin`` sets
``torch._inductor.config.cpp.simdlen`` to the width Inductor picks, which puts the width into the cache key.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import os, sys, torch, torch.nn as nn
torch.manual_seed(0)
if sys.argv[1] == "pin" and os.environ.get("ATEN_CPU_CAPABILITY"):  # as cure.device.pin_inductor_cpu_isa
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    config.cpp.simdlen = pick_vec_isa().bit_width()
net = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
x = torch.rand(32, 1, 28, 28)
with torch.no_grad():
    diff = (net(x) - torch.compile(net)(x)).abs().max().item()
print(f"{torch.backends.cpu.get_cpu_capability()}: max |eager - compiled| = {diff:.3g}")
sys.exit(0 if diff < 1e-4 else 1)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pin", action="store_true", help="apply the workaround (cpp.simdlen pinned)")
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as cache:
        for capability in (None, "avx2"):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
            env.pop("ATEN_CPU_CAPABILITY", None)
            if capability:
                env["ATEN_CPU_CAPABILITY"] = capability
            done = subprocess.run([sys.executable, "-c", CHILD, "pin" if args.pin else "plain"], env=env,
                                  capture_output=True, text=True)
            print(done.stdout.strip() or done.stderr.strip().splitlines()[-1])
            failed |= done.returncode != 0
    print("compiled and eager disagree" if failed else "compiled and eager agree in both processes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
