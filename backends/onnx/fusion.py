"""ONNX Runtime fusions for `export_onnx(optimize=True)`, kept only where they keep the precision decisions.

`_fuse` runs two steps on the cleaned-up export, each on a copy; a step's result replaces the model only
when `_precision_kept` (same float Casts, same dtype for every tensor both graphs name, no fused node
reading activations of mixed float dtypes) and `_runs_like` (loads and runs on the CPU EP, outputs within
`_FUSION_TOLERANCE` of the unfused graph) accept it. The report says what each step fused, or why not.

    onnxscript step:   Reshape -> Gemm -> Reshape as MatMul + Add (gemm.py), Shape(intermediate)
                       as Shape(graph input) (gemm.py), onnxscript's `optimize_for_ort`, Shape(q) of
                       its attention masks from the inputs again, then MatMul + Split + MultiHeadAttention
                       as one packed-QKV Attention (attention.py) and the BERT embeddings as one
                       EmbedLayerNormalization (embeddings.py)
    optimizer step:    onnxruntime.transformers' optimize_model (BiasGelu, FastGelu, ...)

The rewrites before `optimize_for_ort` change no float value: they bring the exporter's graph into the form
ONNX Runtime's own exports have, which is the form the fusions read. Every step matches a symbolic sequence
length too: where the exporter computes a size from Shape() instead of writing a constant (the Reshape
targets of a Gemm, the end of the position ids' Slice), the rewrites read the size as the named dimension
of an input (common.shape_values) and check it against the tensors' symbolic shapes. Fused nodes are named
"<module path>/<OpType>" after the node whose output they compute, like the rest of the export.

The onnxruntime.transformers recipe (`model_type`) is chosen from the graph's structure (`fusion_recipe`):
"gpt2" (unidirectional attention) when an attention of the converted graph is causal, else "bert".
`export_onnx` calls `fuse`.
"""
from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import onnx_ir as ir
import torch.fx as fx

from rewriter.backends.onnx.attention import pack_attention
from rewriter.backends.onnx.common import quiet
from rewriter.backends.onnx.embeddings import fuse_embed_layer_norm
from rewriter.backends.onnx.gemm import shapes_from_inputs, unflatten_gemms
from rewriter.backends.onnx.report import ExportReport
from rewriter.passes.op_tables import op_name

__all__ = ["fuse", "fusion_recipe", "unfused_attention", "precision_kept", "runs_like"]

_ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"})


def fusion_recipe(gm: fx.GraphModule) -> tuple[str, str]:
    """(model_type for onnxruntime.transformers' optimizer, why): "gpt2" when an attention of the converted
    graph is causal (scaled_dot_product_attention with is_causal=True, or a tril/triu mask), else "bert"."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node)
        causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
        if name in _ATTENTION_OPS and causal is True:
            return "gpt2", f"attention {node.name} is causal (is_causal=True): the decoder recipe"
        if name in ("tril", "triu"):
            return "gpt2", f"{node.name} builds a triangular (causal) mask: the decoder recipe"
    return "bert", "no attention of the graph is causal: the encoder recipe"


_FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                        "PackedMultiHeadAttention")


def unfused_attention(gm: fx.GraphModule, fusions: dict) -> int:
    """How many attention ops (scaled_dot_product_attention) of the converted graph the fusions `fusions`
    ({fused op: count}, as ExportReport.fusions) did not turn into an ONNX Runtime attention node."""
    attention = sum(1 for n in gm.graph.nodes if n.op == "call_function" and op_name(n) in _ATTENTION_OPS)
    return max(0, attention - sum(fusions.get(op, 0) for op in _FUSED_ATTENTION_OPS))


_LARGE = 4096  # bytes: initializers above this are typed as inputs for inference (weights; shapes stay)


def _typing_copy(proto):
    """`proto` with its large initializers (the weights) as typed graph inputs: shape inference gives the
    same dtypes without copying the weights (GPT-2 medium: 17 s of 2-core time per call on 1.4 GB)."""
    graph = onnx.GraphProto(name=proto.graph.name)
    graph.node.extend(proto.graph.node)
    graph.input.extend(proto.graph.input)
    graph.output.extend(proto.graph.output)
    graph.value_info.extend(proto.graph.value_info)
    named = {v.name for v in proto.graph.input}
    for init in proto.graph.initializer:
        if init.ByteSize() > _LARGE and init.name not in named:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            graph.initializer.append(init)
    model = onnx.ModelProto(ir_version=proto.ir_version, graph=graph)
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    return model


def _float_value_dtypes(proto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(_typing_copy(proto), strict_mode=False)
    except Exception:
        inferred = proto
    types = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


_ONNX_FLOATS = {1: "float32", 10: "float16", 16: "bfloat16"}


def precision_kept(before, after) -> str | None:
    """None when `after` (fused) keeps the precision of `before`; else the reason it does not."""
    tb, ta = _float_value_dtypes(before), _float_value_dtypes(after)

    def float_casts(proto, types):
        out = collections.Counter()
        for n in proto.graph.node:
            if n.op_type == "Cast":
                to = next(a.i for a in n.attribute if a.name == "to")
                src = types.get(n.input[0])
                if src in _ONNX_FLOATS and to in _ONNX_FLOATS:
                    out[(src, to)] += 1
        return out

    cb, ca = float_casts(before, tb), float_casts(after, ta)
    if cb != ca:
        return (f"the fused graph changes the float Casts ({sum(cb.values())} -> {sum(ca.values())}): a "
                "fusion moved an fp32 island boundary")
    for name, dtype in ta.items():
        if name in tb and tb[name] in _ONNX_FLOATS and dtype != tb[name]:
            return (f"tensor '{name}' is {_ONNX_FLOATS.get(dtype, dtype)} after fusion but "
                    f"{_ONNX_FLOATS[tb[name]]} before")
    names_before = {n.name for n in before.graph.node}
    for n in after.graph.node:
        if n.name in names_before or n.op_type == "Cast":
            continue
        acts = {ta.get(i) for i in n.input if i and ta.get(i) in _ONNX_FLOATS and
                i not in {init.name for init in after.graph.initializer}}
        if len(acts) > 1:
            return (f"fused node '{n.name}' ({n.op_type}) reads activations of mixed float dtypes "
                    f"({', '.join(sorted(_ONNX_FLOATS[a] for a in acts))})")
    return None


def _cpu_outputs(proto, feeds: dict) -> tuple[str | None, list | None]:
    """(why the CPU EP cannot load `proto`, None) (a bfloat16 graph for the CUDA EP has no kernels
    there), or (None, its outputs on `feeds`) (None without feeds, or when it fails to run them)."""
    try:
        session = _session(proto)
    except Exception as exc:
        return str(exc).strip().splitlines()[0][:200], None
    try:
        return None, (session.run(None, feeds) if feeds else None)
    except Exception:
        return None, None


def _session(proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def runs_like(before, after, feeds: dict, want: list | None = None, outputs: list | None = None) -> str | None:
    """None when the fused graph loads in ONNX Runtime (CPU EP) and gives the unfused outputs.

    `want`: the outputs of `before` on `feeds` when already known (the previous step's result: no second
    session of it). `outputs`: a list that receives the fused graph's outputs, for the next step."""
    try:
        fused = _session(after)
    except Exception as exc:
        return f"the fused graph does not load in ONNX Runtime ({str(exc).strip().splitlines()[0][:400]})"
    if not feeds:
        return None
    try:
        got = fused.run(None, feeds)
        del fused
        if want is None:
            want = _session(before).run(None, feeds)
    except Exception as exc:
        return f"the fused graph fails to run ({str(exc).strip().splitlines()[0][:200]})"
    if outputs is not None:
        outputs[:] = got
    for g, w in zip(got, want):
        if np.issubdtype(w.dtype, np.floating):
            g, w = g.astype(np.float64), w.astype(np.float64)
            err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
            if not np.isfinite(err) or err > _FUSION_TOLERANCE:
                return f"the fused graph's outputs differ from the unfused ones (relative L2 {err:.2e})"
    return None


_FUSION_TOLERANCE = 1e-2  # fused kernels reorder 16-bit arithmetic; a broken fusion is far off


def _name_fused_nodes(before, after) -> None:
    """Name each fused node '<module path>/<OpType>' after the node whose output it now computes."""
    producer = {o: n.name for n in before.graph.node for o in n.output}
    old_names = {n.name for n in before.graph.node}
    used = {n.name for n in after.graph.node}
    for node in after.graph.node:
        if node.name in old_names:
            continue
        source = next((producer[o] for o in node.output if o in producer), None) or next(
            (producer[i] for i in node.input if i in producer and "/" in producer[i]), None)
        if not source or "/" not in source:
            continue
        name = f"{source.rsplit('/', 1)[0].split('/')[0]}/{node.op_type}"
        used.discard(node.name)  # a node already named so keeps its name
        while name in used:
            name += "_"
        used.add(name)
        node.name = name



_FUSED_STANDARD_OPS = frozenset({"LayerNormalization", "Gelu", "RMSNormalization", "Attention"})


def _fused_ops_added(before, after) -> dict[str, int]:
    """{fused op: how many more `after` has}: contrib ops and the standard ops fusions produce, not the
    MatMul/Add a rewrite into the fusions' input form adds."""
    def fused(proto):
        return collections.Counter(n.op_type for n in proto.graph.node
                                   if n.domain not in ("", "ai.onnx") or n.op_type in _FUSED_STANDARD_OPS)

    b, a = fused(before), fused(after)
    return {op: a[op] - b[op] for op in a if a[op] > b[op]}


def fuse(model, gm, report: ExportReport, feeds: dict):
    """ONNX Runtime fusions, each step kept only when it keeps the precision decisions and the outputs."""
    proto = ir.serde.serialize_model(model)
    model_type, why = fusion_recipe(gm)
    report.fusion_notes.append(f"onnxruntime.transformers recipe {model_type!r}: {why}")
    unchecked, want = _cpu_outputs(proto, feeds)  # the unfused outputs, computed once
    if unchecked is not None:
        report.fusion_notes.append(
            f"fusions checked for precision only, their outputs not compared: the unfused graph does not load on "
            f"the CPU EP here ({unchecked}); run the file on its target to check it")

    def onnxscript_step(p):
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        m = ir.serde.deserialize_model(p)
        rewritten = unflatten_gemms(m)
        shapes_from_inputs(m)
        with quiet():
            result = optimize_for_ort(m)
        stats = result[1] if isinstance(result, tuple) else {}
        m = result[0] if isinstance(result, tuple) else m
        stats = {k: v for k, v in stats.items() if v}
        if rewritten:
            stats["gemm_as_matmul"] = rewritten
        # the fusions' own mask code reads Shape(q) when the sequence length is symbolic: from the inputs
        # again, so that the Split's outputs feed only the attention and it can be packed
        shapes_from_inputs(m)
        stats["packed_attention"] = pack_attention(m)
        raised: list[str] = []
        stats["embed_layer_norm"] = fuse_embed_layer_norm(m, raised)
        stats["notes"] = raised
        return ir.serde.serialize_model(m), stats

    def transformers_step(p):
        from onnxruntime.transformers.optimizer import optimize_model

        m = ir.serde.deserialize_model(p)
        rewritten = unflatten_gemms(m)
        p = ir.serde.serialize_model(m) if rewritten else copy.deepcopy(p)
        with quiet():
            opt = optimize_model(p, model_type=model_type, num_heads=0, hidden_size=0,
                                 opt_level=0, use_gpu=True, only_onnxruntime=False)
        stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        if rewritten:
            stats["gemm_as_matmul"] = rewritten
        fused = opt.model
        declared = {o.domain for o in fused.opset_import}
        for domain in sorted({n.domain for n in fused.graph.node} - declared - {"ai.onnx"}):
            fused.opset_import.add(domain=domain, version=1)  # contrib ops: the optimizer omits it
        return fused, stats

    steps = [("onnxscript ort_fusions", onnxscript_step),
             ("onnxruntime.transformers optimizer", transformers_step)]
    for label, step in steps:
        try:
            fused, stats = step(proto)
        except ImportError as exc:
            report.fusion_notes.append(f"{label}: not applied ({exc.name or exc} is not installed)")
            continue
        except Exception as exc:
            report.fusion_notes.append(f"{label}: not applied, it failed ({type(exc).__name__}: "
                                       f"{str(exc).strip()[:160]})")
            continue
        added = _fused_ops_added(proto, fused)
        if not added:
            report.fusion_notes.append(f"{label}: nothing to fuse")
            continue
        got: list = []
        reason = precision_kept(proto, fused) or (runs_like(proto, fused, feeds, want, got)
                                                   if unchecked is None else None)
        if reason is not None:
            report.fusion_notes.append(f"{label}: skipped, {reason}")
            continue
        _name_fused_nodes(proto, fused)
        proto = fused
        want = got or None  # the next step compares with this step's result, already computed
        for op, n in added.items():
            report.fusions[op] = report.fusions.get(op, 0) + n
        rewritten, raised = stats.get("gemm_as_matmul"), stats.get("notes", [])
        report.fusion_notes.append(f"{label}: fused " + ", ".join(f"{k} {v}" for k, v in added.items())
                                   + (f" ({rewritten} flattened Gemm read as MatMul first)" if rewritten else "")
                                   + (" (precision decisions kept)" if not raised else
                                      f" (precision decisions kept, {len(raised)} raised to fp32: below)"))
        report.fusion_notes += [f"{label}: {note}" for note in raised]
    return ir.serde.deserialize_model(proto)
