"""PaddingMask: rebuild an attention mask that is a plain key padding mask from the padding input itself.

Before: mask = <_to_copy(attention_mask, bool), arange x3, add x2, unsqueeze x9, new_ones, ge, __and__ x2,
               index, expand ...>            (Hugging Face's sdpa_mask, 20+ nodes run on every call)
        sdpa(q, k, v, mask)
After:  mask = expand(unsqueeze(unsqueeze(_to_copy(attention_mask, bool), 1), 2), [-1, H, L, S])
        sdpa(q, k, v, mask)                   (4 nodes; the same boolean tensor)

Encoders called with an `attention_mask` (BERT and its kin in transformers 5) build SDPA's mask with
vmap-style index arithmetic over arange tensors. Every node costs host time in eager mode (the eager
BERT forward is bound by it) and a kernel in ONNX Runtime (GatherND, And, shape ops). The mask they
compute is mask[b, h, i, j] = attention_mask[b, j] != 0, which four nodes compute too.

Rewritten only when that is checked, not assumed:
  * the mask subgraph reads exactly one graph input, a 2-D integer or bool tensor [B, S] (S = the key
    length), plus constants and sizes (passes/attention_masks.py: no parameters, no random ops);
  * evaluated on concrete inputs it equals attention_mask[:, None, None, :] != 0 broadcast to the
    mask's shape: at the example batch size and at a second one, for an all-ones, an all-zeros, a
    left- and a right-padded input and three random 0/1 inputs (bool result, same shape each time);
  * the query and key lengths and the mask's head dimension are static (the expand needs them).
The old mask's nodes (and the `_assert_tensor_metadata` checks of their values) are removed when
nothing else reads them. The SDPA node records the rewrite in node.meta[REWRITTEN].
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter.passes.attention_masks import (SDPA, ancestors, batch_substitutions, concrete,
                                    evaluate, mask_arg, remove_dead)
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta

__all__ = ["PaddingMask"]

_A = torch.ops.aten
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def _padding_input(nodes: list[fx.Node]) -> fx.Node | None:
    """The one graph input the mask reads, when it is a 2-D integer/bool tensor; else None."""
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    val = inputs[0].meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or val.dtype not in _INT_DTYPES:
        return None
    return inputs[0]


def _trials(batch: int, keys: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + keys)
    ones = torch.ones(batch, keys, dtype=torch.int64)
    left, right = ones.clone(), ones.clone()
    left[:, : keys // 2] = 0
    right[:, keys // 2 + 1:] = 0
    out = [ones, torch.zeros_like(ones), left, right]
    out += [torch.randint(0, 2, (batch, keys), generator=g) for _ in range(3)]
    return [t.to(dtype) for t in out]


def _static_dims(mask: fx.Node) -> list[int] | None:
    """[-1, H, L, S] for expand when the mask is 4-D with static trailing dims, else None."""
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or val.dtype != torch.bool:
        return None
    dims = list(val.shape[1:])
    if not all(isinstance(d, int) for d in dims):
        return None
    return [-1, *dims]


def _verify(gm: fx.GraphModule, mask: fx.Node, nodes: list[fx.Node], source: fx.Node) -> str | None:
    """How the mask was checked to be source[:, None, None, :] != 0, or None when it is not."""
    checked = []
    for subs in batch_substitutions(gm, nodes):
        shape = [concrete(d, subs) for d in source.meta["val"].shape]
        for value in _trials(shape[0], shape[1], source.meta["val"].dtype):
            got = evaluate(gm, nodes, subs, {source: value})[mask]
            want = (value != 0)[:, None, None, :]
            if not isinstance(got, torch.Tensor) or got.dtype != torch.bool or got.dim() != 4 \
                    or got.shape[0] != shape[0] or not torch.equal(got, want.expand(got.shape)):
                return None
        checked.append(str(shape[0]))
    return f"checked on 7 padding patterns at batch {' and '.join(checked)}"


class PaddingMask(Pass):
    """Replace Hugging Face-style key padding mask subgraphs of SDPA by four nodes."""

    name = "padding_mask"

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        done: dict[fx.Node, tuple | None] = {}  # old mask -> (new mask, how, input name) or None
        old_nodes: set[fx.Node] = set()
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in SDPA:
                continue
            mask, _, where = mask_arg(node)
            if not isinstance(mask, fx.Node):
                continue
            if mask not in done:
                done[mask] = self._rebuild(gm, mask, old_nodes)
            if done[mask] is None:
                continue
            new, how, source = done[mask]
            if where[0] == "arg":
                node.update_arg(3, new)
            else:
                node.update_kwarg("attn_mask", new)
            notes = list(meta.get(node, meta.REWRITTEN) or [])
            notes.append({"pass": self.name, "reason": (
                f"attention mask '{mask.name}' is the key padding mask of input '{source}' ({how}): rebuilt as "
                "cast -> unsqueeze x2 -> expand, its subgraph removed")})
            meta.put(node, meta.REWRITTEN, notes)
        if old_nodes:
            remove_dead(old_nodes, graph)
        return PassResult(gm, any(v is not None for v in done.values()))

    def _rebuild(self, gm: fx.GraphModule, mask: fx.Node, old_nodes: set) -> tuple | None:
        if mask.op != "call_function" or _is_rebuilt(mask):
            return None
        dims = _static_dims(mask)
        if dims is None:
            return None
        try:
            nodes = ancestors(gm, mask, inputs_ok=True)
            source = _padding_input(nodes)
            how = _verify(gm, mask, nodes, source) if source is not None else None
        except Exception:  # NotShapeOnly, a size without example value, an op failing on concrete values
            return None
        if how is None:
            return None
        graph = gm.graph
        with graph.inserting_before(mask):
            cast = graph.call_function(_A._to_copy.default, (source,), {"dtype": torch.bool})
            u1 = graph.call_function(_A.unsqueeze.default, (cast, 1))
            u2 = graph.call_function(_A.unsqueeze.default, (u1, 2))
            new = graph.call_function(_A.expand.default, (u2, dims))
        val = source.meta.get("val")
        if isinstance(val, torch.Tensor):
            try:
                cast.meta["val"] = val.to(torch.bool)
                u1.meta["val"] = cast.meta["val"].unsqueeze(1)
                u2.meta["val"] = u1.meta["val"].unsqueeze(2)
            except Exception:  # fake tensors without their mode: the shapes below suffice
                pass
        new.meta["val"] = mask.meta["val"]
        for n in (cast, u1, u2, new):
            for key in ("nn_module_stack", "stack_trace"):
                if key in mask.meta:
                    n.meta[key] = mask.meta[key]
            meta.put(n, meta.CREATED, {"pass": self.name, "reason": f"key padding mask of '{source.name}' ({how})"})
        old_nodes.update(n for n in nodes if n.op != "placeholder")
        return new, how, source.name


def _is_rebuilt(mask: fx.Node) -> bool:
    return (meta.get(mask, meta.CREATED) or {}).get("pass") == PaddingMask.name
