"""FoldCasts: remove casts that change no value.

Rules (each keeps every value bit-for-bit):
  cast(x, dtype(x))                 -> x
  cast(cast(x, A), B), A holds x    -> cast(x, B)   (x if B == dtype(x))
  two casts of x to the same dtype  -> one
A chain that rounds (fp32 -> fp16 -> fp32) is kept: removing it would change values silently.
A cast left with no reader but torch.export's dtype asserts on it goes, with those asserts.

Before: linear(fp16) -> cast(fp32) -> cast(fp16) -> linear(fp16)
After:  linear(fp16) -> linear(fp16)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter.passes.graph_utils import cast_target, is_cast, is_metadata_assert
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta

__all__ = ["FoldCasts", "holds"]

_WIDTH = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def holds(wide: torch.dtype, narrow: torch.dtype | None) -> bool:
    """True when every value of `narrow` is exactly representable in `wide`."""
    if narrow is None:
        return False
    if wide == narrow:
        return True
    return _WIDTH.get(wide, 0) > _WIDTH.get(narrow, 9) and wide != narrow


class FoldCasts(Pass):
    name = "fold_casts"

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        count = 0
        changed = True
        while changed:
            changed = False
            seen: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
            for node in list(graph.nodes):
                if not is_cast(node):
                    continue
                src, want = node.args[0], cast_target(node)
                have = meta.value_dtype(src)
                if have == want:
                    node.replace_all_uses_with(src)
                elif is_cast(src) and holds(cast_target(src), meta.value_dtype(src.args[0])):
                    inner = src.args[0]
                    if meta.value_dtype(inner) == want:
                        node.replace_all_uses_with(inner)
                    else:
                        node.replace_input_with(src, inner)
                        changed = True
                        count += 1
                        if not src.users:
                            graph.erase_node(src)
                        continue
                elif (src, want) in seen:
                    node.replace_all_uses_with(seen[(src, want)])
                else:
                    seen[(src, want)] = node
                    continue
                graph.erase_node(node)
                count += 1
                changed = True
            for node in list(graph.nodes):  # inner casts left without users by the rules above
                if is_cast(node) and all(is_metadata_assert(u) for u in node.users):
                    for check in list(node.users):  # asserts the dtype the cast was asked for: moot
                        graph.erase_node(check)
                    graph.erase_node(node)
                    count += 1
        return PassResult(gm, count > 0)
