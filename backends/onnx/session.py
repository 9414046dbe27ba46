"""ort_session: an ONNX Runtime session for an exported model, with IO binding on CUDA and the names of the
nodes the CPU EP itself runs in fp32."""
from __future__ import annotations

import collections
import contextlib
import os
import re

import numpy as np
import onnx
import torch

from rewriter.errors import BackendError, ConfigError, InputError

__all__ = ["OrtSession", "ort_session", "ort_package"]


def ort_package() -> str:
    """'onnxruntime-gpu 1.31.1' (or whichever distribution provides the onnxruntime module)."""
    from importlib import metadata

    for dist in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-training", "ort-nightly-gpu", "ort-nightly"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (package unknown)"


_DATA_MOVEMENT = frozenset("Reshape Transpose Squeeze Unsqueeze Slice Concat Gather GatherElements GatherND "
                           "Expand Identity Flatten Split Tile Pad Shape".split())
_NOT_IMPLEMENTED = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")


class OrtSession:
    """An ONNX Runtime session, ready to run; IO binding on CUDA.

    Call it with the model's inputs (positional in graph-input order, or by name; numpy arrays or torch
    tensors): it returns the outputs as numpy arrays. `bind(...)` + `run_bound()` run repeatedly on
    inputs already on the device without copies (what a benchmark times).

    Attributes:
        session: the onnxruntime.InferenceSession.
        device: "cuda" or "cpu".
        fallbacks: nodes ONNX Runtime itself runs in fp32 because the execution provider has no
            16-bit kernel for them (CPU EP: found from the casts it inserts).
    """

    def __init__(self, session, device: str, fallbacks: list[str]):
        self.session = session
        self.device = device
        self.fallbacks = fallbacks
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._binding = None
        self._keep: list = []

    def _feed(self, args, kwargs) -> dict:
        if len(args) > len(self.input_names):
            raise InputError(f"the model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                             f"got {len(args)} positional")
        feed = dict(zip(self.input_names, args))
        unknown = set(kwargs) - set(self.input_names)
        if unknown:
            raise InputError(f"unknown input(s) {sorted(unknown)}; the model's inputs are {self.input_names}")
        feed.update(kwargs)
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model's inputs are {self.input_names}")
        return feed

    @staticmethod
    def _numpy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return value

    def __call__(self, *args, **kwargs) -> list:
        feed = self._feed(args, kwargs)
        if self.device == "cpu":
            return self.session.run(None, {k: self._numpy(v) for k, v in feed.items()})
        self.bind(*args, **kwargs)
        self.run_bound()
        return self._binding.copy_outputs_to_cpu()

    def bind(self, *args, **kwargs) -> None:
        """Place the inputs on the session's device and bind them and the outputs (CUDA: IO binding)."""
        import onnxruntime as ort

        feed = self._feed(args, kwargs)
        binding = self.session.io_binding()
        self._keep = []
        device = "cuda" if self.device == "cuda" else "cpu"
        for name, value in feed.items():
            if isinstance(value, torch.Tensor) and value.is_cuda and device == "cuda":
                value = value.contiguous()
                self._keep.append(value)
                binding.bind_input(name, "cuda", value.device.index or 0,
                                   np.dtype(str(value.dtype).replace("torch.", "")), list(value.shape),
                                   value.data_ptr())
            else:
                ortvalue = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self._numpy(value)), device, 0)
                self._keep.append(ortvalue)
                binding.bind_ortvalue_input(name, ortvalue)
        for name in self.output_names:
            binding.bind_output(name, device)
        self._binding = binding

    def run_bound(self) -> None:
        """Run on the bound inputs; returns when the outputs are ready."""
        if self._binding is None:
            raise InputError("call bind(...) with the inputs before run_bound()")
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()

    def bound_outputs(self) -> list:
        """Outputs of the last run_bound(), as numpy arrays."""
        return self._binding.copy_outputs_to_cpu()


def _cpu_fallbacks(optimized_path: str, original_path: str) -> list[str]:
    """Nodes the CPU EP runs in fp32 because it has no fp16 kernel: consumers of its inserted casts."""
    try:
        model = onnx.load(optimized_path, load_external_data=False)
        original = onnx.load(original_path, load_external_data=False)
    except Exception:
        return []
    # ORT renames or fuses some nodes: name them after the node of the exported file with that output
    by_output = {o: n.name for n in original.graph.node for o in n.output}
    # ORT casts fp16 inputs up before a node without an fp16 kernel and its outputs back down, then
    # moves those casts across ops that only move data: so look for compute ops between the two kinds.
    up, down = set(), set()
    for n in model.graph.node:
        if n.op_type == "Cast" and n.name.startswith("InsertedPrecisionFreeCast_"):
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            (up if to == 1 else down).update(n.output if to == 1 else n.input)
    found = collections.OrderedDict()
    for n in model.graph.node:
        if n.op_type == "Cast" or n.op_type in _DATA_MOVEMENT:
            continue
        if any(i in up for i in n.input) or any(o in down for o in n.output):
            outs = [o.replace("InsertedPrecisionFreeCast_", "", 1) for o in n.output]
            name = next((by_output[o] for o in outs if o in by_output), n.name) or n.output[0]
            found.setdefault(name, n.op_type)
    return [f"ONNX node '{name}' ({op}) has no float16 kernel on the CPU execution provider: ONNX Runtime "
            "runs it in fp32 via Casts it inserts (kept fp32)" for name, op in found.items()]


def ort_session(path: str | os.PathLike, device: str = "cuda", *, device_id: int = 0,
                threads: int | None = None, profile_prefix: str | None = None) -> OrtSession:
    """A ready ONNX Runtime session for an exported model.

    Args:
        path: the .onnx file written by `export_onnx`.
        device: "cuda" (CUDA execution provider, IO binding) or "cpu".
        device_id: the GPU to use with device="cuda".
        threads: intra-op threads (default: ONNX Runtime's choice).
        profile_prefix: turn ONNX Runtime's profiler on, writing its trace to files starting with this
            path (`session.session.end_profiling()` returns the file; tools/profile_onnx.py reads it).

    Returns:
        OrtSession; call it with the model's inputs.

    Raises:
        BackendError: the CUDA EP is not available in the installed onnxruntime package (the message
            names the package and says what to install), or the EP has no kernel for a node (the message
            names the node; nothing is run).

    Example:
        >>> sess = ort_session("bert-fp16.onnx", device="cuda")
        >>> hidden, pooled = sess(input_ids, attention_mask)
    """
    import tempfile

    import onnxruntime as ort

    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device={device!r}: write device='cuda' or device='cpu'")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"no ONNX model at {path!r}: write one with rewriter.export_onnx(converted, path)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    tmp = None
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise BackendError(
                f"ONNX Runtime has no CUDA execution provider here: the installed package is {ort_package()}, "
                f"whose providers are {', '.join(available)}. Install the GPU build: "
                "pip uninstall -y onnxruntime && pip install onnxruntime-gpu (or pip install 'rewriter[gpu]'), "
                "with CUDA 12 and cuDNN 9 libraries on the library path; or use device='cpu'.")
        if hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
        tmp = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False)
        tmp.close()
        options.optimized_model_filepath = tmp.name
    try:
        try:
            session = ort.InferenceSession(path, options, providers=providers)
        except Exception as exc:
            found = _NOT_IMPLEMENTED.search(str(exc))
            if found:
                op, version, node = found.groups()
                raise BackendError(
                    f"ONNX Runtime ({ort_package()}, {device} EP) has no kernel for {op}-{version} node "
                    f"'{node}' with these input dtypes. Fallback: none (refused). Keep that module in fp32 "
                    "with an override, export with precision='fp16' (bfloat16 kernels are rare outside the "
                    "CUDA EP) or run on device='cuda'.") from exc
            raise BackendError(f"ONNX Runtime could not load {path}: {str(exc).strip()[:300]}") from exc
        if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendError(
                f"the CUDA execution provider of {ort_package()} failed to start (session runs on "
                f"{session.get_providers()}): check that the CUDA and cuDNN libraries it needs are installed; "
                "onnxruntime.preload_dlls() loads the ones shipped with torch.")
        fallbacks = _cpu_fallbacks(tmp.name, path) if tmp is not None else []
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp.name)
    return OrtSession(session, device, fallbacks)
