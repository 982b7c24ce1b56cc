"""ONNX Runtime, CPU execution provider, graph optimisations on (as deployed).

Method: one session with profiling on and one without, same options, runs alternating. The
profiling session's per-node `*_kernel_time` events give each node's time per run (median over
the runs the OS did not interrupt: see `running_runs`; minus the profiler's own cost per node,
calibrated just before every profile: see `profiler_cost_us`); the plain session gives the
whole-model latency (thread CPU time with one thread). Nodes of the optimised graph are
mapped back to the PyTorch module that produced them through the `pkg.torch.onnx.name_scopes`
/ `class_hierarchy` metadata of the exported graph: by name when the node survived
optimisation, through the original node of the same kind that computed a fused node's
output, and, for nodes ORT inserts (layout reorders), through the node they serve.
"""
from __future__ import annotations

import ast
import bisect
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from mobilehv.profile.attribution import Scope
from mobilehv.profile.records import OpRecord, RunResult
from mobilehv.taxonomy import op_category

METHOD = ("onnxruntime CPU EP, ORT_ENABLE_ALL: per-node kernel_time events of session "
          "profiling, mapped to modules via the exporter's name_scopes metadata")


class ArtifactError(ValueError):
    """The file is not a usable ONNX model for profiling."""


def node_scopes(node) -> tuple[Scope, ...] | None:
    """Module chain of an ONNX node exported by torch.onnx (dynamo), root first."""
    meta = {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" not in meta or "pkg.torch.onnx.class_hierarchy" not in meta:
        return None
    try:
        names = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
        classes = ast.literal_eval(meta["pkg.torch.onnx.class_hierarchy"])
    except (ValueError, SyntaxError):
        return None
    # the last entry of each list is the aten op itself, the others are modules
    return tuple(Scope(n, c) for n, c in zip(names[:-1], classes[:-1]))


class _Mapper:
    """Optimised-graph node -> module chain, through the original exported graph."""

    def __init__(self, original, optimised):
        self.scopes = {}
        self.producer = {}
        self.kind = {}
        for node in original.graph.node:
            self.scopes[node.name] = node_scopes(node)
            self.kind[node.name] = node.op_type
            for out in node.output:
                self.producer[out] = node
        self.opt_nodes = {n.name: n for n in optimised.graph.node}
        self.opt_producer = {o: n for n in optimised.graph.node for o in n.output}
        self.opt_consumers = defaultdict(list)
        for n in optimised.graph.node:
            for i in n.input:
                self.opt_consumers[i].append(n)

    def _by_name(self, name: str, op_type: str):
        """The node itself, or the original node/tensor its (ORT-derived) name comes from:
        fusions append `/<Rule>/`, the NCHWc transformer names a node `<output tensor>_nchwc`."""
        base = name.split("/")[0].removesuffix("_nchwc")
        for candidate in dict.fromkeys((name, base)):
            if self.scopes.get(candidate):
                return self.scopes[candidate]
        return self._by_output(op_type, [base]) if base in self.producer else None

    def _by_output(self, op_type: str, outputs) -> tuple[Scope, ...] | None:
        """The original node computing a fused node's output, preferring one of the same kind
        (for Conv+ReLU fused into one Conv, the Conv, not the ReLU whose output name it kept)."""
        want = op_category(op_type)
        nearest = None
        frontier = [self.producer[o] for o in outputs if o in self.producer]
        seen = set()
        for _ in range(6):
            nxt = []
            for node in frontier:
                if node.name in seen:
                    continue
                seen.add(node.name)
                scopes = self.scopes.get(node.name)
                if scopes and nearest is None:
                    nearest = scopes
                if scopes and op_category(node.op_type) == want:
                    return scopes
                nxt += [self.producer[i] for i in node.input if i in self.producer
                        and i not in self.opt_producer]  # stop at tensors that still exist
            frontier = nxt
        return nearest

    def map(self, name: str, op_type: str, hops: int = 3) -> tuple[Scope, ...] | None:
        found = self._by_name(name, op_type)
        node = self.opt_nodes.get(name)
        if found or node is None:
            return found
        found = self._by_output(op_type, node.output)
        if found or hops == 0:
            return found
        # inserted nodes (ReorderInput/Output, casts): the node they feed, else the one feeding them
        neighbours = [c for o in node.output for c in self.opt_consumers[o]]
        neighbours += [self.opt_producer[i] for i in node.input if i in self.opt_producer]
        for other in neighbours:
            found = self.map(other.name, other.op_type, hops - 1)
            if found:
                return found
        return None


def _load(path: Path):
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends
        raise ArtifactError(f"{path} is not a valid ONNX model ({type(e).__name__})") from None
    if not model.graph.node:
        raise ArtifactError(f"{path} is not a valid ONNX model (empty graph)")
    if not any(node_scopes(n) for n in model.graph.node):
        raise ArtifactError(
            f"{path} carries no PyTorch module names (pkg.torch.onnx.name_scopes); profile "
            "artifacts made by `mobilehv export` or torch.onnx.export(..., dynamo=True)")
    return model


def input_feed(session, resolution: int | None) -> dict:
    feed = {}
    rng = np.random.default_rng(0)
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else (resolution if i >= 2 else 1)
                 for i, d in enumerate(inp.shape)]
        feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


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


def run(path: str | Path, *, name: str, layout: str, threads: int = 1, warmup: int = 5,
        repeats: int = 20) -> RunResult:
    import onnx
    import onnxruntime as ort

    path = Path(path)
    original = _load(path)
    # Calibrated for every run, just before the measured runs: the calibration's own profiled
    # session also warms ORT's profiling (the first profile of a process, or one right after an
    # export, overshot by up to 35% on small models).
    cost = profiler_cost_us(threads)
    with tempfile.TemporaryDirectory(prefix="mobilehv-ort-") as tmp:
        try:
            profiled = ort.InferenceSession(str(path), session_options(threads, profile_dir=tmp),
                                            providers=["CPUExecutionProvider"])
            plain = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        dims = profiled.get_inputs()[0].shape
        resolution = dims[-1] if isinstance(dims[-1], int) else 224
        feed = input_feed(profiled, resolution)
        clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
        e2e, stalls, busy = [], [], []
        for i in range(warmup + repeats):  # alternate, so both see the same machine state
            start = clock()
            plain.run(None, feed)
            elapsed = (clock() - start) / 1e6
            cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
            profiled.run(None, feed)
            cpu, wall = (time.thread_time_ns() - cpu) / 1e3, (time.perf_counter_ns() - wall) / 1e3
            if i >= warmup:
                e2e.append(elapsed)
                # wall time the profiled run's thread spent not running (kernel times are wall time)
                stalls.append(wall - cpu)
                busy.append(cpu)
        trace = json.loads(Path(profiled.end_profiling()).read_text())
        optimised = onnx.load(os.path.join(tmp, "optimised.onnx"))

    runs = sorted(e["ts"] for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) != warmup + repeats:
        raise ArtifactError(f"onnxruntime's profile of {path} has {len(runs)} runs, expected {warmup + repeats}")
    kept_runs = set(running_runs(stalls, busy, threads))
    times: dict[str, list[float]] = defaultdict(list)
    info: dict[str, tuple[str, str]] = {}
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = event["name"].removesuffix("_kernel_time")
        args = event.get("args", {})
        if node not in info:
            shapes = ["x".join(map(str, next(iter(s.values())))) for s in args.get("output_type_shape", [])]
            info[node] = (args.get("op_name", ""), ",".join(shapes))
        run = bisect.bisect_right(runs, event["ts"]) - 1 - warmup
        if run in kept_runs:
            times[node].append(float(event["dur"]))
    mapper = _Mapper(original, optimised)
    ops = [OpRecord(node, info[node][0], mapper.map(node, info[node][0]) or (), info[node][1],
                    [max(0.0, t - cost) for t in samples])
           for node, samples in times.items()]  # insertion order = execution order
    return RunResult(name, "onnxruntime", layout, int(resolution), ops, e2e, METHOD,
                     artifact=path.name, extra={"clock": "thread_cpu" if threads == 1 else "wall",
                                                "profiler_cost_us": round(cost, 3),
                                                "stalled_runs_pct": round(100 * (1 - len(kept_runs) / repeats), 2),
                                                "onnxruntime": ort.__version__})


def profiler_cost_us(threads: int = 1, n: int = 200, trials: int = 15) -> float:
    """What a kernel_time event adds to a node's time, per node.

    ORT reports whole microseconds and times a little bookkeeping with each kernel, which is
    visible on graphs of a thousand tiny nodes (Mobile-Former). Calibrated on a chain of `n`
    one-element Adds: median reported kernel time minus the node's share of the fastest plain
    run of the same chain (thread CPU time), floored at 0.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", [f"t{i}", "one"], [f"t{i + 1}"], name=f"add{i}") for i in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    content = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()
    with tempfile.TemporaryDirectory(prefix="mobilehv-ort-") as tmp:
        sessions = []
        for profiled in (False, True):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the chain
            so.log_severity_level = 3
            if profiled:
                so.enable_profiling, so.profile_file_prefix = True, os.path.join(tmp, "calib")
            sessions.append(ort.InferenceSession(content, so, providers=["CPUExecutionProvider"]))
        plain, profiled = sessions
        feed = {"t0": np.zeros((1, 8), np.float32)}
        clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
        fastest, stalls, busy = float("inf"), [], []
        for _ in range(trials):
            start = clock()
            plain.run(None, feed)
            fastest = min(fastest, (clock() - start) / 1e3)
            cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
            profiled.run(None, feed)
            busy.append((time.thread_time_ns() - cpu) / 1e3)
            stalls.append((time.perf_counter_ns() - wall) / 1e3 - busy[-1])
        events = json.loads(Path(profiled.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    kept = set(running_runs(stalls, busy, threads))  # as in run(): a descheduled trial inflates every dur
    reported = [e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and bisect.bisect_right(runs, e["ts"]) - 1 in kept]
    return max(0.0, float(np.median(reported)) - fastest / n)


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
