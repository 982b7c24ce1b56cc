"""ONNX: torch.onnx dynamo export, onnxsim, full checker, parity on onnxruntime (CPU).

Module attribution (for the profiler). The dynamo exporter writes on every node the module
that produced it, as node `metadata_props`:

* `pkg.torch.onnx.name_scopes`: Python-literal list of module paths from the root down,
  ending with the aten node's name, e.g. `['', 'stages', 'stages.0', 'stages.0.attn', 'matmul']`
  -> module path `stages.0.attn` (the second-to-last entry; `''` is the root module);
* `pkg.torch.onnx.class_hierarchy`: the matching classes, ending with the aten op, e.g.
  `['mobilehv.models.x.Net', ..., 'mobilehv.layers.blocks.Attention', 'aten.matmul.default']`.

onnxsim drops all node metadata, so the two entries are recorded before simplification and
re-attached afterwards: by node name (onnxsim keeps the names of the nodes it keeps), else by
output tensor name (a node onnxsim rebuilt that still produces a value the original graph
produced). Nodes that match neither (rare, folded constants' leftovers) stay unattributed;
the sidecar counts them under `attribution`. Stack traces and fx node dumps are not kept.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from mobilehv.export._common import compare

ATTRIBUTION_KEYS = ("pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy")
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def convert(deploy: torch.nn.Module, job, path: Path) -> dict:
    import onnx

    with torch.no_grad():
        program = torch.onnx.export(deploy, (job.x,), dynamo=True, opset_version=job.opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    external_data=False, optimize=True, verbose=False)
    model = program.model_proto
    by_name, by_output = _attribution(model)
    notes = []
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim's own check of the simplified model failed")
        model = simplified
        simplify = {"simplified": True}
    except Exception as e:  # keep the exporter's graph, say so
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        notes.append(f"onnxsim failed ({reason}); kept the unsimplified graph")
        simplify = {"simplified": False, "simplify_error": reason}
    attributed = _reattach(model, by_name, by_output)
    for key, value in (("mobilehv.model", job.name), ("mobilehv.layout", job.layout),
                       ("mobilehv.mean", str(list(job.mean))), ("mobilehv.std", str(list(job.std)))):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path), save_as_external_data=False)
    return {**simplify, "notes": notes, "opset": job.opset,
            "attribution": {"nodes": len(model.graph.node), "attributed": attributed,
                            "how": "node metadata_props " + ", ".join(ATTRIBUTION_KEYS)}}


def _attribution(model) -> tuple[dict, dict]:
    by_name, by_output = {}, {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props if p.key in ATTRIBUTION_KEYS}
        if props:
            by_name[node.name] = props
            for out in node.output:
                by_output[out] = props
    return by_name, by_output


def _reattach(model, by_name: dict, by_output: dict) -> int:
    """Give each node exactly the attribution entries; returns how many nodes have them."""
    attributed = 0
    for node in model.graph.node:
        props = by_name.get(node.name) or next((by_output[o] for o in node.output if o in by_output), None)
        del node.metadata_props[:]
        if props:
            for key, value in props.items():
                node.metadata_props.add(key=key, value=value)
            attributed += 1
    return attributed


def verify(path: Path, job) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run([OUTPUT_NAME], {INPUT_NAME: job.x.numpy()})
    return compare(out, job.ref, job.tolerance, f"onnxruntime {ort.__version__} CPU")


def op_counts(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
