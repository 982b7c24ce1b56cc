"""nchw deploy form vs tokens, side by side: end-to-end latency and reshape time per runtime.

    python benchmarks/layout_speed.py mobilevit_xs mobile_former_294m

End to end: both layouts' exported artifacts are loaded in one process and timed in
alternating blocks (`--block` runs of one, then of the other, `--rounds` times, the order
flipped every round), with thread CPU time and one thread. On a shared machine a model's
latency drifts by 10-15% over minutes, so comparing two profiles taken one after the other
says little; alternating blocks see the same drift. Printed: each layout's median, the ratio
nchw / tokens of the medians, and the 10th-90th percentile of the per-round ratios.
Reshape: each layout profiled `--profiles` times (the runners of `mobilehv.profile`); printed:
the median of the ratios of the `reshape` category's ms and every ratio. Nothing is written to
latency_tables/.

`--without-nchwc` runs onnxruntime without its x86 NCHWc layout transformer (sessions and
profiles alike): the graph ORT's stock ARM64 builds run, timed on this machine's kernels. On x86
that transformer's ReorderInput/ReorderOutput nodes around Mobile-Former's dynamic ReLUs (a
broadcast Mul and a Max, which its blocked kernels do not take) are the same in both layouts.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mobilehv.export import export
from mobilehv.profile import onnxruntime as ort_runner, records, tflite as tflite_runner
from mobilehv.profile.ort_worker import NCHWC

RUNTIMES = {"onnxruntime": "onnx", "tflite": "tflite"}


def _runner(path, runtime: str, disabled: tuple[str, ...] = ()):
    """A function running the artifact once on a fixed input, in the profiler's session setup (1 thread)."""
    if runtime == "onnxruntime":
        from mobilehv.profile.ort_worker import input_feed, new_session

        session = new_session(path, 1, disabled)
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


def reshape_ms(path, name: str, layout: str, runtime: str, disabled: tuple[str, ...] = ()) -> float:
    """The `reshape` category's ms in one profile of the artifact (as in summary.csv)."""
    if runtime == "onnxruntime":
        run = ort_runner.run(path, name=name, layout=layout, disabled_optimizers=disabled)
    else:
        run = tflite_runner.run(path, name=name, layout=layout)
    return records.summary_row(run, records.ops_frame(run), machine="", threads=1, warmup=5,
                               repeats=20)["reshape_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["mobilevit_xs", "mobile_former_294m"])
    parser.add_argument("--runtime", action="append", choices=list(RUNTIMES), default=None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--profiles", type=int, default=3)
    parser.add_argument("--export-dir", default="export")
    parser.add_argument("--without-nchwc", action="store_true",
                        help="onnxruntime without its x86 NCHWc layout transformer (the ARM64 builds' graph)")
    args = parser.parse_args()
    disabled = (NCHWC,) if args.without_nchwc else ()
    for name in args.names:
        for runtime in args.runtime or list(RUNTIMES):
            off = disabled if runtime == "onnxruntime" else ()
            paths = {layout: export(name, RUNTIMES[runtime], args.export_dir, layout=layout, cache=True).path
                     for layout in ("nchw", "tokens")}
            runs = {layout: _runner(path, runtime, off) for layout, path in paths.items()}
            t = alternating_e2e_ms(runs, args.rounds, args.block)
            med = {k: float(np.median(np.concatenate(v))) for k, v in t.items()}
            per_round = [np.median(a) / np.median(b) for a, b in zip(t["nchw"], t["tokens"])]
            reshape = [reshape_ms(paths["nchw"], name, "nchw", runtime, off)
                       / reshape_ms(paths["tokens"], name, "tokens", runtime, off) for _ in range(args.profiles)]
            label = runtime + (" -nchwc" if off else "")
            print(f"{name:20s} {label:18s} e2e nchw {med['nchw']:7.2f} ms  tokens {med['tokens']:7.2f} ms"
                  f"  ratio {med['nchw'] / med['tokens']:.3f} (rounds p10-p90 "
                  f"{np.percentile(per_round, 10):.3f}-{np.percentile(per_round, 90):.3f})"
                  f"   reshape ratio {np.median(reshape):.3f} ({', '.join(f'{r:.3f}' for r in reshape)})",
                  flush=True)


if __name__ == "__main__":
    main()
