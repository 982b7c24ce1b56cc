"""ONNX Runtime, CPU execution provider, graph optimisations on (as deployed).

Method, in a fresh interpreter (`ort_worker`): one session with profiling on and one without,
same options, runs alternating. The profiling session's per-node `*_kernel_time` events give
each node's time per run (over the runs the OS did not interrupt: see `running_runs`; minus
the profiler's own cost per node, calibrated in the same process, see `profiler_cost_us`, and
capped by the model's fastest node); the plain runs paired with those give the whole-model
latency (thread CPU time with one thread). Nodes of the optimised graph are mapped back to
the PyTorch module that produced them through the `pkg.torch.onnx.name_scopes` /
`class_hierarchy` metadata of the exported graph: by name when the node survived optimisation,
through the original node of the same kind that computed a fused node's output, and, for nodes
ORT inserts (layout reorders), through the node they serve.
"""
from __future__ import annotations

import ast
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from mobilehv.profile.attribution import Scope
from mobilehv.profile.ort_worker import measure_in_worker
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


def run(path: str | Path, *, name: str, layout: str, threads: int = 1, warmup: int = 5,
        repeats: int = 20, disabled_optimizers: tuple[str, ...] = ()) -> RunResult:
    """Profile the ONNX artifact at `path`. `disabled_optimizers`: ORT graph transformers left
    out, e.g. `(ort_worker.NCHWC,)` for the graph ORT's stock ARM64 builds run."""
    import onnx

    path = Path(path)
    original = _load(path)
    with tempfile.TemporaryDirectory(prefix="mobilehv-ort-") as tmp:
        measured = measure_in_worker(path.resolve(), threads, warmup, repeats, tmp, list(disabled_optimizers))
        if "error" in measured:
            raise ArtifactError(measured["error"])
        optimised = onnx.load(os.path.join(tmp, "optimised.onnx"))
    mapper = _Mapper(original, optimised)
    ops = [OpRecord(node, op_type, mapper.map(node, op_type) or (), shape, samples)
           for node, op_type, shape, samples in measured["nodes"]]
    method = METHOD + (f"; without {', '.join(disabled_optimizers)}" if disabled_optimizers else "")
    return RunResult(name, "onnxruntime", layout, measured["resolution"], ops, measured["e2e_ms"], method,
                     artifact=path.name, extra={"clock": "thread_cpu" if threads == 1 else "wall",
                                                "profiler_cost_us": round(measured["cost_us"], 3),
                                                "calibrated_cost_us": round(measured["calibrated_cost_us"], 3),
                                                "stalled_runs_pct": round(measured["stalled_runs_pct"], 2),
                                                "page_faults_per_run": round(measured["page_faults_per_run"], 1),
                                                "onnxruntime": measured["onnxruntime"]})
