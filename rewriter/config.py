"""Configuration of a conversion: frozen dataclasses validated on construction.

Override precedence, lowest to highest (documented once, here, and in the README):

    default (op table) < analysis (calibration, sensitivity) < the model's own torch.autocast regions
        < op type < module regex ("re:...") < exact module path

An override maps a key to a precision: an op name (``"softmax"``, ``"linear"``), a module regex
(``"re:encoder\\.layer\\.0\\..*"``) or an exact module path (``"encoder.layer.0.attention"``).
Module keys apply to every node whose module path equals the key or lies below it. A bare word
(``"softmax"``, ``"classifier"``) is an op name when the op table knows it, else a top-level module path;
the analysis that owns the op table decides (`Override.resolve`), so this module imports no pass.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Callable, Mapping

import torch

from rewriter.backend_options import BackendOptions, closest
from rewriter.errors import ConfigError
from rewriter.fp8_options import Fp8Options, resolve_options

__all__ = ["Precision", "Mode", "Override", "ConvertConfig", "parse_overrides", "BackendOptions", "Fp8Options"]


class Precision(str, enum.Enum):
    """Target precision of a conversion."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    FP32 = "fp32"  # only meaningful as an override value: keep these nodes in fp32

    @classmethod
    def parse(cls, value: "str | Precision", *, what: str = "precision") -> "Precision":
        if isinstance(value, Precision):
            return value
        aliases = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32",
                   "float": "fp32", "float8": "fp8", "e4m3": "fp8"}
        text = str(value).strip().lower()
        text = aliases.get(text, text)
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(repr(p.value) for p in cls)
            raise ConfigError(
                f"unknown {what} {value!r}: write one of {choices} "
                "(e.g. precision='bf16'; fp32 is only used in overrides to keep nodes in fp32)"
            ) from None

    @property
    def island_dtype(self) -> torch.dtype:
        """dtype of the low-precision islands (FP8 GEMMs sit inside bf16 islands)."""
        return {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16,
                Precision.FP8: torch.bfloat16, Precision.FP32: torch.float32}[self]


class Mode(str, enum.Enum):
    EVAL = "eval"
    TRAIN = "train"


@dataclasses.dataclass(frozen=True)
class Override:
    """One user override: nodes matching `key` run in `precision`.

    `kind` is "op" (an op name), "regex" (module-path regex, written "re:..."), "module" (exact path) or
    "name" (a bare word: an op name or a top-level module; `resolve` turns it into "op" or "module").
    """

    key: str
    precision: Precision
    kind: str

    _RANK = {"op": 2, "regex": 3, "module": 4}

    def resolve(self, is_op: Callable[[str], bool]) -> "Override":
        """This override with a bare word ("name") decided: an "op" when `is_op(key)` (the op table's
        passes/op_tables.is_known_op), else a top-level "module". Other kinds are returned as they are."""
        if self.kind != "name":
            return self
        return dataclasses.replace(self, kind="op" if is_op(self.key) else "module")

    @property
    def rank(self) -> int:
        """Precedence; higher wins. default=0 and analysis=1 sit below every override."""
        if self.kind == "name":
            raise ValueError(f"override {self.key!r} is a bare word: resolve(is_op) it first")
        return self._RANK[self.kind]

    def matches(self, op_name: str, module_path: str | None) -> bool:
        if self.kind == "name":
            raise ValueError(f"override {self.key!r} is a bare word: resolve(is_op) it first")
        if self.kind == "op":
            return op_name == self.key
        if module_path is None:
            return False
        if self.kind == "regex":
            return re.fullmatch(self.key[3:], module_path) is not None
        return module_path == self.key or module_path.startswith(self.key + ".")


def _classify_key(key: str) -> str:
    if key.startswith("re:"):
        try:
            re.compile(key[3:])
        except re.error as exc:
            raise ConfigError(f"override {key!r}: invalid regular expression ({exc}); "
                              "write e.g. 're:encoder\\.layer\\.[0-3]\\..*'") from None
        return "regex"
    if "." in key or key in ("",):
        return "module"
    return "name"  # an op name or a top-level module: Assign decides with the op table (Override.resolve)


def parse_overrides(overrides: "Mapping[str, Any] | list[str] | None") -> tuple[Override, ...]:
    """Turn `{"softmax": "fp16", "re:head.*": "fp32"}` or `["softmax=fp16", ...]` into Overrides."""
    if not overrides:
        return ()
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for text in overrides:
            if "=" not in str(text):
                raise ConfigError(f"override {text!r} must look like KEY=PRECISION, "
                                  "e.g. 'softmax=fp16', 're:encoder\\..*=fp32' or 'classifier=fp32'")
            key, _, value = str(text).rpartition("=")
            items.append((key.strip(), value.strip()))
    result = []
    for key, value in items:
        precision = Precision.parse(value, what=f"precision in override {key!r}")
        if precision is Precision.FP8:
            raise ConfigError(f"override {key!r}: fp8 can only be the global precision; "
                              "write fp16, bf16 or fp32 here")
        result.append(Override(str(key), precision, _classify_key(str(key))))
    return tuple(result)


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Everything `convert` needs to know besides the model, its inputs and the calibration data.

    Every field is also a keyword option of `rewriter.convert`: `convert(model, x, precision="bf16")`
    and `convert(model, x, config=ConvertConfig(precision="bf16"))` build this same object.

    Args:
        precision: "fp16", "bf16" or "fp8".
        overrides: op name / "re:module-regex" / module path -> "fp16" | "bf16" | "fp32".
        mode: "eval" (weights stored in their consumer's precision) or "train" (fp32 master weights,
            casts inside the graph).
        keep_io_types: model inputs and outputs keep their dtypes (default True).
        dynamic_batch: keep dimension 0 of the inputs dynamic when the model allows it.
        tolerance: output error budget (relative L2) for measured decisions; needs calibration data
            (`convert(..., calibration=...)`).
        metric: optional `metric(reference, candidate) -> float` used instead of relative L2.
        budget_lowering: with a tolerance, also run in low precision the nodes the default policy keeps
            fp32 (norms, residual adds, softmax) where the measured error stays within the budget
            (passes/analysis/lowering.py; default True: the budget buys speed as well as accuracy).
            False: the budget only keeps nodes fp32, so the result is never less accurate than the
            default policy.
        allow_bf16_fallback: with fp16, nodes whose range only overflows fp16 may run in bf16
            instead of fp32.
        backend: how the converted graph runs (backends/torch_backend.py): "eager" (default; the
            GraphModule itself), "compile" (torch.compile) or "cuda_graphs" (captured per input
            shape and replayed; GPU and mode="eval" only).
        backend_options: a `BackendOptions` (or a dict of its fields), e.g.
            BackendOptions(compile_mode="max-autotune-no-cudagraphs") or {"clone_outputs": False}.
        fp8: with precision="fp8", how GEMMs are converted: an `Fp8Options` (or a dict of its fields).
        dynamic_shapes: torch.export's `dynamic_shapes` for the example inputs, used as given (e.g.
            {"input_ids": {1: torch.export.Dim("seq", max=512)}}); by default every dimension the
            model allows stays dynamic (batch, sequence length, image height and width).
        static: capture every dimension static (backends that want fixed shapes).
        capture_time_limit: seconds the automatic dynamic-shape capture may take (default 120; None
            for no limit). Past it, capture keeps only the batch dynamic and says so in the notes:
            torch.export's symbolic shape reasoning can take many minutes on some models (torchvision
            swin_t: ~8 min on a 2-core CPU, its window padding with dynamic image height and width).
            Pass dynamic_shapes= to insist on dynamic sizes. The limit uses SIGALRM, so it applies only
            when convert runs on the main thread of a POSIX process; elsewhere there is no limit.

    Raises:
        ConfigError: a value that cannot work, saying what to write instead.

    Example:
        >>> ConvertConfig(precision="bf16", backend="compile").backend_kwargs()
        {}
        >>> ConvertConfig.from_options(precision="bf16") == ConvertConfig(precision="bf16")
        True
    """

    precision: Precision = Precision.FP16
    overrides: tuple[Override, ...] = ()
    mode: Mode = Mode.EVAL
    keep_io_types: bool = True
    dynamic_batch: bool = True
    tolerance: float | None = None
    metric: Callable[[Any, Any], float] | None = None
    budget_lowering: bool = True
    allow_bf16_fallback: bool = False
    backend: str = "eager"
    backend_options: BackendOptions = BackendOptions()
    fp8: Fp8Options = Fp8Options()
    dynamic_shapes: Any = None
    static: bool = False
    capture_time_limit: float | None = 120.0

    def __post_init__(self):
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.precision is Precision.FP32:
            raise ConfigError("precision 'fp32' converts nothing: choose 'fp16', 'bf16' or 'fp8'")
        try:
            object.__setattr__(self, "mode", Mode(str(getattr(self.mode, "value", self.mode)).lower()))
        except ValueError:
            raise ConfigError(f"unknown mode {self.mode!r}: write mode='eval' or mode='train'") from None
        if not isinstance(self.overrides, tuple) or not all(isinstance(o, Override) for o in self.overrides):
            object.__setattr__(self, "overrides", parse_overrides(self.overrides))
        if self.tolerance is not None:
            if (not isinstance(self.tolerance, (int, float)) or isinstance(self.tolerance, bool)
                    or not (0 < float(self.tolerance) < 1e3)):
                raise ConfigError(f"tolerance={self.tolerance!r} must be a positive number "
                                  "(an output error budget such as 1e-2)")
        if self.metric is not None and not callable(self.metric):
            raise ConfigError("metric must be a function metric(reference, candidate) -> float")
        for name in ("keep_io_types", "dynamic_batch", "allow_bf16_fallback", "budget_lowering"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        object.__setattr__(self, "backend_options", BackendOptions.of(self.backend_options))
        object.__setattr__(self, "backend", self.backend_options.check(self.backend))
        if not isinstance(self.static, bool):
            raise ConfigError(f"static={self.static!r} must be True or False")
        if self.static and self.dynamic_shapes is not None:
            raise ConfigError("static=True and dynamic_shapes= contradict each other: pass one of them "
                              "(static=True fixes every dimension)")
        if self.dynamic_shapes is not None and not isinstance(self.dynamic_shapes, (dict, tuple, list)):
            raise ConfigError(f"dynamic_shapes={self.dynamic_shapes!r} must be torch.export's format: a "
                              "dict keyed by input name (or a tuple by position) of {dim: Dim} dicts")
        limit = self.capture_time_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                                  or not limit > 0):
            raise ConfigError(f"capture_time_limit={limit!r} must be a positive number of seconds "
                              "(e.g. 120), or None for no limit")
        if self.backend == "cuda_graphs" and self.mode is Mode.TRAIN:
            raise ConfigError("backend 'cuda_graphs' is inference only: use mode='eval', or "
                              "backend='compile' for training")
        object.__setattr__(self, "fp8", _fp8_options(self.fp8))
        if self.precision is Precision.FP8:
            self.fp8.check_mode(self.mode.value)

    @classmethod
    def from_options(cls, config: "ConvertConfig | None" = None, **options: Any) -> "ConvertConfig":
        """The config of `convert(model, inputs, config=..., **options)`: `config` as it is, or one built
        from the keyword options (any field of ConvertConfig), never a mix of both.

        Raises:
            ConfigError: both `config` and options, an option that is not a field (with the closest
                field), or an invalid value.
        """
        if config is not None:
            if not isinstance(config, ConvertConfig):
                raise ConfigError(f"config={type(config).__name__} must be a rewriter.ConvertConfig, e.g. "
                                  "config=rewriter.ConvertConfig(precision='bf16')")
            if options:
                given = ", ".join(f"{k}=..." for k in options)
                raise ConfigError(f"pass either config= or keyword options, not both (got config= and {given}): "
                                  f"write config=config.replace({given}), or leave config= out")
            return config
        cls._check_names(options, "convert() got an unknown option")
        return cls(**options)

    def replace(self, **changes: Any) -> "ConvertConfig":
        """A copy with `changes` applied and validated again, e.g. `config.replace(precision="bf16")`."""
        self._check_names(changes, "ConvertConfig has no field")
        return dataclasses.replace(self, **changes)

    @classmethod
    def _check_names(cls, options: Mapping[str, Any], what: str) -> None:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in names:
                raise ConfigError(f"{what} {key!r}{closest(key, names)} (the options are the fields of "
                                  f"rewriter.ConvertConfig: {', '.join(names)})")

    def backend_kwargs(self) -> dict[str, Any]:
        """The backend options that are set, as keyword arguments of `rewriter.optimize`."""
        return self.backend_options.kwargs()

    def compiled_by_inductor(self) -> bool:
        """backend="compile" with inductor (the default compiler): passes may shape the graph for it."""
        return self.backend == "compile" and self.backend_options.compiler in (None, "inductor")

    def fp8_options(self) -> Fp8Options:
        """`fp8` with fused_quantization=None decided by the backend (see fp8_options.resolve_options)."""
        return resolve_options(self.fp8, self)

    @property
    def island_dtype(self) -> torch.dtype:
        return self.precision.island_dtype

    def to_dict(self) -> dict:
        return {
            "precision": self.precision.value,
            "overrides": [f"{o.key}={o.precision.value}" for o in self.overrides],
            "mode": self.mode.value,
            "keep_io_types": self.keep_io_types,
            "dynamic_batch": self.dynamic_batch,
            "static": self.static,
            "dynamic_shapes": None if self.dynamic_shapes is None else repr(self.dynamic_shapes),
            "capture_time_limit": self.capture_time_limit,
            "tolerance": self.tolerance,
            "budget_lowering": self.budget_lowering,
            "backend": self.backend,
            "backend_options": self.backend_options.to_dict(),
        }


def _fp8_options(value: Any) -> Fp8Options:
    if isinstance(value, Fp8Options):
        return value
    if value is None:
        return Fp8Options()
    if isinstance(value, Mapping):
        names = [f.name for f in dataclasses.fields(Fp8Options)]
        for key in value:
            if key not in names:
                raise ConfigError(f"unknown FP8 option {key!r}{closest(key, names)} "
                                  f"(the fields of rewriter.Fp8Options: {', '.join(names)})")
        return Fp8Options(**value)
    raise ConfigError(f"fp8={value!r} must be a rewriter.Fp8Options, e.g. fp8=Fp8Options(granularity='row')")
