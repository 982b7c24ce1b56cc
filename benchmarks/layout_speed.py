"""nchw deploy form vs tokens, side by side: end-to-end latency and reshape time per runtime.

    python benchmarks/layout_speed.py mobilevit_xs mobile_former_294m

End to end: both layouts' exported artifacts are loaded in one process and timed in
alternating blocks (`--block` runs of one, then of the other, `--rounds` times, the order
flipped every round), with thread CPU time and one thread. On a shared machine a model's
latency drifts by 10-15% over minutes, so comparing two profiles taken one after the other
says little; alternating blocks see the same drift. Printed: each layout's median, the ratio
nchw / tokens of the medians, and the 10th-90th percentile of the per-round ratios.
Reshape: `mobilehv.profile(..., layout="both")` `--profiles` times; printed: the median of
the ratios of the `reshape` category's ms and every ratio. Nothing is written to latency_tables/.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mobilehv.export import export
from mobilehv.profile import profile

RUNTIMES = {"onnxruntime": "onnx", "tflite": "tflite"}


def _runner(path, runtime: str):
    """A function running the artifact once on a fixed input, in the profiler's session setup (1 thread)."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        from mobilehv.profile.ort_worker import input_feed, session_options

        session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        feed = input_feed(session, None)
        return lambda: session.run(None, feed)
    from mobilehv.profile.tflite import _interpreter

    it = _interpreter(Path(path).read_bytes(), 1)
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.random.default_rng(0).standard_normal(inp["shape"]).astype(np.float32))
    return it.invoke


def alternating_e2e_ms(runs: dict, rounds: int, block: int, warmup: int = 5) -> dict[str, list[list[float]]]:
    """Per layout, per round, the block's run times in ms (thread CPU time)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {k: [] for k in runs}
    order = list(runs)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            samples = []
            for _ in range(block):
                start = time.thread_time_ns()
                runs[key]()
                samples.append((time.thread_time_ns() - start) / 1e6)
            times[key].append(samples)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["mobilevit_xs", "mobile_former_294m"])
    parser.add_argument("--runtime", action="append", choices=list(RUNTIMES), default=None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--profiles", type=int, default=3)
    parser.add_argument("--export-dir", default="export")
    args = parser.parse_args()
    for name in args.names:
        for runtime in args.runtime or list(RUNTIMES):
            runs = {layout: _runner(export(name, RUNTIMES[runtime], args.export_dir, layout=layout,
                                           cache=True).path, runtime)
                    for layout in ("nchw", "tokens")}
            t = alternating_e2e_ms(runs, args.rounds, args.block)
            med = {k: float(np.median(np.concatenate(v))) for k, v in t.items()}
            per_round = [np.median(a) / np.median(b) for a, b in zip(t["nchw"], t["tokens"])]
            reshape = []
            for _ in range(args.profiles):
                s = profile(name, runtime=runtime, layout="both", out=None,
                            export_dir=args.export_dir).summary.set_index("layout")["reshape_ms"]
                reshape.append(s["nchw"] / s["tokens"])
            print(f"{name:20s} {runtime:12s} e2e nchw {med['nchw']:7.2f} ms  tokens {med['tokens']:7.2f} ms"
                  f"  ratio {med['nchw'] / med['tokens']:.3f} (rounds p10-p90 "
                  f"{np.percentile(per_round, 10):.3f}-{np.percentile(per_round, 90):.3f})"
                  f"   reshape ratio {np.median(reshape):.3f} ({', '.join(f'{r:.3f}' for r in reshape)})",
                  flush=True)


if __name__ == "__main__":
    main()
