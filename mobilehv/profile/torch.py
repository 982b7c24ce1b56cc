"""Eager PyTorch on CPU: every torch call timed where it runs, with the module that ran it.

Method. Ops are the torch calls Python makes (`conv2d`, `linear`, `matmul`, `view`, `add`; what
they dispatch to internally is part of them), seen by a `TorchFunctionMode`; calls that return
no tensor (`size`, `dim`) are not ops, their time goes to the next op. An op's time runs from
the end of the previous op to the end of its own, so the Python and module-call work that leads
to an op (which eager users pay) is charged to it; what the timer itself adds per op,
calibrated on chains of one-call modules with the signatures of real layers, is subtracted.
The timed runs carry nothing else: module chains and output shapes come from one untimed run
with forward hooks, matched by position (eager inference runs the same calls in the same
order; checked by name). The whole-model latency is measured in plain runs alternating with
the timed ones. With one thread every time is thread CPU time (immune to other processes'
load), otherwise wall time.

Any Python in the call path slows the ops themselves, big ones most, and no per-op constant
removes that: with a do-nothing function mode MobileNetV2's 101 calls take 11 us more each,
Mobile-Former-26M's 922 calls 2.5 us more. So the sums run 1-10% over the whole model. This
runner's first method, aten ops in a `TorchDispatchMode` with module hooks in the timed runs,
put more Python in the path: 6-17%. The PyTorch profiler (Kineto) adds less per op, but
reading its events between runs, or keeping them, slowed the following runs of
Mobile-Former-26M by 15-85% (page faults).

The measurement runs in fresh interpreters (`python -m mobilehv.profile.torch request.json
result.json`; two by default, the repeats split between them and pooled: see `run`), each
building the deploy form itself, with a heap that keeps freed memory (see
ort_worker._MALLOC), as a long-running server or jemalloc/tcmalloc would have. With glibc's
defaults eager torch maps and unmaps its multi-MB activations on every run; those page faults
land in whichever ops allocate or free, as many as the process's history makes them
(MobileViT-XXS: 28-32 ms instead of 20-22 ms, two profiles 2.5-7.6 points apart in a
category's share instead of under 1).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mobilehv.profile.attribution import Scope
from mobilehv.profile.records import OpRecord, RunResult

METHOD = ("torch eager: torch calls timed by a TorchFunctionMode (glue before a call included, "
          "calibrated timer cost subtracted), modules from an untimed run's forward hooks")


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _shape(out) -> str | None:
    """Output shape(s) of a call, or None when it returned no tensor (not an op)."""
    if isinstance(out, torch.Tensor):
        return "x".join(map(str, out.shape))
    if isinstance(out, (tuple, list)):
        shapes = [_shape(o) for o in out if isinstance(o, torch.Tensor)]
        return ",".join(shapes) if shapes else None
    return None


def _op_name(func) -> str:
    """`conv2d`, `add` for `Tensor.__add__`, `radd` for `__radd__`, `getitem` for indexing."""
    return getattr(func, "__name__", str(func)).strip("_")


class _Timer(TorchFunctionMode):
    """Per op: (function, ns since the end of the previous op, or the timer's start)."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.times: list[tuple[object, int]] = []
        self.last = clock()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # as little work as possible here: it all lands in the measured runs
        if isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and _shape(out) is not None):
            end = self.clock()
            self.times.append((func, end - self.last))
            self.last = self.clock()
        return out


class _Recorder(TorchFunctionMode):
    """Per op: (name, module chain root first, output shape); the chain from forward hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.ops: list[tuple[str, tuple[Scope, ...], str]] = []
        self.chains: list[tuple[Scope, ...]] = [()]
        self.handles = []
        for path, module in model.named_modules():
            def enter(mod, args, scope=Scope(path, _qualname(module))):
                self.chains.append(self.chains[-1] + (scope,))

            def leave(mod, args, out):
                self.chains.pop()

            self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = _shape(out)
        if shape is not None:
            self.ops.append((_op_name(func), self.chains[-1], shape))
        return out

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


class _OneCall(nn.Module):
    """A module making one torch call of a common kind, with a real layer's signature (conv,
    linear, norm with affine, data movement, softmax, pointwise), on a tensor small enough that
    the timer's cost dominates."""

    def __init__(self, kind: int):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(8, 8, 1)
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == 0:
            return self.conv._conv_forward(x, self.conv.weight, self.conv.bias)
        if self.kind == 1:
            return torch.nn.functional.linear(x, self.linear.weight, self.linear.bias)
        if self.kind == 2:
            return torch.nn.functional.layer_norm(x, (4,), self.norm.weight, self.norm.bias, 1e-6)
        if self.kind == 3:
            return x.transpose(-1, -2)
        if self.kind == 4:
            return x.softmax(-1)
        return x + 1.0


def timer_cost_us(clock=time.thread_time_ns, n: int = 240, trials: int = 25) -> float:
    """What the timer adds to an op's time, in us: over a chain of `n` one-call modules,
    alternating plain and timed, the median sum of the op times minus the median plain time,
    per op."""
    chain = nn.Sequential(*[_OneCall(i % 6) for i in range(n)])
    x = torch.zeros(1, 8, 4, 4)
    plain, timed = [], []
    with torch.inference_mode():
        for _ in range(trials):
            start = clock()
            chain(x)
            plain.append((clock() - start) / 1e3)
            with _Timer(clock) as timer:
                chain(x)
            timed.append(sum(t for _, t in timer.times) / 1e3)
    return max(0.0, (float(np.median(timed)) - float(np.median(plain))) / n)


def measure(name: str, layout: str, resolution: int, threads: int = 1, warmup: int = 5,
            repeats: int = 20) -> dict:
    """Profile the deploy form of registered model `name` in this process (the worker's side).

    Returns the whole-model latencies (ms), per op in execution order its type, module chain
    (`[path, class]` pairs), output shape and times (us, timer cost subtracted), and the
    calibrated cost and minor page faults per timed run.
    """
    import mobilehv
    from mobilehv.profile.ort_worker import minor_faults

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mobilehv.fold(mobilehv.create_model(name, layout=layout))
    x = torch.randn(1, 3, resolution, resolution)
    torch.set_num_threads(threads)
    # one thread: thread CPU time, which other processes' load does not inflate; else wall time
    clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
    cost = timer_cost_us(clock)
    e2e, runs, faults = [], [], []
    with torch.inference_mode():
        with _Recorder(model) as recorder:
            model(x)
        # Plain and timed runs alternate, so both see the same machine state (caches,
        # frequency, other load); warm-up runs of both kinds are dropped.
        for i in range(warmup + repeats):
            start = clock()
            model(x)
            elapsed = (clock() - start) / 1e6
            flt = minor_faults()
            with _Timer(clock) as timer:
                model(x)
            if i >= warmup:
                e2e.append(elapsed)
                runs.append([(_op_name(func), ns / 1e3) for func, ns in timer.times])
                faults.append(minor_faults() - flt)
    names = [op for op, _, _ in recorder.ops]
    if any([op for op, _ in r] != names for r in runs):
        return {"error": f"{name}: the eager op sequence changed between runs"}
    return {"ops": [[op, [[s.path, s.cls] for s in chain], shape, [max(0.0, r[i][1] - cost) for r in runs]]
                    for i, (op, chain, shape) in enumerate(recorder.ops)],
            "e2e_ms": e2e, "timer_cost_us": cost, "page_faults_per_run": sum(faults) / len(faults)}


def run(name: str, *, layout: str, resolution: int, threads: int = 1, warmup: int = 5,
        repeats: int = 20, processes: int = 2) -> RunResult:
    """Per-op times (median over `repeats`) and whole-model latencies of the deploy form of
    `name` in eager mode, measured in fresh interpreters (see the module docstring).

    The repeats are split over `processes` workers and pooled. Where a process's tensors land
    in memory changes op times for its whole life: over ten single-process profiles of
    MobileViT-XXS a category's share ranged over up to 3.1 points, over ten pooled from two
    processes at most 1.0."""
    import mobilehv
    from mobilehv.profile.ort_worker import run_fresh

    # the worker imports this package from wherever the caller did, installed or not
    path = os.pathsep.join(filter(None, (str(Path(mobilehv.__file__).parents[1]), os.environ.get("PYTHONPATH"))))
    workers = []
    for k in range(min(processes, repeats)):
        request = {"name": name, "layout": layout, "resolution": resolution, "threads": threads,
                   "warmup": warmup, "repeats": repeats // processes + (k < repeats % processes)}
        with tempfile.TemporaryDirectory(prefix="mobilehv-torch-") as tmp:
            measured = run_fresh([sys.executable, "-m", __name__], request, tmp, f"torch's worker on {name}",
                                 env={"PYTHONPATH": path})
        if "error" in measured:
            raise RuntimeError(measured["error"])
        workers.append(measured)
    first = workers[0]["ops"]
    if any([op[0] for op in w["ops"]] != [op[0] for op in first] for w in workers):
        raise RuntimeError(f"{name}: the eager op sequence differs between processes")
    ops = [OpRecord(op_name=f"{op}_{i}", op_type=op, scopes=tuple(Scope(*s) for s in scopes),
                    output_shape=shape, samples_us=[t for w in workers for t in w["ops"][i][3]])
           for i, (op, scopes, shape, _) in enumerate(first)]
    return RunResult(name, "torch", layout, resolution, ops, [t for w in workers for t in w["e2e_ms"]], METHOD,
                     extra={"timer_cost_us": round(float(np.mean([w["timer_cost_us"] for w in workers])), 3),
                            "page_faults_per_run": round(float(np.mean([w["page_faults_per_run"] for w in workers])), 1),
                            "processes": len(workers), "clock": "thread_cpu" if threads == 1 else "wall"})


if __name__ == "__main__":
    request = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(measure(**request)))
