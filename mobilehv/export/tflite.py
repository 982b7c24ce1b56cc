"""TFLite: litert-torch conversion of the deploy form, parity with the LiteRT interpreter.

The input stays NCHW `(B, 3, H, W)` float32 as in PyTorch; litert-torch inserts the NHWC
transposes TFLite kernels need (they show up as TRANSPOSE ops around convolutions).

Module attribution (for the profiler): litert-torch keeps the module path in the name of
each op's output tensor: `/`-separated `<class>_<attribute>` segments from the root, then
`;<n>`, e.g. `pkg.Net/pkg.Block_block/mobilehv.layers.blocks.Attention_attn;11`; an op that
TFLite fused from several (conv + relu) joins their names with `;`. Read them with
`Interpreter.get_tensor_details()` for the tensor indices of `_get_ops_details()[i]["outputs"]`.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import torch

from mobilehv.export._common import compare


def convert(deploy: torch.nn.Module, job, path: Path) -> dict:
    import litert_torch
    from litert_torch import progress

    # litert-torch narrates every stage on its own rich console; the caller's output is enough.
    quiet, progress.console.quiet = progress.console.quiet, True
    try:
        with torch.no_grad():
            litert_torch.convert(deploy, (job.x,)).export(str(path))
            conversion = "default"
            # The converter's whole-graph optimisation passes can cost precision across blocks
            # (CoAtNet-0: 6.5e-4 after the first transformer stage, while every block alone is
            # exact to 5e-7). Then convert again without them and say so in the sidecar; the
            # parity check that follows judges whichever artifact is kept.
            probe = verify(path, job)
            if not probe["passed"]:
                litert_torch.convert(deploy, (job.x,), lightweight_conversion=True).export(str(path))
                conversion = (f"lightweight (the default optimisation passes gave max rel "
                              f"{probe['max_rel']:.2g})")
    finally:
        progress.console.quiet = quiet
    it = _interpreter(path)
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    return {"input": {"name": inp["name"], "shape": [int(d) for d in inp["shape"]], "dtype": "float32",
                      "layout": "NCHW", "preprocessing": "RGB in [0, 1], then (x - mean) / std"},
            "output": {"name": out["name"], "shape": [int(d) for d in out["shape"]], "meaning": "logits"},
            "conversion": conversion,
            "attribution": {"how": "op output tensor names: '/'-joined '<class>_<attribute>' module path, "
                                   "';'-joined when fused"}}


def _interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    with contextlib.redirect_stdout(None):
        it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    return it


def verify(path: Path, job) -> dict:
    import importlib.metadata

    it = _interpreter(path)
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    if list(inp["shape"]) != list(job.x.shape):
        raise ValueError(f"input shape {list(inp['shape'])} != {list(job.x.shape)}")
    it.set_tensor(inp["index"], job.x.numpy())
    it.invoke()
    runtime = f"ai-edge-litert {importlib.metadata.version('ai-edge-litert')} interpreter (XNNPACK)"
    return compare(it.get_tensor(out["index"]), job.ref, job.tolerance, runtime)


def op_counts(path: Path) -> Counter:
    # _get_ops_details is the interpreter's (underscored but stable) op listing; the flatbuffer
    # schema package is not a dependency.
    return Counter(op["op_name"] for op in _interpreter(path)._get_ops_details())
