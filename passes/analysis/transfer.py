"""TransferMeasurements: copy measured annotations from another capture of the same model.

A training conversion captures the model twice (rewriter/training.py). Calibration runs on the
evaluation graph only: its forward is deterministic and does not update batch-norm statistics. This
pass copies what was measured there (meta RANGE and SENSITIVITY, including "keep" decisions) onto the
matching nodes of the training graph, so Assign decides both graphs alike.

Before: eval graph  linear_3 {range: amax 9e4, keep float32}      train graph  linear_3 {}
After:  train graph linear_3 {range: amax 9e4, keep float32}      (then Assign keeps it fp32 in both)

Nodes are matched by (module path, op, occurrence of that op in that module), and tuple elements by
their source and index, so the extra or missing nodes of mode-dependent code (dropout, batch-norm
statistics updates) do not shift the other matches. Batch-norm variants count as one op.
"""
from __future__ import annotations

from collections import defaultdict

import torch.fx as fx

from rewriter.passes.graph_utils import is_tuple_getitem
from rewriter.passes.infra import AnalysisPass, PassResult
from rewriter.passes.op_tables import op_name
from rewriter import meta

__all__ = ["TransferMeasurements", "node_keys"]

_MEASURED = (meta.RANGE, meta.SENSITIVITY)
_SAME_OP = {"_native_batch_norm_legit_functional": "batch_norm", "_native_batch_norm_legit": "batch_norm",
            "_native_batch_norm_legit_no_training": "batch_norm", "native_batch_norm": "batch_norm",
            "native_dropout": "dropout"}


def node_keys(graph: fx.Graph) -> dict[fx.Node, tuple]:
    """A key per node that is the same for the same computation in two captures of one model."""
    keys: dict[fx.Node, tuple] = {}
    seen: dict[tuple, int] = defaultdict(int)
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            keys[node] = (node.op, str(node.target))
        elif is_tuple_getitem(node) and node.args[0] in keys:
            keys[node] = ("item", keys[node.args[0]], node.args[1])
        elif node.op != "output":
            name = op_name(node)
            base = (meta.module_path(node) or "", _SAME_OP.get(name, name))
            keys[node] = base + (seen[base],)
            seen[base] += 1
    return keys


class TransferMeasurements(AnalysisPass):
    """Copy RANGE and SENSITIVITY annotations from `source`'s graph to the matching nodes.

    Args:
        source: a GraphModule of the same model whose nodes carry measurements.
    """

    name = "transfer_measurements"

    def __init__(self, source: fx.GraphModule):
        self.source = source

    def call(self, gm: fx.GraphModule) -> PassResult:
        measured = {key: node for node, key in node_keys(self.source.graph).items()
                    if any(k in node.meta for k in _MEASURED)}
        if not measured:
            return PassResult(gm, False)
        for node, key in node_keys(gm.graph).items():
            src = measured.get(key)
            if src is None:
                continue
            for k in _MEASURED:
                if k in src.meta and k not in node.meta:
                    meta.put(node, k, src.meta[k])
        return PassResult(gm, False)
