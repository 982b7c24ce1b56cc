"""Repeatability and accuracy of the latency breakdown: profile the same models twice, print
the spread of category shares and how the sum of per-op times compares with the separately
measured whole-model latency.

    python benchmarks/profile_repeatability.py mobilevit_xxs levit_128 --runtime torch
    python benchmarks/profile_repeatability.py --families --runtime onnxruntime --layout both

The spread is, per category, |share in run 1 - share in run 2| in percentage points (bar:
<= 2 pp for every category); "ops vs e2e" is 100 * (sum of ops / e2e - 1) of each run (bar:
within +-10% for onnxruntime and torch). Each row ends with whether it meets its bars, and the
last lines give the ranges. These are timing results, so they are measured here rather than
asserted in the test suite: on a shared machine they move with the neighbours' load, and the
load is part of what the printout should be read with.

`--fragmented-heap` profiles from a process whose heap has been fragmented on purpose (a long
test run, a notebook): onnxruntime's profiler cost follows the heap it runs in, which is why
its runner measures in a fresh interpreter. Nothing is written to latency_tables/.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes

import numpy as np

from mobilehv.profile import RUNTIMES, profile
from mobilehv.profile.records import share_spread
from mobilehv.registry import smallest_per_family

OPS_BOUND = {"onnxruntime": 10.0, "torch": 10.0}  # runtimes whose sum of ops must match e2e
SPREAD_BOUND = 2.0


@contextlib.contextmanager
def fragmented_heap(blocks: int = 2_000_000):
    """Every other one of `blocks` small mallocs freed, for the duration."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    sizes = np.random.default_rng(0).choice([24, 48, 100, 300, 1000], blocks)
    held = [libc.malloc(int(s)) for s in sizes]
    for block in held[::2]:
        libc.free(block)
    try:
        yield
    finally:
        for block in held[1::2]:
            libc.free(block)


def _profile_twice(names: list[str], kwargs: dict, fragment: bool):
    """(model, runtime, layout), first summary row, second: each model's two profiles back to
    back, so that the spread measures the profiler, not the machine's drift over the run."""
    with fragmented_heap() if fragment else contextlib.nullcontext():
        for name in names:
            first, second = (profile(name, **kwargs).summary for _ in range(2))
            for key, a in first.groupby(["model", "runtime", "layout"], sort=False):
                yield key, a, second[(second["runtime"] == key[1]) & (second["layout"] == key[2])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="registered model names")
    parser.add_argument("--families", action="store_true", help="add the smallest variant of every family")
    parser.add_argument("--runtime", default="onnxruntime", choices=[*RUNTIMES, "all"])
    parser.add_argument("--layout", default="nchw", choices=["nchw", "tokens", "both"])
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--export-dir", default="export")
    parser.add_argument("--fragmented-heap", action="store_true", help="profile from a fragmented heap")
    args = parser.parse_args()
    names = list(dict.fromkeys(args.names + (smallest_per_family() if args.families else [])))
    if not names:
        parser.error("name at least one model, or pass --families")
    kwargs = dict(runtime=args.runtime, layout=args.layout, resolution=args.resolution,
                  threads=args.threads, warmup=args.warmup, repeats=args.repeats, out=None,
                  export_dir=args.export_dir)
    ops_pct: dict[str, list[float]] = {}
    spreads, misses = [], 0
    for key, a, b in _profile_twice(names, kwargs, args.fragmented_heap):
        spread = share_spread(a, b)
        pcts = [a["ops_vs_e2e_pct"].iloc[0], b["ops_vs_e2e_pct"].iloc[0]]
        bound = OPS_BOUND.get(key[1])
        ok = spread.max() <= SPREAD_BOUND and (bound is None or max(map(abs, pcts)) <= bound)
        misses += not ok
        ops_pct.setdefault(key[1], []).extend(pcts)
        spreads.append(spread.max())
        print(f"{' '.join(key):45s} e2e {a['e2e_median_ms'].iloc[0]:8.2f} / {b['e2e_median_ms'].iloc[0]:8.2f} ms"
              f"   ops vs e2e {pcts[0]:+6.1f}% / {pcts[1]:+6.1f}%"
              f"   max share spread {spread.max():4.2f} pp ({spread.idxmax()})   {'ok' if ok else 'MISSES'}", flush=True)
        print("    " + "  ".join(f"{c} {v:.2f}" for c, v in spread.items() if v > 0))
    for runtime, pcts in ops_pct.items():
        bar = f"bar +-{OPS_BOUND[runtime]:.0f}%" if runtime in OPS_BOUND else "reported, not bounded"
        print(f"{runtime}: ops vs e2e {min(pcts):+.1f} ... {max(pcts):+.1f}% ({bar})")
    print(f"max share spread {max(spreads):.2f} pp (bar {SPREAD_BOUND:.0f}); "
          f"{misses} of {len(spreads)} rows miss a bar")


if __name__ == "__main__":
    main()
