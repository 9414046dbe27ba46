"""CausalAttention: replace a materialised causal mask by scaled_dot_product_attention's is_causal,
and drop a materialised mask that masks nothing.

Before: mask = <arange, index, le, eq, __and__, cumsum, expand ... of sym_size(input_ids, 0)>
        sdpa(q, k, v, mask)
After:  sdpa(q, k, v, None, is_causal=True)          (the mask subgraph removed)
        sdpa(q, k, v)                                 (an all-attend mask: BERT trained without padding)

Hugging Face decoders (GPT-2 in transformers 5) build their causal mask as a tensor, and torch.export
records the ops that build it (about 30 nodes run on every call). With an explicit mask SDPA reads the
mask and cannot skip the masked blocks: on an H100 (GPT-2 124M, batch 8, seq 512, bf16, torch 2.11)
the cuDNN flash kernel took 34 us per layer with the mask and 18 us with is_causal. The rewrite is
exact: is_causal=True means the lower-triangular mask, and it is only made when the mask depends on
nothing but shapes and is that mask at two batch sizes:
  * shape-only: every ancestor of the mask is a constant buffer (get_attr, not a parameter, not written
    by the graph), a constant, or a size read with aten.sym_size / sym_numel / sym_stride; any other
    path from a graph input (a user-supplied padding mask, say) makes it data-dependent, and the node
    is left alone. Random or side-effecting ops also disqualify it;
  * causal: the mask subgraph is evaluated concretely at the example sizes and at a second batch size
    (the batch dimension is dynamic), and at both its last two dimensions are square (L == S, the
    query and key lengths) and every leading index holds the lower-triangular mask (bool: True where
    attended; float: 0 where attended and -inf, finfo.min or <= -1e30 elsewhere);
  * full: at both batch sizes the mask attends everywhere (bool all True, float all 0). Hugging Face
    BERT called without an attention_mask exports such a mask; with it SDPA falls back to its math
    kernel when dropout is on (training), which on an H100 ran BERT-base's attention matmuls in fp32.
The nodes that only computed the mask (and the `_assert_tensor_metadata` checks of those values) are
removed. dropout_p and scale are kept as they were, so training graphs keep their semantics.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter.passes.attention_masks import (SDPA, NotShapeOnly, ancestors, batch_substitutions, concrete,
                                    evaluate, mask_arg, remove_dead)
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta

__all__ = ["CausalAttention"]


def _mask_kind(mask, length: int, keys: int) -> str | None:
    """"full" when `mask` lets every query see every key (bool all True, float all 0: a no-op),
    "causal" when every leading index is the lower-triangular length x keys mask with L == S, else None."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
        return None
    if mask.dtype == torch.bool:
        attend = mask
    elif mask.is_floating_point():
        attend = mask == 0
        if not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min) | (mask <= -1e30)).all()):
            return None  # a bias, not a mask
    else:
        return None
    if bool(attend.all()):
        return "full"
    if length != keys or tuple(mask.shape[-2:]) != (length, keys):
        return None
    allowed = torch.ones(length, keys, dtype=torch.bool, device=mask.device).tril().expand(mask.shape)
    return "causal" if torch.equal(attend, allowed) else None


def _seq_lengths(node: fx.Node, subs: dict) -> tuple[int, int]:
    q, k = node.args[0].meta.get("val"), node.args[1].meta.get("val")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2 or k.dim() < 2:
        raise NotShapeOnly("query or key has no recorded shape")
    return concrete(q.shape[-2], subs), concrete(k.shape[-2], subs)


class CausalAttention(Pass):
    """Drop shape-only causal masks of scaled_dot_product_attention in favour of is_causal=True."""

    name = "causal_attention"

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        subgraphs: dict[fx.Node, list[fx.Node] | None] = {}  # mask -> the nodes computing it
        values: dict[tuple, object] = {}  # (mask, batch sizes) -> the mask's concrete value
        dropped: set[fx.Node] = set()  # masks no longer read by the rewritten attention nodes
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in SDPA:
                continue
            mask, causal, where = mask_arg(node)
            if causal or not isinstance(mask, fx.Node):
                continue
            if mask not in subgraphs:
                try:
                    subgraphs[mask] = ancestors(gm, mask)
                except NotShapeOnly:
                    subgraphs[mask] = None
            if subgraphs[mask] is None:
                continue
            try:
                verdict = _verify(gm, node, mask, subgraphs[mask], values)
            except Exception:  # a size without example value, an op that fails concretely: leave it
                continue
            if verdict is None:
                continue
            kind, how = verdict
            args, kwargs = list(node.args), dict(node.kwargs)
            if where[0] == "arg":
                args[3] = None
            else:
                kwargs.pop("attn_mask")
            if kind == "causal":
                if len(args) > 5:
                    args[5] = True
                else:
                    kwargs["is_causal"] = True
            if len(args) == 4:  # a trailing positional None mask is the default
                args.pop()
            node.args, node.kwargs = tuple(args), kwargs
            path = meta.module_path(mask)
            built = f" built in '{path}'" if path else ""
            notes = list(meta.get(node, meta.REWRITTEN) or [])
            effect = ("attn_mask dropped and is_causal=True, so the attention kernel skips the masked blocks"
                      if kind == "causal" else
                      "it masks nothing, so attn_mask was dropped and SDPA may pick a flash kernel")
            notes.append({"pass": self.name, "reason": (
                f"attention mask '{mask.name}'{built} is a shape-only {kind} mask ({how}): {effect}; "
                "the mask subgraph was removed")})
            meta.put(node, meta.REWRITTEN, notes)
            dropped.add(mask)
        if dropped:
            remove_dead({n for mask in dropped for n in subgraphs[mask]}, graph)
        return PassResult(gm, bool(dropped))


def _verify(gm: fx.GraphModule, node: fx.Node, mask: fx.Node, nodes: list[fx.Node],
            values: dict) -> tuple[str, str] | None:
    """("causal" | "full", how it was verified: "verified at batch 8 and 1, 512x512"), or None.
    `values` caches the mask's concrete values: several attention layers share one mask."""
    substitutions = batch_substitutions(gm, nodes)
    kinds = set()
    for subs in substitutions:
        key = (mask, tuple(sorted((str(k), int(v)) for k, v in subs.items())))
        if key not in values:
            values[key] = evaluate(gm, nodes, subs)[mask]
        value = values[key]
        length, keys = _seq_lengths(node, subs)
        kinds.add(_mask_kind(value, length, keys))
    if len(kinds) != 1 or None in kinds:
        return None
    kind = kinds.pop()
    shape = f"{length}x{keys}"
    if len(substitutions) == 1:
        return kind, f"verified at its only shape, {shape}"
    first, second = (sorted({int(v) for v in subs.values()}) for subs in substitutions)
    return kind, f"verified at batch {', '.join(map(str, first))} and {', '.join(map(str, second))}, {shape}"
