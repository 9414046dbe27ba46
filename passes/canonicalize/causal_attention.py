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
  * causal: the mask subgraph is evaluated concretely at several sizes of every symbol it reads (batch
    and sequence length are dynamic: the example sizes, all small, all larger, each symbol different;
    attention_masks.size_substitutions), and at each its last two dimensions are square (L == S, the
    query and key lengths) and every leading index holds the lower-triangular mask (bool: True where
    attended; float: 0 where attended and -inf, finfo.min or <= -1e30 elsewhere). Sizes at which the
    subgraph itself fails are sizes the original rejects; at least two must succeed;
  * full: at every size the mask attends everywhere (bool all True, float all 0). Hugging Face
    BERT called without an attention_mask exports such a mask; with it SDPA falls back to its math
    kernel when dropout is on (training), which on an H100 ran BERT-base's attention matmuls in fp32.
The nodes that only computed the mask (and the `_assert_tensor_metadata` checks of those values) are
removed. dropout_p and scale are kept as they were, so training graphs keep their semantics.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter.passes.attention_masks import (SDPA, NotShapeOnly, ancestors, concrete, describe_substitutions,
                                             evaluate, mask_arg, remove_dead, size_substitutions)
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta

__all__ = ["CausalAttention"]


def _mask_kinds(mask, length: int, keys: int) -> set[str]:
    """The kinds `mask` is: "full" when it lets every query see every key (bool all True, float all
    0: a no-op), "causal" when every leading index is the lower-triangular length x keys mask with
    L == S. Both at length 1 (one query, one key), neither for any other mask."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
        return set()
    if mask.dtype == torch.bool:
        attend = mask
    elif mask.is_floating_point():
        attend = mask == 0
        if not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min) | (mask <= -1e30)).all()):
            return set()  # a bias, not a mask
    else:
        return set()
    kinds = {"full"} if bool(attend.all()) else set()
    if length == keys and tuple(mask.shape[-2:]) == (length, keys):
        allowed = torch.ones(length, keys, dtype=torch.bool, device=mask.device).tril().expand(mask.shape)
        if torch.equal(attend, allowed):
            kinds.add("causal")
    return kinds


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
    """("causal" | "full", how it was verified: "verified at sizes s0=8,s1=512; s0=1,s1=1; ..."), or
    None. `values` caches the mask's concrete values: several attention layers share one mask."""
    substitutions = size_substitutions(nodes)
    kinds, checked = {"full", "causal"}, []
    for subs in substitutions:
        key = (mask, tuple(sorted((str(k), int(v)) for k, v in subs.items())))
        if key not in values:
            try:
                values[key] = evaluate(gm, nodes, subs)[mask]
            except (IndexError, RuntimeError):
                values[key] = None  # the original fails at these sizes too: nothing to preserve
        if values[key] is None:
            continue
        length, keys = _seq_lengths(node, subs)
        kinds &= _mask_kinds(values[key], length, keys)
        checked.append(subs)
    if not kinds or (len(checked) < 2 and substitutions != [{}]):
        return None
    kind = "full" if "full" in kinds else "causal"  # both only where every size had one query
    return kind, f"verified at sizes {describe_substitutions(checked)}"
