"""onnxruntime measurement, run in a fresh interpreter (`measure_in_worker`).

ORT's per-node kernel times include the profiler's own bookkeeping inside the timed span
(shape strings and event arguments, built with malloc). Its cost follows the process's heap:
about 1.7 us per node in a fresh process, 2.7 us deep in a long test run, 6 us on a fragmented
heap, with the whole-model latency slowed too. On a thousand-node graph that is the difference
between a sum of ops within 3% of the whole model and one 20% over. A fresh process measures
what a deployed app would see, with the calibration taken in the same state as the model.

This file imports only the standard library, numpy, onnx and onnxruntime: it is started as
a script (`python -P ort_worker.py request.json result.json`), without the mobilehv package
and the torch import that comes with it.
"""
from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

# The profiled session keeps every event in memory until end_profiling (about 2 MB per run of
# a thousand-node graph). Page faults on that growing memory land inside kernel spans, so the
# worker keeps freed heap memory (no trimming, large blocks from the heap too) and profiles
# the model once untimed before the measured pass: the measured pass then reuses warm pages.
# The torch runner's worker needs the same for eager activations (see profile/torch.py).
_MALLOC = "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432"


# ORT's x86 layout transformer: convs whose channels are a multiple of 8 or 16 run in a blocked
# channel layout (NCHWc), with ReorderInput/ReorderOutput nodes wherever a consumer cannot take
# it (a (1, C, 1, 1) broadcast Mul, a Max, a MatMul). ORT's stock ARM64 builds, as shipped in
# phone apps, leave it out (its NEON kernels are an opt-in build option), so disabling it here
# gives the graph those builds run, on this machine's kernels.
NCHWC = "NchwcTransformer"


def session_options(threads: int, profile_dir: str | None = None):
    """The session as deployed (CPU EP, every graph optimisation, sequential); with
    `profile_dir`, session profiling on and the optimised graph saved there."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "profile")
        so.optimized_model_filepath = os.path.join(profile_dir, "optimised.onnx")
    return so


def new_session(path: str, threads: int, disabled_optimizers=(), profile_dir: str | None = None):
    """An InferenceSession on the CPU provider with `session_options`, less the graph
    transformers named in `disabled_optimizers` (see NCHWC)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, profile_dir),
                                providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers))


def input_feed(session, resolution: int | None) -> dict:
    feed = {}
    rng = np.random.default_rng(0)
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else (resolution if i >= 2 else 1)
                 for i, d in enumerate(inp.shape)]
        feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def running_runs(stalls_us: list[float], cpu_us: list[float], threads: int) -> list[int]:
    """Indices of the profiled runs whose per-node times can be trusted.

    ORT's kernel times are wall time. On a shared machine the OS now and then deschedules the
    thread inside kernels, which inflates those nodes' times but not the thread CPU time the
    whole-model latency is measured in. With one thread, a run counts if it lost at most
    max(50 us, 2 %) of wall time to not running; if fewer than half qualify, the half of the runs
    that lost least. With several threads (wall time throughout) every run counts.
    """
    if threads != 1:
        return list(range(len(stalls_us)))
    order = sorted(range(len(stalls_us)), key=stalls_us.__getitem__)
    calm = [i for i in order if stalls_us[i] <= max(50.0, 0.02 * cpu_us[i])]
    return sorted(calm if len(calm) >= len(order) / 2 else order[:max(1, len(order) // 2)])


def minor_faults() -> int:
    try:
        import resource
    except ImportError:  # Windows: not counted
        return 0
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)  # per thread on Linux
    return resource.getrusage(who).ru_minflt


def _alternate(plain, profiled, feed, threads: int, runs: int):
    """Plain and profiled runs in turn, so both see the same machine state. Per run: the plain
    run's latency (ms), the profiled run's stall and CPU time (us) and its minor page faults."""
    clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
    e2e, stalls, busy, faults = [], [], [], []
    for _ in range(runs):
        start = clock()
        plain.run(None, feed)
        e2e.append((clock() - start) / 1e6)
        flt, cpu, wall = minor_faults(), time.thread_time_ns(), time.perf_counter_ns()
        profiled.run(None, feed)
        cpu, wall = (time.thread_time_ns() - cpu) / 1e3, (time.perf_counter_ns() - wall) / 1e3
        faults.append(minor_faults() - flt)
        stalls.append(wall - cpu)  # wall time the thread spent not running (kernel times are wall time)
        busy.append(cpu)
    return e2e, stalls, busy, faults


def _kernel_events(trace):
    """(run index, event) for every node's kernel_time event, runs found by their model_run
    timestamps."""
    runs = sorted(e["ts"] for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            yield bisect.bisect_right(runs, event["ts"]) - 1, event


def node_times(trace, runs: list[int], cost_us: float) -> list[list]:
    """[node, op type, output shapes, times in `runs` (us)] per node, in execution order: each
    kernel_time + 0.5 (ORT truncates to whole microseconds, as in the calibration) minus the
    profiler's cost per node."""
    keep = set(runs)
    samples: dict[str, list[float]] = defaultdict(list)
    info: dict[str, tuple[str, str]] = {}
    for run, event in _kernel_events(trace):
        node = event["name"].removesuffix("_kernel_time")
        args = event.get("args", {})
        if node not in info:
            shapes = ["x".join(map(str, next(iter(s.values())))) for s in args.get("output_type_shape", [])]
            info[node] = (args.get("op_name", ""), ",".join(shapes))
        if run in keep:
            samples[node].append(max(0.0, event["dur"] + 0.5 - cost_us))
    return [[node, *info[node], samples[node]] for node in info]


def fastest_node_us(trace, runs: list[int]) -> float:
    """The smallest mean reported time (+ 0.5, see node_times) of any node over `runs`."""
    keep = set(runs)
    times: dict[str, list[float]] = defaultdict(list)
    for run, event in _kernel_events(trace):
        if run in keep:
            times[event["name"]].append(event["dur"] + 0.5)
    return float(min(np.mean(t) for t in times.values()))


def _calibration_chain(n: int, seed: int = 0) -> bytes:
    """`n` nodes in a data-dependent chain, as in a model: an Add of a constant (1, s, 1, 1)
    tensor and the running (1, 1, 1, 1) value, then a ReduceMax back to one value. s is spread
    evenly over 1..4096 so that kernel times spread over about a microsecond (see
    profiler_cost_us); node names as long as an exported model's."""
    from onnx import TensorProto, helper

    sizes = np.random.default_rng(seed).permutation(np.linspace(1, 4096, n // 2).astype(int))
    nodes, consts, running = [], [], "x"
    for i, size in enumerate(sizes):
        consts.append(helper.make_tensor(f"c{i}", TensorProto.FLOAT, [1, int(size), 1, 1], np.ones(size, np.float32)))
        nodes.append(helper.make_node("Add", [f"c{i}", running], [f"y{i}"], name=f"/blocks.{i}/mobile/conv_pw/Add"))
        nodes.append(helper.make_node("ReduceMax", [f"y{i}"], [f"r{i}"], keepdims=1,
                                      name=f"/blocks.{i}/mobile/conv_pw/ReduceMax"))
        running = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 1])],
                              [helper.make_tensor_value_info(running, TensorProto.FLOAT, [1, 1, 1, 1])], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()


def profiler_cost_us(threads: int = 1, n: int = 240, warmup: int = 3, trials: int = 25) -> float:
    """What a kernel_time event adds to a node's reported time, per node.

    Inside the timed span ORT formats every input's and output's type and shape into strings
    and builds the event's arguments: about 2 us per node here, visible on graphs of a thousand
    tiny nodes (Mobile-Former). Calibrated on a data-dependent chain of `n` small nodes (each
    value consumed by the next, as in a model; a chain of graph outputs, each allocated per
    run, calibrated 0.5 us per node too low), against the same chain run without profiling:
    mean reported kernel time + 0.5 (ORT truncates to whole microseconds; the chain's kernel
    times spread over about one, so the truncation loses 0.5 us on average) minus the mean node
    time of the fastest plain run. That also removes the executor's own per-node work, which
    plain runs include and kernel times do not, so the sum of ops stays comparable with the
    whole model.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mobilehv-ort-") as tmp:
        sessions = []
        for profiled in (False, True):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
            so.log_severity_level = 3
            if profiled:
                so.enable_profiling, so.profile_file_prefix = True, os.path.join(tmp, "calib")
            sessions.append(ort.InferenceSession(_calibration_chain(n), so, providers=["CPUExecutionProvider"]))
        feed = {"x": np.zeros((1, 1, 1, 1), np.float32)}
        e2e, stalls, busy, _ = _alternate(*sessions, feed, threads, warmup + trials)
        events = json.loads(Path(sessions[1].end_profiling()).read_text())
    reported = defaultdict(list)
    for run, event in _kernel_events(events):
        reported[run].append(event["dur"])
    # trials the OS did not interrupt (a descheduled trial inflates every dur, as for the model)
    kept = [i for i in running_runs(stalls, busy, threads) if i >= warmup]
    mean_dur = float(np.mean([d for i in kept for d in reported[i]]))
    return max(0.0, mean_dur + 0.5 - min(e2e[i] for i in kept) * 1e3 / n)


def measure(path: str, threads: int, warmup: int, repeats: int, out_dir: str,
            disabled_optimizers: list[str] | None = None) -> dict:
    """Profile the model at `path` in this process; the optimised graph is saved in `out_dir`.
    `disabled_optimizers` names ORT graph transformers to leave out (see NCHWC).

    Returns per-node kernel times of the runs that count (us, minus the profiler cost,
    execution order) with op type and output shape, the whole-model latencies of the plain runs
    paired with those (ms), and the diagnostics of the measured pass.
    """
    import onnxruntime as ort

    disabled = disabled_optimizers or []
    try:
        plain = new_session(path, threads, disabled)
        for _ in range(2):  # the untimed pass warms the heap (see _MALLOC); the second is measured
            with tempfile.TemporaryDirectory(prefix="mobilehv-ort-", dir=out_dir) as tmp:
                profiled = new_session(path, threads, disabled, profile_dir=tmp)
                dims = profiled.get_inputs()[0].shape
                resolution = dims[-1] if isinstance(dims[-1], int) else 224
                e2e, stalls, busy, faults = _alternate(plain, profiled, input_feed(profiled, resolution),
                                                       threads, warmup + repeats)
                trace = json.loads(Path(profiled.end_profiling()).read_text())
                os.replace(os.path.join(tmp, "optimised.onnx"), os.path.join(out_dir, "optimised.onnx"))
    except Exception as e:  # ORT raises its own exception types
        return {"error": f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}"}
    runs = sum(1 for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    if runs != warmup + repeats:
        return {"error": f"onnxruntime's profile of {path} has {runs} runs, expected {warmup + repeats}"}
    kept = [warmup + i for i in running_runs(stalls[warmup:], busy[warmup:], threads)]
    # Calibrated after the model, in the state it was measured in. The median of three: one
    # calibration in about 80 came out at 5.1 instead of 2.3 us per node (Mobile-Former-26M's
    # sum of ops 36% low); the two extra take 0.5 s. No node can cost less than the profiler's
    # share of it, so the model's fastest node caps the calibration.
    calibrated = float(np.median([profiler_cost_us(threads) for _ in range(3)]))
    cost = min(calibrated, fastest_node_us(trace, kept))
    # The whole model from the plain runs paired with the kept profiled runs: a run the OS
    # interrupted is usually one in a busy spell, which slows the paired plain run too.
    return {"resolution": int(resolution), "e2e_ms": [e2e[i] for i in kept], "cost_us": cost,
            "calibrated_cost_us": calibrated, "nodes": node_times(trace, kept, cost),
            "stalled_runs_pct": 100 * (1 - len(kept) / repeats),
            "page_faults_per_run": float(np.mean(faults[warmup:])), "onnxruntime": ort.__version__}


def run_fresh(argv: list[str], request: dict, out_dir: str | Path, worker: str, env: dict | None = None) -> dict:
    """Run `argv request.json result.json` in a fresh interpreter with the heap settings of
    _MALLOC (the caller's GLIBC_TUNABLES kept) and return its result, or {"error": one line
    naming the `worker`}. The torch runner's worker starts the same way."""
    request_path, result_path = Path(out_dir) / "request.json", Path(out_dir) / "result.json"
    request_path.write_text(json.dumps(request))
    tunables = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), _MALLOC)))
    done = subprocess.run([*argv, str(request_path), str(result_path)], capture_output=True, text=True,
                          env={**os.environ, **(env or {}), "GLIBC_TUNABLES": tunables})
    if done.returncode != 0 or not result_path.exists():
        last = (done.stderr.strip() or "no output").splitlines()[-1]
        return {"error": f"{worker} failed (exit {done.returncode}): {last}"}
    return json.loads(result_path.read_text())


def measure_in_worker(path: str | Path, threads: int, warmup: int, repeats: int, out_dir: str | Path,
                      disabled_optimizers: list[str] | None = None) -> dict:
    """`measure` in a fresh interpreter (see the module docstring). `-P`: the script's folder,
    which holds this package's onnxruntime.py, must not shadow the onnxruntime package."""
    request = {"path": str(path), "threads": threads, "warmup": warmup, "repeats": repeats,
               "out_dir": str(out_dir), "disabled_optimizers": list(disabled_optimizers or [])}
    return run_fresh([sys.executable, "-P", __file__], request, out_dir, f"onnxruntime's worker on {path}")


if __name__ == "__main__":
    args = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(measure(**args)))
