"""The inputs of a captured model: which dimensions stay dynamic, and checking calls against them.

Dynamic shapes (`dynamic_shapes_for`): by default every dimension of every tensor input is
`torch.export.Dim.AUTO`, so export keeps it symbolic unless the model's code fixes it (a Linear's
input width, a positional table's length, the 3 channels of a conv): batch, sequence length and
image height/width stay dynamic wherever the model allows. `dynamic_batch=False` keeps dimension 0
static, `static=True` every dimension; a `dynamic_shapes=` the user wrote (torch.export's own format)
is used as it is.

Checking calls (`install`): torch.export checks a call with `_guards_fn`, a submodule whose failed
check is an `AssertionError: Guard failed: input_ids.size()[1] <= 128`, and with a pre-hook that
rejects a keyword call of a model captured from positional inputs (and the reverse). `install`
puts in their place
  * `InputCheck`, the same submodule slot (the graph's `_guards_fn` call): every dimension against
    what was captured (static size, allowed range, dimensions that must be equal), then export's own
    guards (divisibility and the like). A failure is an InputError naming the input, the dimension,
    the value, the allowed range and what to do;
  * a pre-hook that binds a call by the original forward's signature, so `fast(ids, mask)` and
    `fast(input_ids=ids, attention_mask=mask)` both work when the original accepts both, and that
    names a missing or unexpected input in an InputError.
What was captured is recorded in gm.meta[meta.INPUT_SHAPES] and gm.meta[meta.CALL_SIGNATURE] (JSON-able).
"""
from __future__ import annotations

import inspect
import sympy
import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from rewriter import meta
from rewriter.errors import InputError

__all__ = ["dynamic_shapes_for", "shapes_by_signature", "batch_dynamic_shapes", "InputCheck", "install", "input_shapes",
           "describe_shapes", "bind_call", "rejects_ones", "reinstall"]


# ---------------------------------------------------------------- dynamic_shapes for torch.export


def _spec_tree(value, dims_of):
    if isinstance(value, torch.Tensor):
        dims = dims_of(value)
        return dims or None
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_spec_tree(x, dims_of) for x in value)
    if isinstance(value, dict) and type(value) is dict:
        return {k: _spec_tree(x, dims_of) for k, x in value.items()}
    return None  # other objects (caches, dataclasses) stay static


def dynamic_shapes_for(forward, args: tuple, kwargs: dict, *, batch: bool = True, other: bool = True,
                       dim=None):
    """`dynamic_shapes` for torch.export: `dim` (Dim.AUTO by default) on dimension 0 of every tensor
    input when `batch`, and on every other dimension when `other`.

    Args:
        forward: the function that will be exported (its signature names the inputs).
        args, kwargs: the example inputs.

    Returns:
        A dict keyed by parameter name, or a tuple of specs when the signature cannot be bound;
        None when no dimension is dynamic.

    Example:
        >>> dynamic_shapes_for(model.forward, (ids,), {})        # {"input_ids": {0: AUTO, 1: AUTO}}
    """
    if not batch and not other:
        return None
    dim = torch.export.Dim.AUTO if dim is None else dim

    def dims_of(t: torch.Tensor) -> dict:
        return {i: dim for i in range(t.dim()) if (batch if i == 0 else other)}

    return shapes_by_signature(forward, args, kwargs, dims_of)


def shapes_by_signature(forward, args: tuple, kwargs: dict, dims_of):
    """`dynamic_shapes` in torch.export's format, keyed by `forward`'s parameter names: `dims_of(tensor)`
    ({dim: Dim}) for every tensor input, nested lists/tuples/dicts followed, other objects static. A
    forward whose signature does not bind the inputs gets a tuple by position (None with kwargs)."""
    try:
        sig = inspect.signature(forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(_spec_tree(a, dims_of) for a in args) if not kwargs else None
    shapes = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(_spec_tree(v, dims_of) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: _spec_tree(v, dims_of) for k, v in value.items()}
        else:
            shapes[name] = _spec_tree(value, dims_of)
    return shapes


def batch_dynamic_shapes(forward, args: tuple, kwargs: dict, dim=None):
    """`dynamic_shapes` marking only dimension 0 of every tensor input (kept for rewriter.io and the
    ONNX backend, which re-export a converted graph)."""
    return dynamic_shapes_for(forward, args, kwargs, batch=True, other=False, dim=dim)


# ---------------------------------------------------------------- what was captured


def _bound(expr, ranges: dict) -> tuple[int, int | None]:
    vr = ranges.get(str(expr))
    if vr is None:
        return 2, None
    return _int_or_none(vr.lower) or 0, _int_or_none(vr.upper)


def _int_or_none(value) -> int | None:
    """An int for a finite bound; None for infinity (sympy.oo or torch's int_oo)."""
    if value is None or "oo" in str(value):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError):
        return None


def input_shapes(gm: fx.GraphModule, range_constraints: dict) -> list[dict]:
    """[{"name": "input_ids", "dims": [2 | {"symbol": "s0", "min": 2, "max": 128 | None}
    | {"expr": "2*s0"}], "dtype": "int64", "exact_dtype": bool}] for each tensor input of the captured
    graph, in placeholder order. "exact_dtype": the graph asserts the input's dtype (torch.export's
    `_assert_tensor_metadata`), so only that dtype runs."""
    names = _input_names(gm)
    ranges = {str(k): v for k, v in (range_constraints or {}).items()}
    asserted = _asserted_dtypes(gm)
    result = []
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], names):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            result.append({"name": name, "dims": None})
            continue
        dims: list = []
        for size in val.shape:
            if isinstance(size, int):
                dims.append(int(size))
                continue
            expr = size.node.expr
            if isinstance(expr, sympy.Symbol):
                lo, hi = _bound(expr, ranges)
                dims.append({"symbol": str(expr), "min": lo, "max": hi})
            elif expr.is_number:
                dims.append(int(expr))
            else:
                dims.append({"expr": str(expr)})
        result.append({"name": name, "dims": dims, "dtype": str(val.dtype).replace("torch.", ""),
                       "exact_dtype": node.name in asserted})
    return result


def _asserted_dtypes(gm: fx.GraphModule) -> set[str]:
    """Names of the placeholders whose dtype the graph asserts (aten._assert_tensor_metadata with a
    dtype): a call with another dtype would fail there with torch's bare 'Tensor dtype mismatch!'."""
    names = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            first = node.args[0] if node.args else None
            dtype = node.args[3] if len(node.args) > 3 else node.kwargs.get("dtype")
            if isinstance(first, fx.Node) and first.op == "placeholder" and dtype is not None:
                names.add(first.name)
    return names


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def _check_dtype(entry: dict, value: torch.Tensor) -> None:
    """An input of another kind (integer token ids given as floats, a float image given as uint8, a
    bool mask where int64 was captured) or, where the graph asserts it, another dtype: InputError."""
    want = entry.get("dtype")
    if want is None:
        return
    captured = getattr(torch, want, None)
    if not isinstance(captured, torch.dtype) or value.dtype == captured:
        return
    if _dtype_kind(value.dtype) == _dtype_kind(captured) and not entry.get("exact_dtype"):
        return  # int32 ids for int64, fp16 pixels for fp32: the graph's ops accept them as the model did
    name = entry["name"]
    raise InputError(
        f"input '{name}' has dtype {str(value.dtype).replace('torch.', '')}, but the converted model was "
        f"captured with {want} ({_dtype_kind(captured)}"
        f"{'; the graph requires exactly this dtype' if entry.get('exact_dtype') else ''}). Call it with "
        f"'{name}' as {want}, e.g. {_arg(name)}.to(torch.{want}).")


def _input_names(gm: fx.GraphModule) -> list[str]:
    """'input_ids', 'x', 'pixel_values[1]': the path of each flat input, for messages."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    spec = getattr(gm, "_in_spec", None)
    try:
        leaves = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = [p for p, _ in pytree.tree_flatten_with_path(leaves)[0]]
    except Exception:  # no spec (symbolic_trace) or an unusual one: the placeholder names
        return [str(n.target) for n in placeholders]
    if len(paths) != len(placeholders):
        return [str(n.target) for n in placeholders]
    names = []
    for path, node in zip(paths, placeholders):
        rest = path[1:]
        if len(rest) == 1:  # a top-level input: its parameter name
            names.append(str(getattr(rest[0], "key", node.target)) if path[0].idx == 1 else str(node.target))
        elif path[0].idx == 1:
            names.append(str(rest[0].key) + pytree.keystr(rest[1:]))
        else:
            names.append(f"args[{rest[0].idx}]" + pytree.keystr(rest[1:]))
    return names


def describe_shapes(shapes: list[dict]) -> str:
    """'input_ids [batch 2.., seq 2..128]': the dynamic dimensions, for notes and messages."""
    parts = []
    for entry in shapes:
        dims = entry.get("dims")
        if not dims:
            continue
        text = []
        for d in dims:
            if isinstance(d, int):
                text.append(str(d))
            elif "symbol" in d:
                text.append(f"{d['symbol']}:{_range_text(d)}")
            else:
                text.append(d["expr"])
        parts.append(f"{entry['name']}[{', '.join(text)}]")
    return "; ".join(parts)


def _range_text(d: dict) -> str:
    lo = 1 if d["min"] <= 2 else d["min"]  # export's 2 is its 0/1 specialisation: 1 runs too
    return f"{lo}..{d['max']}" if d["max"] is not None else f"{lo}.."


def rejects_ones(ep) -> set[str]:
    """The batch and token-length symbols of exported program `ep` whose guards reject size 1 (a
    batch of one, a one-token step) although export's range allows it: each probed alone, with empty
    tensors, at 1 while the other sizes keep their example values (nothing is run). Batch: the
    symbol of dimension 0 of an input; token length: a dimension of an integer input."""
    gm = ep.module()
    guards = getattr(gm, "_guards_fn", None)
    if not isinstance(guards, nn.Module):
        return set()
    ranges = {str(k): v for k, v in (ep.range_constraints or {}).items()}
    inputs, candidates = [], set()
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for i, d in enumerate(val.shape):
                if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                    vr = ranges.get(str(d.node.expr))
                    low = _int_or_none(vr.lower) if vr is not None else None
                    if (i == 0 or not val.is_floating_point()) and low is not None and low <= 2:
                        candidates.add(str(d.node.expr))
        elif not isinstance(val, (int, float, bool, str)) and val is not None:
            return set()  # a symbolic int input: nothing to probe with
        inputs.append(val)

    def probe(symbols) -> bool:
        flat = []
        for val in inputs:
            if not isinstance(val, torch.Tensor):
                flat.append(val)
                continue
            shape = []
            for d in val.shape:
                if isinstance(d, int) or d.node.expr.is_number:
                    shape.append(int(d))
                elif str(d.node.expr) in symbols:
                    shape.append(1)
                else:
                    hint = getattr(d.node, "hint", None)
                    if hint is None:
                        return True
                    shape.append(int(hint))
            flat.append(torch.empty(shape, dtype=val.dtype))
        try:
            guards(*flat)
        except AssertionError:
            return False
        except Exception:  # a guard this probe cannot evaluate: keep export's default
            return True
        return True

    rejected = {symbol for symbol in sorted(candidates) if not probe({symbol})}
    if candidates and not probe(candidates):  # all at once: inputs whose batches must agree
        rejected.add("all at 1")
    return rejected


# ---------------------------------------------------------------- checking a call


class InputCheck(nn.Module):
    """Checks the flat inputs of a call against the captured shapes; raises InputError.

    Sits where torch.export put its `_guards_fn` (called by the graph with the user inputs), and
    runs export's guards after its own checks, so every check export made is still made."""

    def __init__(self, shapes: list[dict], guards: nn.Module | None):
        super().__init__()
        self.shapes = shapes
        self.guards = guards
        self._is_impure = True  # called for its checks only: dead-code elimination keeps it

    def forward(self, *flat):
        seen: dict[str, tuple[int, str, int]] = {}
        for entry, value in zip(self.shapes, flat):
            dims = entry.get("dims")
            if dims is None:
                continue
            name = entry["name"]
            if not isinstance(value, torch.Tensor):
                given = "None" if value is None else f"a {type(value).__name__}"
                raise InputError(
                    f"input '{name}' is {given}, but the converted model was captured with a tensor there "
                    f"({len(dims)} dimensions, {entry.get('dtype', 'a tensor')}) and needs one on every "
                    f"call. Pass '{name}' as a tensor (a padding mask of all ones where there is no "
                    "padding), or convert again with example inputs that leave it out.")
            _check_dtype(entry, value)
            if value.dim() != len(dims):
                raise InputError(
                    f"input '{name}' has {value.dim()} dimensions {tuple(value.shape)}, but the converted "
                    f"model was captured with {len(dims)} ({_dims_text(dims)}). Call it with inputs of "
                    "the rank it was converted with.")
            for i, (want, size) in enumerate(zip(dims, value.shape)):
                if isinstance(want, int):
                    if size != want:
                        raise InputError(
                            f"input '{name}' dimension {i} is {size}, but it is static at {want} in the "
                            f"converted model (captured shapes: {describe_shapes(self.shapes)}; the "
                            "capture notes in model.meta['rewriter']['notes'] say why). What to "
                            "do: convert without static=True, or pass dynamic_shapes= (torch.export's "
                            f"format, e.g. {{'{_arg(name)}': {{{i}: torch.export.Dim.DYNAMIC}}}}) to keep "
                            "it dynamic; if the model itself fixes this size, call it with "
                            f"{want}.")
                    continue
                if "symbol" not in want:
                    continue  # a derived size (2*s0): export's guards below check it
                symbol = want["symbol"]
                if symbol in seen and seen[symbol][0] != size:
                    other_size, other_name, other_dim = seen[symbol]
                    raise InputError(
                        f"input '{name}' dimension {i} is {size}, but input '{other_name}' dimension "
                        f"{other_dim} is {other_size}: the model requires them equal (both are "
                        f"{symbol} in the captured graph). Call it with matching sizes.")
                seen.setdefault(symbol, (size, name, i))
                lo, hi = want["min"], want["max"]
                if (hi is not None and size > hi) or (lo > 2 and size < lo):
                    raise InputError(
                        f"input '{name}' dimension {i} is {size}, outside the range {_range_text(want)} "
                        f"the converted model allows (captured shapes: {describe_shapes(self.shapes)}). "
                        "The captured graph holds only in this range: the model's code bounds the size "
                        "(a position table) or takes another path outside it. Call it within the range, "
                        "or convert with example inputs of the size you need (a model with a size limit: "
                        "rebuild it with a larger one).")
        if self.guards is not None:
            try:
                self.guards(*flat)
            except AssertionError as exc:
                text = str(exc).replace("Guard failed: ", "")
                raise InputError(
                    f"the inputs break a condition the model's code imposed when it was captured: {text} "
                    f"(captured shapes: {describe_shapes(self.shapes)}). Call the converted model with "
                    "inputs that satisfy it, or convert with example inputs of that shape.") from None


def _dims_text(dims) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else d.get("symbol", d.get("expr", "?"))
                           for d in dims) + "]"


def _arg(name: str) -> str:
    return name.split("[", 1)[0]


def install(gm: fx.GraphModule, range_constraints: dict, forward, args: tuple, kwargs: dict) -> list[dict]:
    """Replace torch.export's input guards and input-structure hook of `gm` by ours (see the module
    docstring). Returns the captured shapes (also in gm.meta[meta.INPUT_SHAPES])."""
    return reinstall(gm, range_constraints, _signature_record(forward, args, kwargs))


def reinstall(gm: fx.GraphModule, range_constraints: dict, signature: dict | None) -> list[dict]:
    """`install` for a program loaded from a file (`ep.module()` of a saved converted model): its
    shapes from the loaded program, the call signature from the record `install` made at convert."""
    shapes = input_shapes(gm, range_constraints)
    guards = getattr(gm, "_guards_fn", None)
    check = InputCheck(shapes, guards if isinstance(guards, nn.Module) else None)
    if "_guards_fn" in gm._modules:
        gm._modules["_guards_fn"] = check
    else:
        gm.add_module("_guards_fn", check)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if placeholders:
            with gm.graph.inserting_after(placeholders[-1]):
                gm.graph.call_module("_guards_fn", tuple(placeholders))
            gm.recompile()
    gm.meta[meta.INPUT_SHAPES] = shapes
    gm.meta[meta.CALL_SIGNATURE] = signature
    hooks = gm._forward_pre_hooks
    for key, hook in list(hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            hooks[key] = _call_hook  # same slot: runs where export's check ran, with kwargs
            break
    else:
        gm.register_forward_pre_hook(_call_hook, with_kwargs=True)
    return shapes


def _signature_record(forward, args: tuple, kwargs: dict) -> dict | None:
    try:
        sig = inspect.signature(forward)
        sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    params = [[p.name, int(p.kind), p.default is not inspect.Parameter.empty]
              for p in sig.parameters.values()]
    names = list(sig.parameters)
    positional = []
    for i in range(len(args)):
        p = sig.parameters[names[min(i, len(names) - 1)]]
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None  # *args models: calls must match the captured structure exactly
        positional.append(p.name)
    return {"params": params, "args": positional, "kwargs": list(kwargs)}


def bind_call(record: dict, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Map a call onto the structure the model was captured with (positional names and keyword
    names of the example inputs), by the original forward's signature.

    Inputs left at their default (absent, or None) are dropped; an input that was not captured, or a
    missing one, is an InputError."""
    params = [inspect.Parameter(name, inspect._ParameterKind(kind),
                                default=None if has_default else inspect.Parameter.empty)
              for name, kind, has_default in record["params"]]
    sig = inspect.Signature(params)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(f"the converted model cannot be called this way: {exc}. It takes the "
                         f"inputs of the original forward{sig}.") from None
    values = dict(bound.arguments)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD and p.name in values:
            values.update(values.pop(p.name))
    wanted = list(record["args"]) + list(record["kwargs"])
    missing = [n for n in wanted if n not in values]
    if missing:
        raise InputError(f"input {', '.join(repr(m) for m in missing)} missing: the model was converted "
                         f"with inputs {wanted} and needs each of them on every call.")
    extra = [n for n, v in values.items() if n not in wanted and v is not None]
    if extra:
        raise InputError(
            f"input {', '.join(repr(e) for e in extra)} was not among the example inputs the model was "
            f"converted with ({wanted}), so the converted graph has no place for it. Convert again "
            "with it in the example inputs.")
    return tuple(values[n] for n in record["args"]), {n: values[n] for n in record["kwargs"]}


def _call_hook(module, args, kwargs):
    record = module.meta.get(meta.CALL_SIGNATURE) if hasattr(module, "meta") else None
    spec = getattr(module, "_in_spec", None)
    if record is not None and (len(args) != len(record["args"]) or list(kwargs) != record["kwargs"]):
        args, kwargs = bind_call(record, args, kwargs)
        changed = True
    else:
        changed = False
    if spec is not None:
        _check_structure(args, kwargs, spec)
    return (args, kwargs) if changed else None


def _check_structure(args, kwargs, spec) -> None:
    try:
        from torch.export._unlift import _check_inputs_match
    except ImportError:  # a torch without it: the graph's flatten reports mismatches itself
        return
    try:
        _check_inputs_match(args, kwargs, spec)
    except ValueError as exc:
        raise InputError(
            "the inputs do not have the structure the model was converted with (the number and "
            "kinds of inputs, nested lists and dicts, None where a tensor was): "
            f"{str(exc).splitlines()[-1] if str(exc) else exc} Expected {spec}.") from None
