"""Repeatability and accuracy of the latency breakdown: profile the same model twice, print
the spread of category shares and how the sum of per-op times compares with the separately
measured whole-model latency.

    python benchmarks/profile_repeatability.py mobilevit_xxs levit_128 --runtime torch

The spread is, per category, |share in run 1 - share in run 2| in percentage points (bar:
<= 2 pp for every category); "ops vs e2e" is 100 * (sum of ops / e2e - 1) of each run (bar:
within +-10% for onnxruntime and torch). Nothing is written to latency_tables/.
"""
from __future__ import annotations

import argparse

from mobilehv.profile import RUNTIMES, profile
from mobilehv.profile.records import share_spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="registered model names")
    parser.add_argument("--runtime", default="onnxruntime", choices=[*RUNTIMES, "all"])
    parser.add_argument("--layout", default="nchw", choices=["nchw", "tokens", "both"])
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--export-dir", default="export")
    args = parser.parse_args()
    kwargs = dict(runtime=args.runtime, layout=args.layout, resolution=args.resolution,
                  threads=args.threads, warmup=args.warmup, repeats=args.repeats, out=None,
                  export_dir=args.export_dir)
    first = profile(args.names, **kwargs).summary
    second = profile(args.names, **kwargs).summary
    for key, a in first.groupby(["model", "runtime", "layout"]):
        b = second[(second["model"] == key[0]) & (second["runtime"] == key[1]) & (second["layout"] == key[2])]
        spread = share_spread(a, b)
        worst = spread.idxmax()
        print(f"{' '.join(key):45s} e2e {a['e2e_median_ms'].iloc[0]:8.2f} / {b['e2e_median_ms'].iloc[0]:8.2f} ms"
              f"   ops vs e2e {a['ops_vs_e2e_pct'].iloc[0]:+6.1f}% / {b['ops_vs_e2e_pct'].iloc[0]:+6.1f}%"
              f"   max share spread {spread.max():4.2f} pp ({worst})")
        print("    " + "  ".join(f"{c} {v:.2f}" for c, v in spread.items() if v > 0))


if __name__ == "__main__":
    main()
