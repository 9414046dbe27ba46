"""PaddingMask: rebuild an attention mask that is a plain key padding mask from the padding input itself.

Before: keep = <f(attention_mask)>                        (the model's own test: != 0, == 1, a cast to bool)
        mask = <arange x3, add x2, unsqueeze x9, new_ones, ge, __and__ x2, index(keep, ...), expand ...>
        sdpa(q, k, v, mask)                   (Hugging Face's sdpa_mask, 20+ nodes run on every call)
After:  mask = expand(unsqueeze(unsqueeze(slice(keep, 0, 0, B), 1), 2), [-1, H, L, -1])
        sdpa(q, k, v, mask)                   (4-5 nodes; the same boolean tensor)

Encoders called with an `attention_mask` (BERT and its kin in transformers 5) build SDPA's mask with
vmap-style index arithmetic over arange tensors. Every node costs host time in eager mode (the eager
BERT forward is bound by it) and a kernel in ONNX Runtime (GatherND, And, shape ops). The mask they
compute is mask[b, h, i, j] = keep[b, j], with keep the model's own boolean test of the input.

Rewritten only when that holds for every input the original accepts, not for the patterns tried:
  * the mask subgraph reads exactly one graph input, a 2-D integer or bool tensor [B, S], plus
    constants and sizes (passes/attention_masks.py: no parameters, no random ops), and reads it only
    through ONE node `keep` of boolean values and the input's shape. `keep` stays in the graph as it
    is, so whatever the input holds (2, -1: not only 0/1) goes through the model's own test: a mask
    built from `am == 1` stays `am == 1`, never `am != 0`;
  * what follows `keep` is evaluated on boolean patterns fed in as `keep`'s value (all true, all
    false, left and right padded, three random) at several sizes of every symbol the subgraph reads
    (the example sizes, all small, all larger, each symbol different: batch and length vary
    independently, attention_masks.size_substitutions) and equals keep[:B, None, None, :] broadcast
    to the mask's shape [B, H, L, S] each time (bool result, that exact shape). Sizes at which the
    original fails (an index out of range) are sizes the original rejects and are skipped; at least
    two must pass;
  * the mask's dimensions are static or sizes some graph input carries (the new nodes read them).
The old mask's nodes (and the `_assert_tensor_metadata` checks of their values) are removed when
nothing else reads them. The SDPA node records the rewrite in node.meta[REWRITTEN] with the sizes.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter.passes.attention_masks import (SDPA, SIZE_READS, ancestors, concrete, describe_substitutions,
                                             evaluate, mask_arg, remove_dead, size_node, size_substitutions)
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta

__all__ = ["PaddingMask"]

_A = torch.ops.aten
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def _padding_input(nodes: list[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """(the one graph input the mask reads, the one node of the subgraph that reads it) when the
    input is a 2-D integer/bool tensor and that node gives a boolean tensor of its shape; else None."""
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    source = inputs[0]
    val = source.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or val.dtype not in _INT_DTYPES:
        return None
    members = set(nodes)
    readers = [u for u in source.users if u in members and u.target not in SIZE_READS]
    if len(readers) != 1:
        return None
    keep = readers[0]
    kept = keep.meta.get("val")
    if not isinstance(kept, torch.Tensor) or kept.dtype != torch.bool or kept.dim() != 2:
        return None
    if any(isinstance(a, fx.Node) and a is not source and a in members and a.op == "placeholder"
           for a in keep.all_input_nodes):
        return None
    return source, keep


def _patterns(batch: int, keys: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + keys)
    ones = torch.ones(batch, keys, dtype=torch.bool)
    left, right = ones.clone(), ones.clone()
    left[:, : keys // 2] = False
    right[:, keys // 2 + 1:] = False
    out = [ones, torch.zeros_like(ones), left, right]
    out += [torch.randint(0, 2, (batch, keys), generator=g).bool() for _ in range(3)]
    return out


def _sample_input(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(-2, 3, shape).to(dtype)


def _verify(gm: fx.GraphModule, mask: fx.Node, nodes: list[fx.Node], source: fx.Node,
            keep: fx.Node) -> str | None:
    """How the mask was checked to be keep[:B, None, None, :] broadcast, or None when it is not."""
    checked = []
    for subs in size_substitutions(nodes):
        shape = [concrete(d, subs) for d in keep.meta["val"].shape]
        want_shape = tuple(concrete(d, subs) for d in mask.meta["val"].shape)
        sample = _sample_input([concrete(d, subs) for d in source.meta["val"].shape],
                               source.meta["val"].dtype)
        failed = 0
        for pattern in _patterns(*shape):
            try:
                got = evaluate(gm, nodes, subs, {source: sample, keep: pattern})[mask]
            except (IndexError, RuntimeError):
                failed += 1  # the original rejects these sizes (e.g. a longer batch than the mask's)
                continue
            if not isinstance(got, torch.Tensor) or got.dtype != torch.bool or tuple(got.shape) != want_shape:
                return None
            batch = want_shape[0]
            if batch > shape[0]:
                return None  # the original ran where the rebuilt mask could not
            want = pattern[:batch, None, None, :]
            if want.shape[-1] != want_shape[-1] or not torch.equal(got, want.expand(want_shape)):
                return None
        if failed == 0:
            checked.append(subs)
        elif failed != 7:
            return None  # fails for some values only: not a size the original rejects
    if len(checked) < 2 and size_substitutions(nodes) != [{}]:
        return None
    return f"checked on 7 padding patterns at sizes {describe_substitutions(checked)}"


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
                "its own boolean test of the input -> unsqueeze x2 -> expand, its subgraph removed")})
            meta.put(node, meta.REWRITTEN, notes)
        if old_nodes:
            remove_dead(old_nodes, graph)
        return PassResult(gm, any(v is not None for v in done.values()))

    def _rebuild(self, gm: fx.GraphModule, mask: fx.Node, old_nodes: set) -> tuple | None:
        if mask.op != "call_function" or _is_rebuilt(mask):
            return None
        val = mask.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 4 or val.dtype != torch.bool:
            return None
        try:
            nodes = ancestors(gm, mask, inputs_ok=True)
            found = _padding_input(nodes)
            how = _verify(gm, mask, nodes, *found) if found is not None else None
        except Exception:  # NotShapeOnly, a size without example value, an op failing on concrete values
            return None
        if how is None:
            return None
        source, keep = found
        graph = gm.graph
        sizes = [size_node(gm, d, mask) for d in val.shape[:3]]
        if any(s is None for s in sizes):
            return None
        batch, heads, length = sizes
        same_batch = _same_size(val.shape[0], keep.meta["val"].shape[0])
        created = [n for n in sizes if isinstance(n, fx.Node) and not n.users and meta.CREATED not in n.meta]
        with graph.inserting_before(mask):
            rows = keep if same_batch else graph.call_function(_A.slice.Tensor, (keep, 0, 0, batch))
            u1 = graph.call_function(_A.unsqueeze.default, (rows, 1))
            u2 = graph.call_function(_A.unsqueeze.default, (u1, 2))
            new = graph.call_function(_A.expand.default, (u2, [-1, heads, length, -1]))
        try:
            kept = keep.meta["val"]
            rows.meta.setdefault("val", kept if same_batch else kept[: val.shape[0]])
            u1.meta["val"] = rows.meta["val"].unsqueeze(1)
            u2.meta["val"] = u1.meta["val"].unsqueeze(2)
        except Exception:  # fake tensors without their mode: the mask's own value below suffices
            pass
        new.meta["val"] = val
        for n in {rows, u1, u2, new, *created} - {keep}:
            for key in ("nn_module_stack", "stack_trace"):
                if key in mask.meta:
                    n.meta[key] = mask.meta[key]
            meta.put(n, meta.CREATED, {"pass": self.name, "reason": f"key padding mask of '{source.name}' ({how})"})
        old_nodes.update(n for n in nodes if n.op != "placeholder" and n is not keep
                         and n not in keep.all_input_nodes)
        return new, how, source.name


def _same_size(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.node.expr == b.node.expr


def _is_rebuilt(mask: fx.Node) -> bool:
    return (meta.get(mask, meta.CREATED) or {}).get("pass") == PaddingMask.name
