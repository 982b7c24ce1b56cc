"""Op inventory of a module's `torch.export` graph (used by `mobilehv info` and the exporters)."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from mobilehv.taxonomy import is_data_movement, normalise


def export_graph_ops(module: nn.Module, resolution: int, batch: int = 1) -> Counter:
    """Counts of aten op names in the exported graph of `module` on a `(batch, 3, r, r)` input.

    Ops computed from weights alone (e.g. reshaping a norm's weight for broadcasting) are left
    out: every deploy runtime folds them into constants, so they cost nothing at run time.
    """
    x = torch.zeros(batch, 3, resolution, resolution)
    with torch.no_grad():
        program = torch.export.export(module.eval(), (x,))
    sig = program.graph_signature
    constant = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(
        sig.inputs_to_lifted_tensor_constants)
    ops: Counter = Counter()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if all(a.name in constant for a in node.all_input_nodes):
            constant.add(node.name)
            continue
        ops[normalise(str(node.target))] += 1
    return ops


def data_movement_count(ops: Counter) -> int:
    return sum(n for op, n in ops.items() if is_data_movement(op))
