"""Where an ONNX model spends its time in ONNX Runtime: per op type, per dtype, per node.

`summarize(profile.json)` reads the JSON trace ONNX Runtime writes with
`SessionOptions.enable_profiling = True` and adds up the time of every node per run: by op type, by op
type and output dtype, by dtype, plus the slowest nodes. The first `skip_runs` runs (warm-up) are left
out; times are per run, in milliseconds.

Which time is measured:
  * "kernel": GPU kernel events (onnxruntime built with --enable_cuda_profiling, CUPTI): device time.
  * "node": the time each node's Compute() took on the host. On the CPU EP that is the kernel time. On
    the CUDA EP launches are asynchronous, so node time is launch time only, unless CUDA_LAUNCH_BLOCKING=1
    was set before CUDA started: then each node waits for its kernels and node time is close to device
    time (plus a few microseconds of synchronization per kernel). `profile_model(..., device="cuda")`
    and the CLI set it (`--no-sync` to leave it off); run them in a fresh process.

    python -m tools.profile_onnx model.onnx --device cpu
    python -m tools.profile_onnx model.onnx --device cuda --dims batch=8 --runs 20 --json prof.json
    python -m tools.profile_onnx model.onnx --inputs feeds.npz      # the inputs to run with
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile

__all__ = ["summarize", "profile_model", "op_counts", "random_feeds", "format_summary", "main"]

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32",
                9: "bool", 17: "float8e4m3fn", 19: "float8e5m2", 3: "int8", 2: "uint8"}
_PROFILE_DTYPES = {"float": "float32", "double": "float64"}  # profile names -> the names used here


# ---------------------------------------------------------------------------------------- profile


def _load_events(path) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    events = data.get("traceEvents", data) if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: not an ONNX Runtime profile (expected a JSON list of trace events)")
    return [e for e in events if isinstance(e, dict)]


def _run_windows(events: list[dict], skip_runs: int) -> list[tuple[int, int]]:
    """(start, end) in microseconds of each run that counts: 'model_run' events after the warm-up."""
    runs = sorted((int(e["ts"]), int(e["ts"]) + int(e.get("dur", 0))) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if not runs:
        return []
    return runs[min(skip_runs, len(runs) - 1):]


def _in_windows(ts: int, windows: list[tuple[int, int]], slack: int = 0) -> bool:
    return not windows or any(start <= ts <= end + slack for start, end in windows)


def _dtype_of(args: dict) -> str:
    """The dtype of a node's first output as the profile writes it ('float16'), else of its first input."""
    for key in ("output_type_shape", "input_type_shape"):
        for entry in args.get(key) or ():
            if isinstance(entry, dict) and entry:
                name = next(iter(entry))
                return _PROFILE_DTYPES.get(name, name)
    return "?"


def _shape_of(args: dict) -> str:
    for entry in args.get("output_type_shape") or ():
        if isinstance(entry, dict) and entry:
            return "x".join(str(d) for d in next(iter(entry.values())))
    return ""


def _node_name(event: dict) -> str:
    name = event.get("name", "")
    return name[:-len("_kernel_time")] if name.endswith("_kernel_time") else name


def summarize(profile_json_path, *, skip_runs: int = 1, top: int = 15) -> dict:
    """Per-run time by op type, by (op type, dtype), by dtype, and the `top` slowest nodes.

    Args:
        profile_json_path: the file `InferenceSession.end_profiling()` returned.
        skip_runs: runs at the start to leave out (warm-up); the last run always counts.
        top: how many of the slowest nodes to list.

    Returns:
        {"source": "kernel" | "node", "runs": counted runs, "run_ms": median wall time of a run,
         "total_ms": summed node (or kernel) time per run, "nodes": nodes with time per run,
         "by_op": {op: {"ms", "count", "pct"}}, "by_op_dtype": {op: {dtype: ms}},
         "by_dtype": {dtype: ms}, "providers": {provider: ms},
         "top_nodes": [{"name", "op", "dtype", "shape", "provider", "ms", "pct"}]}

    Raises:
        ValueError: the file is not an ONNX Runtime profile or holds no node events.
    """
    events = _load_events(profile_json_path)
    windows = _run_windows(events, skip_runs)
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
             and _in_windows(int(e.get("ts", 0)), windows)]
    if not nodes:
        raise ValueError(f"{profile_json_path}: no node events; was the session created with "
                         "SessionOptions.enable_profiling = True and run at least once?")
    info = {}  # node name -> (op, dtype, shape, provider)
    for e in nodes:
        args = e.get("args", {})
        info.setdefault(_node_name(e), (args.get("op_name", "?"), _dtype_of(args), _shape_of(args),
                                        args.get("provider", "?")))
    kernels = [e for e in events if e.get("cat") == "Kernel" and _in_windows(int(e.get("ts", 0)), windows, 10**6)]
    per_node: collections.Counter = collections.Counter()
    if kernels:
        source = "kernel"
        for e in kernels:
            args = e.get("args", {})
            parent = args.get("parent_name") or args.get("node_name") or e.get("name", "?")
            parent = parent[:-len("_kernel_time")] if parent.endswith("_kernel_time") else parent
            if parent not in info:
                info[parent] = (args.get("op_name", "kernel"), "?", "", "CUDAExecutionProvider")
            per_node[parent] += int(e.get("dur", 0))
    else:
        source = "node"
        for e in nodes:
            per_node[_node_name(e)] += int(e.get("dur", 0))
    n_runs = max(len(windows), 1)
    total_us = sum(per_node.values())

    def ms(us) -> float:
        return round(us / n_runs / 1e3, 4)

    by_op: dict = {}
    by_op_dtype: dict = collections.defaultdict(collections.Counter)
    by_dtype: collections.Counter = collections.Counter()
    providers: collections.Counter = collections.Counter()
    for name, us in per_node.items():
        op, dtype, _, provider = info[name]
        entry = by_op.setdefault(op, {"us": 0, "count": 0})
        entry["us"] += us
        entry["count"] += 1
        by_op_dtype[op][dtype] += us
        by_dtype[dtype] += us
        providers[provider] += us
    pct = (lambda us: round(100.0 * us / total_us, 1)) if total_us else (lambda us: 0.0)
    ordered = sorted(by_op.items(), key=lambda kv: -kv[1]["us"])
    top_nodes = []
    for name, us in per_node.most_common(top):
        op, dtype, shape, provider = info[name]
        top_nodes.append({"name": name, "op": op, "dtype": dtype, "shape": shape,
                          "provider": provider.replace("ExecutionProvider", ""), "ms": ms(us), "pct": pct(us)})
    run_ms = statistics.median((end - start) / 1e3 for start, end in windows) if windows else None
    return {
        "source": source,
        "runs": n_runs,
        "run_ms": None if run_ms is None else round(run_ms, 4),
        "total_ms": ms(total_us),
        "nodes": len(per_node),
        "by_op": {op: {"ms": ms(v["us"]), "count": v["count"], "pct": pct(v["us"])} for op, v in ordered},
        "by_op_dtype": {op: {d: ms(us) for d, us in by_op_dtype[op].most_common()} for op, _ in ordered},
        "by_dtype": {d: ms(us) for d, us in by_dtype.most_common()},
        "providers": {p.replace("ExecutionProvider", ""): ms(us) for p, us in providers.most_common()},
        "top_nodes": top_nodes,
    }


def format_summary(summary: dict, label: str = "", *, ops: int = 12, nodes: int = 15) -> str:
    """A compact text table of a `summarize` result."""
    head = (f"{label + ': ' if label else ''}{summary['total_ms']:.3f} ms of {summary['source']} time per run"
            + (f" (run {summary['run_ms']:.3f} ms)" if summary.get("run_ms") is not None else "")
            + f", {summary['nodes']} nodes, {summary['runs']} runs; by dtype: "
            + ", ".join(f"{d} {v:.3f}" for d, v in summary["by_dtype"].items()))
    lines = [head, f"  {'op':<28}{'ms':>9}{'%':>7}{'nodes':>7}  by dtype"]
    for op, v in list(summary["by_op"].items())[:ops]:
        dtypes = ", ".join(f"{d} {t:.3f}" for d, t in summary["by_op_dtype"][op].items())
        lines.append(f"  {op:<28}{v['ms']:>9.3f}{v['pct']:>7.1f}{v['count']:>7}  {dtypes}")
    if len(summary["by_op"]) > ops:
        rest = list(summary["by_op"].values())[ops:]
        lines.append(f"  {'(other ' + str(len(rest)) + ' ops)':<28}{sum(v['ms'] for v in rest):>9.3f}"
                     f"{sum(v['pct'] for v in rest):>7.1f}{sum(v['count'] for v in rest):>7}")
    if nodes and summary["top_nodes"]:
        lines.append(f"  top {min(nodes, len(summary['top_nodes']))} nodes:")
        for n in summary["top_nodes"][:nodes]:
            lines.append(f"    {n['ms']:>8.3f} ms {n['pct']:>5.1f}%  {n['op']:<24} {n['dtype']:<8} "
                         f"{n['shape']:<16} {n['name'][:70]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- running


def random_feeds(inputs, dims: dict | None = None, seed: int = 0) -> dict:
    """Inputs for a session's `get_inputs()`: symbolic dims from `dims` (default 1); integer inputs
    named '*mask*' are ones, other integer inputs are small ids (0 or 1, valid for any embedding)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dims = dims or {}
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    feeds = {}
    for value in inputs:
        if value.type not in types:
            raise ValueError(f"input {value.name!r} has type {value.type}: pass --inputs with an .npz of it")
        shape = [d if isinstance(d, int) and d >= 0 else int(dims.get(str(d), 1)) for d in value.shape]
        dtype = types[value.type]
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_ or "mask" in value.name.lower():
            feeds[value.name] = np.ones(shape, dtype)
        else:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def profile_model(path, *, device: str = "cpu", feeds: dict | None = None, dims: dict | None = None,
                  runs: int = 10, warmup: int = 3, threads: int | None = None, sync: bool = True,
                  top: int = 15, keep_trace: str | None = None) -> dict:
    """Run `path` with profiling on and return `summarize` of the runs after the warm-up.

    Args:
        path: the .onnx file.
        device: "cpu" or "cuda" (CUDA EP, inputs bound on the device).
        feeds: {input name: numpy array}; default `random_feeds(dims)`.
        runs, warmup: profiled runs that count, and runs before them that do not.
        sync: on CUDA, set CUDA_LAUNCH_BLOCKING=1 so node time includes the kernels (only takes effect
            when CUDA has not started yet in this process; the summary's "sync" says what was in force).
        keep_trace: copy the raw trace JSON here.
    """
    import shutil

    if device == "cuda" and sync:
        os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
    from rewriter.backends.onnx import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        runner = ort_session(path, device, threads=threads, profile_prefix=os.path.join(tmp, "ort_profile"))
        session = runner.session
        runner.bind(**(feeds if feeds is not None else random_feeds(session.get_inputs(), dims)))
        for _ in range(warmup + runs):
            runner.run_bound()  # CUDA: inputs bound on the device once (IO binding)
        trace = session.end_profiling()
        if keep_trace:
            shutil.copyfile(trace, keep_trace)
        summary = summarize(trace, skip_runs=warmup, top=top)
    summary["device"] = device
    summary["provider"] = session.get_providers()[0].replace("ExecutionProvider", "")
    if device == "cuda":
        summary["sync"] = os.environ.get("CUDA_LAUNCH_BLOCKING") == "1"
    return summary


# ---------------------------------------------------------------------------------------- structure


def _value_dtypes(proto) -> dict[str, str]:
    """Tensor name -> dtype: ONNX shape inference, then contrib ops (unknown to it) take the dtype of
    their first floating input (EmbedLayerNormalization: of its word embedding)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:
        inferred = proto
    g = inferred.graph
    types = {vi.name: _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, "?")
             for vi in list(g.value_info) + list(g.input) + list(g.output) if vi.type.tensor_type.elem_type}
    types.update({t.name: _ONNX_DTYPES.get(t.data_type, "?") for t in g.initializer})
    for node in g.node:  # topological order
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = _ONNX_DTYPES.get(a.t.data_type, "?")
        if all(o in types for o in node.output if o):
            continue
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            types.setdefault(node.output[0], _ONNX_DTYPES.get(to, "?"))
            continue
        inputs = list(node.input[2:3]) + list(node.input) if node.op_type == "EmbedLayerNormalization" \
            else list(node.input)
        src = next((types[i] for i in inputs if i and types.get(i, "").startswith(("float", "bfloat"))), None)
        for o in node.output:
            if o and o not in types and src:
                types[o] = src
    return types


def op_counts(model) -> dict[str, dict[str, int]]:
    """{dtype of the node's first floating output (else 'none'): {op_type: count}} of an ONNX file or
    ModelProto; contrib ops included."""
    import onnx

    proto = onnx.load(os.fspath(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) \
        else model
    types = _value_dtypes(proto)
    counts: dict = collections.defaultdict(collections.Counter)
    for node in proto.graph.node:
        dtype = next((types[o] for o in node.output if types.get(o, "").startswith(("float", "bfloat"))), "none")
        counts[dtype][node.op_type] += 1
    return {d: dict(c.most_common()) for d, c in sorted(counts.items())}


# ---------------------------------------------------------------------------------------- CLI


def _parse_dims(text: str) -> dict:
    dims = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--dims {text!r}: write name=size pairs, e.g. batch=8,seq=128")
        dims[key.strip()] = int(value)
    return dims


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.profile_onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--inputs", default=None, help=".npz with one array per graph input (default: random)")
    p.add_argument("--dims", type=_parse_dims, default={}, help="symbolic dims for random inputs: batch=8,...")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (CPU)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--no-sync", action="store_true", help="CUDA: leave kernel launches asynchronous")
    p.add_argument("--json", default=None, help="write the summary (and op counts) as JSON here")
    p.add_argument("--trace", default=None, help="keep the raw ONNX Runtime trace here")
    p.add_argument("--quiet", action="store_true", help="print nothing (with --json)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.model):
        p.error(f"no ONNX model at {args.model!r}")
    feeds = None
    if args.inputs:
        import numpy as np

        with np.load(args.inputs) as data:
            feeds = {k: data[k] for k in data.files}
    summary = profile_model(args.model, device=args.device, feeds=feeds, dims=args.dims, runs=args.runs,
                            warmup=args.warmup, threads=args.threads, sync=not args.no_sync, top=args.top,
                            keep_trace=args.trace)
    summary["op_counts"] = op_counts(args.model)
    if not args.quiet:
        print(format_summary(summary, os.path.basename(args.model), nodes=args.top))
    if args.json:
        from tools import harness  # imports torch: only when a JSON is written

        harness.write_json(args.json, summary, device=args.device, argv=argv, module="tools.profile_onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
