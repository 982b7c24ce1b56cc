"""Op inventory of a module's `torch.export` graph (used by `mobilehv info` and the exporters)."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from mobilehv.taxonomy import is_data_movement, normalise


def _run_time_nodes(module: nn.Module, resolution: int, batch: int):
    """The call nodes of `module`'s `torch.export` graph on a `(batch, 3, r, r)` input, less
    those computed from weights alone (e.g. reshaping a norm's weight for broadcasting): every
    deploy runtime folds them into constants, so they cost nothing at run time."""
    x = torch.zeros(batch, 3, resolution, resolution)
    with torch.no_grad():
        program = torch.export.export(module.eval(), (x,))
    sig = program.graph_signature
    constant = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(
        sig.inputs_to_lifted_tensor_constants)
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if all(a.name in constant for a in node.all_input_nodes):
            constant.add(node.name)
            continue
        yield node


def graph_inventory(module: nn.Module, resolution: int, batch: int = 1) -> tuple[Counter, int]:
    """Counts of aten op names in the exported graph of `module` (see _run_time_nodes), and the
    elements its data-movement ops output: what a runtime that copies on every reshape and
    transpose (XNNPACK's copy nodes) moves, where a count weighs a view of a small `(N, d)`
    matrix the same as a transpose of a full feature map."""
    ops: Counter = Counter()
    moved = 0
    for node in _run_time_nodes(module, resolution, batch):
        op = normalise(str(node.target))
        ops[op] += 1
        if is_data_movement(op):
            val = node.meta["val"]
            moved += sum(t.numel() for t in (val if isinstance(val, (list, tuple)) else [val]))
    return ops, moved


def export_graph_ops(module: nn.Module, resolution: int, batch: int = 1) -> Counter:
    """The op counts of graph_inventory (what the exporters' sidecars record)."""
    return graph_inventory(module, resolution, batch)[0]


def data_movement_count(ops: Counter) -> int:
    return sum(n for op, n in ops.items() if is_data_movement(op))
