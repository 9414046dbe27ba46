"""torch.no_grad() regions of forward in training graphs: their results carry no gradient.

torch.export records `with torch.no_grad():` as a `wrap_with_set_grad_enabled(False, submod, ...)`
higher-order op, which `run_decompositions` inlines, losing the region. capture therefore flags those
ops in `meta["custom"]` (which survives the inlining onto every node the region becomes) and, on the
decomposed graph, detaches each value that leaves a region:

Before: x -> linear(teacher)            -> sub(student_out, .)      (teacher gets gradients)
After:  x -> linear(teacher) -> detach  -> sub(student_out, .)      (teacher frozen, as in eager)

torch.inference_mode() is not recorded by torch.export at all (its results look like ordinary values).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter import meta

__all__ = ["flag_no_grad_regions", "cut_no_grad"]

_NO_GRAD = "rewriter.no_grad"  # temporary flag in node.meta["custom"] (survives run_decompositions)


def flag_no_grad_regions(gm: fx.GraphModule) -> None:
    """Mark the torch.no_grad() regions of a training capture (wrap_with_set_grad_enabled(False, ...)):
    run_decompositions inlines them and the mark, kept in meta["custom"], tells `cut_no_grad`
    which nodes they became."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is hop and node.args and node.args[0] is False:
            node.meta.setdefault("custom", {})[_NO_GRAD] = True


def cut_no_grad(gm: fx.GraphModule) -> int:
    """Detach every value that leaves a torch.no_grad() region, so no gradient flows into it (a frozen
    teacher stays frozen). Returns the number of detach nodes inserted."""
    count = 0
    for node in list(gm.graph.nodes):
        custom = node.meta.get("custom")
        if not (isinstance(custom, dict) and custom.pop(_NO_GRAD, False)):
            continue
        if not custom:
            node.meta.pop("custom")
        outside = [u for u in node.users
                   if not (isinstance(u.meta.get("custom"), dict) and u.meta["custom"].get(_NO_GRAD))]
        if not outside or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        with gm.graph.inserting_after(node):
            cut = gm.graph.call_function(torch.ops.aten.detach.default, (node,))
        cut.meta["val"] = node.meta["val"]
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                cut.meta[key] = node.meta[key]
        meta.put(cut, meta.REWRITTEN, [{"pass": "capture", "reason": "the value leaves a torch.no_grad() "
                                        "region of forward: it carries no gradient, as in the original"}])
        for user in outside:
            user.replace_input_with(node, cut)
        count += 1
    if count:
        gm.recompile()
    return count
