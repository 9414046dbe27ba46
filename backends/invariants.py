"""Invariant hoisting for the eager fast forward: work that does not depend on the input data runs once.

Exported graphs recompute, on every call, values that depend only on the weights or on the input sizes:
Swin's shifted-window attention mask (new_zeros, 9 slice/fill/slice_scatter writes, view, permute,
masked_fill: about 60 ops per shifted block), its relative-position bias (index a parameter table,
view, permute, clone), a rotary embedding's cos/sin for a given sequence length. When the GPU waits for
the host (eager transformers on a fast GPU, small batches) each of those ops costs its dispatch.

`hoist(graph)` finds, in the fast forward's copy of the graph, every connected region of ops whose
inputs are only
  * weights (the fast forward's dictionary reads),
  * sizes (SymInt values such as `sym_size(x, 1)`: they stay in the graph and feed the key), and
  * the dtype, device, shape and strides of a data tensor read by a metadata-only op (`new_zeros`,
    `zeros_like`, ...),
and replaces it by one call that computes the region's outputs once per key and returns them from a
small cache afterwards. The key holds everything the region reads: each weight's identity, storage
address and version counter (so `load_state_dict`, in-place updates and `.to()` are seen), each size,
each metadata tensor's dtype/device/shape/strides, and whether inference mode is on. A region is
computed afresh (not cached) while autograd would record it (grad enabled and a weight that requires
grad) and during a CUDA-graph capture. Ops that mutate, draw random numbers, or feed the graph's output
directly (a caller could modify a returned tensor) are never hoisted, so the result is exactly the
standard forward's, for every input.

Before: mask = masked_fill(ne(sub(unsqueeze(view(new_zeros(x, [h, w]))), ...)), ...)   (60 ops a call)
After:  mask = _rw_invariant_0(h, w, x)[0]             (one lookup; the 60 ops run once per (h, w))
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

__all__ = ["hoist", "METADATA_OPS"]

# ops that read only the dtype, device, shape and strides of their first (tensor) argument
METADATA_OPS = frozenset({"new_zeros", "new_ones", "new_empty", "new_full", "empty_like", "zeros_like",
                          "ones_like", "full_like", "new_empty_strided"})
_CACHE_SIZE = 8  # distinct keys kept per region (input sizes seen, devices)
_WEIGHT, _SIZE, _META = "weight", "size", "meta"


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _is_tensorish(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value)


def _pure(target: Any) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def _region_nodes(graph: fx.Graph, weights: set[fx.Node]) -> tuple[set[fx.Node], dict[fx.Node, str]]:
    """(the ops to hoist, leaf node -> its kind) in one forward walk of the graph."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    returned = set(output.all_input_nodes)
    region: set[fx.Node] = set()
    leaves: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node in weights or _is_size(node) or node in returned:
            continue
        if node.target is operator.getitem:
            if node.args[0] in region:
                region.add(node)
            continue
        if not _pure(node.target) or not _is_tensorish(node.meta.get("val")):
            continue
        metadata_arg = (node.target._overloadpacket.__name__ in METADATA_OPS and node.args
                        and isinstance(node.args[0], fx.Node))
        kinds = {}
        for i, arg in enumerate(node.all_input_nodes):
            if arg in region:
                continue
            if arg in weights:
                kinds[arg] = _WEIGHT
            elif _is_size(arg):
                kinds[arg] = _SIZE
            elif metadata_arg and arg is node.args[0]:
                kinds[arg] = _META
            else:
                break
        else:
            region.add(node)
            for arg, kind in kinds.items():
                if leaves.get(arg, kind) != kind:  # read as data elsewhere in a region: not a leaf
                    region.discard(node)
                    break
                leaves[arg] = kind
    return region, leaves


def _components(region: set[fx.Node], order: dict[fx.Node, int]) -> list[list[fx.Node]]:
    """Weakly connected parts of the region, each in graph order."""
    parent = {n: n for n in region}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in region:
        for arg in node.all_input_nodes:
            if arg in region:
                parent[find(arg)] = find(node)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in region:
        groups.setdefault(find(node), []).append(node)
    return [sorted(g, key=order.__getitem__) for g in groups.values()]


def _key_of(kind: str, value: Any) -> Any:
    if kind == _SIZE:
        return value
    if kind == _META:
        return (value.dtype, value.device, tuple(value.shape), tuple(value.stride()))
    return (id(value), value.data_ptr(), value._version, value.dtype, value.device)


def _cached(fn: Callable, kinds: tuple[str, ...], name: str) -> Callable:
    cache: dict = {}
    weight_slots = tuple(i for i, k in enumerate(kinds) if k == _WEIGHT)
    capturing = torch.cuda.is_current_stream_capturing if torch.cuda.is_available() else (lambda: False)

    def run(*inputs):
        if capturing() or (torch.is_grad_enabled() and any(inputs[i].requires_grad for i in weight_slots)):
            return fn(*inputs)
        try:
            key = (torch.is_inference_mode_enabled(), *map(_key_of, kinds, inputs))
        except RuntimeError:  # an inference tensor has no version counter: do not cache
            return fn(*inputs)
        hit = cache.get(key)
        if hit is None:
            hit = fn(*inputs)
            if len(cache) >= _CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = hit
        return hit

    run.__name__ = run.__qualname__ = name
    return run


def hoist(graph: fx.Graph, weights: set[fx.Node], min_ops: int = 2) -> dict:
    """Replace the data-independent regions of `graph` (see the module docstring) by cached calls.

    Args:
        graph: the fast forward's own copy of a converted graph (edited in place).
        weights: the nodes that read a weight (the fast forward's dictionary reads).
        min_ops: regions with fewer ops stay as they are (a lookup costs about one op's dispatch).
    Returns:
        {"regions": k, "ops": n}: how many regions were hoisted and how many ops they hold.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    region, leaves = _region_nodes(graph, weights)
    hoisted = {"regions": 0, "ops": 0}
    counter = itertools.count()
    for part in _components(region, order):
        ops = [n for n in part if n.target is not operator.getitem]
        if len(ops) < min_ops:
            continue
        members = set(part)
        inputs = sorted({a for n in part for a in n.all_input_nodes if a not in members}, key=order.__getitem__)
        outputs = [n for n in part if any(u not in members for u in n.users)]
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, node in enumerate(inputs):
            env[node] = sub.placeholder(f"in_{i}")
        for node in part:
            env[node] = sub.node_copy(node, env.__getitem__)
        sub.output(tuple(env[n] for n in outputs))
        fn = fx.GraphModule(torch.nn.Module(), sub).forward
        call = _cached(fn, tuple(leaves[n] for n in inputs), f"_rw_invariant_{next(counter)}")
        first_use = min(order[u] for n in outputs for u in n.users if u not in members)
        if inputs and order[inputs[-1]] >= first_use:  # no single place sees every input before a use
            continue
        with (graph.inserting_after(inputs[-1]) if inputs else graph.inserting_before(part[0])):
            result = graph.call_function(call, tuple(inputs))
        for i, node in reversed(list(enumerate(outputs))):
            with graph.inserting_after(result):
                read = graph.call_function(operator.getitem, (result, i))
            read.meta = dict(node.meta)
            node.replace_all_uses_with(read)
        for node in reversed(part):
            graph.erase_node(node)
        hoisted["regions"] += 1
        hoisted["ops"] += len(ops)
    return hoisted
