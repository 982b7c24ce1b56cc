"""Eager PyTorch on CPU: every aten op timed where it runs, with the module that ran it.

Method: forward hooks keep a stack of the modules being executed; a `TorchDispatchMode` sees
every aten op after autograd/composite decomposition and files it under the innermost module.
An op's time runs from the end of the previous op to the end of its own kernel, so the Python,
module-call and dispatcher work that leads to an op (which eager users pay) is charged to it.
What the instrument itself adds in that span is subtracted: its cost per op (dispatch-mode
entry, bookkeeping) and per hook call (module stack push/pop, counted for each op), both
calibrated on synthetic chains of one-op modules. The op sequence of eager inference is
deterministic, so op i of every repeat is the same op; its median is taken over repeats. The
whole-model latency is measured in separate runs without timer or hooks, alternating with the
timed runs. With one thread every time is thread CPU time (immune to other processes' load),
otherwise wall time.

The measurement runs in a fresh interpreter (`python -m mobilehv.profile.torch request.json
result.json`) that builds the deploy form itself, with a heap that keeps freed memory (see
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mobilehv.profile.attribution import Scope
from mobilehv.profile.records import OpRecord, RunResult

METHOD = ("torch eager: aten ops timed in a TorchDispatchMode (glue before an op included, "
          "calibrated timer and hook costs subtracted), module stack from forward hooks")


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _shape(out) -> str:
    if isinstance(out, torch.Tensor):
        return "x".join(map(str, out.shape))
    if isinstance(out, (tuple, list)):
        return ",".join(_shape(o) for o in out if isinstance(o, torch.Tensor))
    return ""


@dataclass
class _ModuleStack:
    """Module chains being executed (root first) and how many hooks ran so far."""

    chains: list = field(default_factory=lambda: [()])
    hook_calls: int = 0


class _OpTimer(TorchDispatchMode):
    def __init__(self, stack: _ModuleStack, clock=time.perf_counter_ns):
        super().__init__()
        self.stack = stack
        self.clock = clock
        # (op, module chain, output shape, time since the previous op in us, hooks in between)
        self.events: list[tuple[str, tuple[Scope, ...], str, float, int]] = []
        self.hooks_seen = stack.hook_calls
        self.last = clock()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        end = self.clock()
        hooks = self.stack.hook_calls - self.hooks_seen
        self.events.append((func.overloadpacket.__name__, self.stack.chains[-1], _shape(out),
                            (end - self.last) / 1e3, hooks))
        self.hooks_seen = self.stack.hook_calls
        self.last = self.clock()
        return out


def _install_hooks(model: nn.Module, stack: _ModuleStack) -> list:
    handles = []
    for path, module in model.named_modules():
        scope = Scope(path, _qualname(module))

        def push(mod, args, scope=scope):
            stack.chains.append(stack.chains[-1] + (scope,))
            stack.hook_calls += 1

        def pop(mod, args, out):
            stack.chains.pop()
            stack.hook_calls += 1

        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop))
    return handles


class _OneOp(nn.Module):
    """A module running exactly one aten op of a common kind (conv, matmul, norm, pointwise,
    data movement), on a tensor small enough that the instrument's cost dominates."""

    def __init__(self, kind: int):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(8, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == 0:
            return torch.nn.functional.conv2d(x, self.weight)
        if self.kind == 1:
            return torch.matmul(x, x)
        if self.kind == 2:
            return torch.nn.functional.layer_norm(x, (4,))
        if self.kind == 3:
            return x.transpose(-1, -2)
        if self.kind == 4:
            return x.softmax(-1)
        return x + 1.0


class _Flat(nn.Module):
    """The same ops as a chain of `_OneOp`s, run inside one module (no hooks between ops)."""

    def __init__(self, chain: nn.Sequential):
        super().__init__()
        self.chain = chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.chain:
            x = op.forward(x)
        return x


def instrument_cost_us(clock=time.perf_counter_ns, n: int = 240, trials: int = 15) -> tuple[float, float]:
    """(cost per op, cost per hook call) of the instrument, in us, from the fastest of `trials`
    runs of `n` ops: the op cost from the ops run inside one module (no hooks), timed minus
    plain; the hook cost from one module per op (two hook calls per op), timed minus plain,
    less the op cost."""
    chain = nn.Sequential(*[_OneOp(i % 6) for i in range(n)])
    flat = _Flat(chain)
    x = torch.zeros(1, 8, 4, 4)
    times: dict[str, list[int]] = {k: [] for k in ("flat", "flat_timed", "chain", "chain_timed")}

    def clocked(key: str, fn) -> None:
        start = clock()
        fn()
        times[key].append(clock() - start)

    with torch.inference_mode():
        for _ in range(trials):
            stack = _ModuleStack()
            clocked("flat", lambda: flat(x))
            with _OpTimer(stack, clock):
                clocked("flat_timed", lambda: flat(x))
            clocked("chain", lambda: chain(x))
            handles = _install_hooks(chain, stack)
            with _OpTimer(stack, clock):
                clocked("chain_timed", lambda: chain(x))
            for h in handles:
                h.remove()
    best = {k: min(v) for k, v in times.items()}
    per_op = max(0.0, (best["flat_timed"] - best["flat"]) / n / 1e3)
    per_hook = max(0.0, ((best["chain_timed"] - best["chain"]) / n / 1e3 - per_op) / 2)
    return per_op, per_hook


def measure(name: str, layout: str, resolution: int, threads: int = 1, warmup: int = 5,
            repeats: int = 20) -> dict:
    """Profile the deploy form of registered model `name` in this process (the worker's side).

    Returns the whole-model latencies (ms), per op in execution order its type, module chain
    (`[path, class]` pairs), output shape and times (us, instrument costs subtracted), and the
    calibrated costs and minor page faults per timed run.
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
    per_op, per_hook = instrument_cost_us(clock)
    e2e, runs, faults = [], [], []
    with torch.inference_mode():
        # Plain and timed runs alternate, so both see the same machine state (caches,
        # frequency, other load); warm-up runs of both kinds are dropped.
        for i in range(warmup + repeats):
            start = clock()
            model(x)
            elapsed = (clock() - start) / 1e6
            stack = _ModuleStack()
            handles = _install_hooks(model, stack)
            flt = minor_faults()
            try:
                with _OpTimer(stack, clock) as timer:
                    model(x)
            finally:
                for h in handles:
                    h.remove()
            if i >= warmup:
                e2e.append(elapsed)
                runs.append(timer.events)
                faults.append(minor_faults() - flt)
    first = runs[0]
    if any(len(r) != len(first) for r in runs):
        return {"error": f"{name}: the eager op sequence changed between repeats"}
    ops = [[op, [[s.path, s.cls] for s in scopes], shape,
            [max(0.0, r[i][3] - per_op - r[i][4] * per_hook) for r in runs]]
           for i, (op, scopes, shape, _, _) in enumerate(first)]
    return {"ops": ops, "e2e_ms": e2e, "timer_cost_us": per_op, "hook_cost_us": per_hook,
            "page_faults_per_run": sum(faults) / len(faults)}


def run(name: str, *, layout: str, resolution: int, threads: int = 1, warmup: int = 5,
        repeats: int = 20) -> RunResult:
    """Per-op times (median over `repeats`) and whole-model latencies of the deploy form of
    `name` in eager mode, measured in a fresh interpreter (see the module docstring)."""
    import mobilehv
    from mobilehv.profile.ort_worker import run_fresh

    request = {"name": name, "layout": layout, "resolution": resolution, "threads": threads,
               "warmup": warmup, "repeats": repeats}
    # the worker imports this package from wherever the caller did, installed or not
    path = os.pathsep.join(filter(None, (str(Path(mobilehv.__file__).parents[1]), os.environ.get("PYTHONPATH"))))
    with tempfile.TemporaryDirectory(prefix="mobilehv-torch-") as tmp:
        measured = run_fresh([sys.executable, "-m", __name__], request, tmp, f"torch's worker on {name}",
                             env={"PYTHONPATH": path})
    if "error" in measured:
        raise RuntimeError(measured["error"])
    ops = [OpRecord(op_name=f"{op}_{i}", op_type=op, scopes=tuple(Scope(*s) for s in scopes),
                    output_shape=shape, samples_us=samples)
           for i, (op, scopes, shape, samples) in enumerate(measured["ops"])]
    return RunResult(name, "torch", layout, resolution, ops, measured["e2e_ms"], METHOD,
                     extra={"timer_cost_us": round(measured["timer_cost_us"], 3),
                            "hook_cost_us": round(measured["hook_cost_us"], 3),
                            "page_faults_per_run": round(measured["page_faults_per_run"], 1),
                            "clock": "thread_cpu" if threads == 1 else "wall"})


if __name__ == "__main__":
    request = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(measure(**request)))
