"""LiteRT (TFLite) interpreter with XNNPACK, CPU.

Method (per-op times that really measure): the flatbuffer is cut into one single-op model per
operator (its input tensors, constants with their buffers, its outputs), each loaded in its own
XNNPACK interpreter, fed the real values its inputs take in the whole model (captured once with
the reference kernels and `experimental_preserve_all_tensors`), and timed alone: median of
`repeats` invokes after `warmup`. The whole model is timed the same way in its own interpreter.
One fusion is measured in context instead: XNNPACK folds a PAD into the convolution that
consumes it (the converter emits explicit PADs for PyTorch's symmetric padding of strided
convs). Alone, such a PAD copies the whole feature map (0.2-0.5 ms at 128 px); cut together with
its conv it adds nothing measurable. So a PAD whose only consumer is a conv is timed as the
two-op model minus the conv alone, and its records say `measure = "marginal"`.
The sum of ops still differs from the whole model: XNNPACK plans across ops in the whole graph,
each single-op invoke pays the interpreter's fixed per-invoke cost, and an op invoked alone
again and again keeps its weights in cache, which in the whole model are read once per
inference from further out (in the study the sums are 3-36% below the whole model, LeViT-256
the most, with one at 6% above). The summary reports that gap (`ops_vs_e2e_pct`) rather than
hiding it.

Module attribution: litert-torch names each op's output tensor after the module chain that
produced it, `root.Class/pkg.Class_attr/...;n`, `;`-joined for fused ops (see export/tflite.py).
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
from pathlib import Path

import numpy as np

from mobilehv.profile.attribution import Scope
from mobilehv.profile.records import OpRecord, RunResult
from mobilehv.taxonomy import op_category

METHOD = ("LiteRT interpreter + XNNPACK: each op cut into a single-op model, fed its real "
          "inputs and timed alone (a PAD feeding a conv: marginal cost of the pair, as XNNPACK "
          "fuses it); whole model timed separately")
# Ops XNNPACK fuses a preceding PAD into (its subgraph optimiser absorbs constant padding).
_PAD_ABSORBERS = {"CONV_2D", "DEPTHWISE_CONV_2D"}


class ArtifactError(ValueError):
    """The file is not a usable TFLite model for profiling."""


def parse_location(name: str) -> tuple[Scope, ...] | None:
    """`a.Net/b.Block_blocks/c.Attention_attn;3` -> scopes '', 'blocks', 'blocks.attn'."""
    parts = [p for p in name.split("/") if p]
    if not parts or "." not in parts[0]:
        return None
    scopes = [Scope("", parts[0])]
    path = []
    for part in parts[1:]:
        # class names carry no '_'; the module path before the class may ('mobile_former')
        head, dot, tail = part.rpartition(".")
        cls_name, _, attr = tail.partition("_")
        qualified = f"{head}{dot}{cls_name}"
        if not attr:
            return None
        path.append(attr)
        scopes.append(Scope(".".join(path), qualified))
    return tuple(scopes)


def tensor_scopes(name: str, op_type: str) -> tuple[Scope, ...] | None:
    """Module chain from an output tensor name. A name with several locations belongs to an op
    the converter merged others into: the location of the op's kind if one is (a conv with its
    activation), else the first, the op's own; the converter appends the merged ones (a residual
    Add lists the projection before it, a norm's Mean the norm of the block before). A reshape
    it moved through the ops after it lists those first and its origin after them, a sibling
    module of another kind (a Linear's output reshape inside the activation that follows)."""
    locations = [s for s in (parse_location(p) for p in name.split(";") if "/" in p or "." in p) if s]
    if not locations:
        return None
    want = op_category(op_type)
    for scopes in locations:
        if op_category(scopes[-1].short_cls) == want:
            return scopes
    own = locations[0]
    if want == "reshape":
        parent, kind = own[-1].path.rpartition(".")[0], own[-1].cls
        moved = [s for s in locations if s[-1].path.rpartition(".")[0] == parent and s[-1].cls != kind]
        return moved[-1] if moved else own
    return own


def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _load(path: Path):
    from ai_edge_litert import schema_py_generated as schema

    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ArtifactError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
    except Exception as e:  # flatbuffers raises anything on garbage
        raise ArtifactError(f"{path} is a corrupt TFLite file ({type(e).__name__})") from None
    if not model.subgraphs or not model.subgraphs[0].operators:
        raise ArtifactError(f"{path} has no operators")
    return data, model


def _interpreter(content: bytes, threads: int, reference: bool = False):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
              "experimental_preserve_all_tensors": True} if reference else {}
    with contextlib.redirect_stdout(io.StringIO()):
        it = Interpreter(model_content=content, num_threads=threads, **kwargs)
    it.allocate_tensors()
    return it


def _is_constant(model, tensor) -> bool:
    buf = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
    return buf is not None and ((buf.data is not None and len(buf.data) > 0) or (buf.offset or 0) > 1)


def cut_model(model, indices: list[int]) -> tuple[bytes, list[int]]:
    """Flatbuffer of operators `indices` of subgraph 0 (in graph order) alone; returns it and
    the original indices of its (non-constant) inputs, in the order of the new model's inputs.
    Its outputs are the last operator's outputs."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    sub = model.subgraphs[0]
    ops = [sub.operators[i] for i in indices]
    produced = {o for op in ops for o in op.outputs}
    used = list(dict.fromkeys(i for op in ops for i in list(op.inputs) + list(op.outputs) if i >= 0))
    new = schema.ModelT()
    new.version, new.description = model.version, b"mobilehv cut"
    new.operatorCodes = model.operatorCodes
    new.buffers = [schema.BufferT()]
    remap, tensors, inputs = {}, [], []
    for old in used:
        t = copy.copy(sub.tensors[old])
        if _is_constant(model, t):
            new.buffers.append(model.buffers[t.buffer])
            t.buffer = len(new.buffers) - 1
        else:
            t.buffer = 0
            if old not in produced:
                inputs.append(old)
        remap[old] = len(tensors)
        tensors.append(t)
    cut = []
    for op in ops:
        one = copy.copy(op)
        one.inputs = [remap[i] if i >= 0 else -1 for i in op.inputs]
        one.outputs = [remap[i] for i in op.outputs]
        cut.append(one)
    graph = schema.SubGraphT()
    graph.tensors, graph.operators = tensors, cut
    graph.inputs = [remap[i] for i in inputs]
    graph.outputs = cut[-1].outputs
    new.subgraphs = [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(new.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), inputs


def _fused_pads(sub, op_types: list[str]) -> dict[int, int]:
    """PAD index -> the conv it feeds, for PADs whose output has that conv as its only reader."""
    readers: dict[int, list[int]] = {}
    for j, op in enumerate(sub.operators):
        for t in set(op.inputs):
            readers.setdefault(t, []).append(j)
    pads = {}
    for i, op in enumerate(sub.operators):
        if op_types[i] not in ("PAD", "PADV2") or op.outputs[0] in sub.outputs:
            continue
        (j, *more) = readers.get(op.outputs[0], [None])
        if j is not None and not more and op_types[j] in _PAD_ABSORBERS:
            pads[i] = j
    return pads


def _time_invokes(it, warmup: int, repeats: int, clock) -> list[float]:
    for _ in range(warmup):
        it.invoke()
    out = []
    for _ in range(repeats):
        start = clock()
        it.invoke()
        out.append((clock() - start) / 1e3)
    return out


def run(path: str | Path, *, name: str, layout: str, threads: int = 1, warmup: int = 5,
        repeats: int = 20) -> RunResult:
    path = Path(path)
    data, model = _load(path)
    sub = model.subgraphs[0]
    try:
        reference = _interpreter(data, threads, reference=True)
    except Exception as e:
        raise ArtifactError(f"LiteRT cannot load {path}: {str(e).splitlines()[0]}") from None
    inp = reference.get_input_details()[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(inp["shape"]).astype(inp["dtype"])
    reference.set_tensor(inp["index"], x)
    reference.invoke()
    values = {i: reference.get_tensor(i) for i in range(len(sub.tensors)) if _has_value(reference, i)}

    clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
    whole = _interpreter(data, threads)
    whole.set_tensor(whole.get_input_details()[0]["index"], x)
    e2e_us = _time_invokes(whole, warmup, repeats, clock)

    names = _builtin_names()
    op_types = []
    for op in sub.operators:
        code = model.operatorCodes[op.opcodeIndex]
        op_type = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
        op_types.append(code.customCode.decode() if op_type == "CUSTOM" and code.customCode else op_type)
    fused = _fused_pads(sub, op_types)

    def samples(indices: list[int]) -> list[float]:
        content, feeds = cut_model(model, indices)
        it = _interpreter(content, threads)
        for detail, old in zip(it.get_input_details(), feeds):
            it.set_tensor(detail["index"], values[old])
        return _time_invokes(it, max(1, warmup // 2), repeats, clock)

    times = {i: samples([i]) for i in range(len(sub.operators)) if i not in fused}
    ops = []
    for index, op in enumerate(sub.operators):
        op_type, measure = op_types[index], "measured"
        if index in fused:  # the pair's time beyond the conv's own: what the PAD costs when fused
            conv_us = float(np.median(times[fused[index]]))
            times[index] = [max(t - conv_us, 0.0) for t in samples([index, fused[index]])]
            measure = "marginal"
        out = sub.tensors[op.outputs[0]]
        scopes = tensor_scopes(out.name.decode(errors="replace"), op_type)
        if scopes is None:  # e.g. the graph output 'serving_default_output_0': use its input's producer
            scopes = next((tensor_scopes(sub.tensors[i].name.decode(errors="replace"), op_type)
                           for i in op.inputs if i >= 0 and not _is_constant(model, sub.tensors[i])), None)
        shape = ",".join("x".join(map(str, sub.tensors[o].shape)) for o in op.outputs)
        ops.append(OpRecord(f"{index}:{out.name.decode(errors='replace')[:80]}", op_type,
                            scopes or (), shape, times[index], measure))
    return RunResult(name, "tflite", layout, int(inp["shape"][-1]), ops,
                     [t / 1e3 for t in e2e_us], METHOD, artifact=path.name,
                     extra={"clock": "thread_cpu" if threads == 1 else "wall"})


def _has_value(it, index: int) -> bool:
    try:
        it.get_tensor(index)
        return True
    except ValueError:
        return False
