"""A Triton GEMV for weight-only FP8 decode GEMMs: `rewriter::fp8_weight_gemv`.

    y[M, N] = ((x[M, K] @ w_fp8[N, K].T) * w_scale[N] (+ bias[N])).to(out_dtype)      M <= GEMV_MAX_ROWS

A decode step multiplies a few rows (the batch) by every weight, so its time is the time to read the
weights. This kernel reads each float8_e4m3fn weight byte exactly once, in 16-byte vectors, widens it in
registers and accumulates in fp32; scale, bias and the output cast happen in its epilogue. Inductor does
not make such a kernel from the reference composite (rewriter/runtime/fp8_weight_ops.py: it measured
1.045x over bf16 on an H200), hence this one.

Two forms of the inner product, chosen by the rows (`choose_config`):
  * M = 1 and M = 2: multiply-accumulate on CUDA cores into a [BLOCK_N, BLOCK_K] (per row) fp32 tile,
    reduced once at the end (no cross-thread reduction inside the loop); few output columns (N = 2048)
    take a narrower, longer tile (4 x 2048 bytes) so that every SM gets several programs;
  * M >= 3: `tl.dot` on tensor cores with the rows padded to 16 (the weight tile widened to x's dtype:
    exact, every e4m3 value is a bf16/fp16 value). tl.dot needs BLOCK_N >= 16, so few output tiles
    (N = 2048-3072) split K over more programs: each writes an fp32 partial to a [SPLIT_K, M, N]
    workspace and a second small kernel sums them and applies the epilogue (deterministic, no atomics,
    no zero-filled buffer).

Configurations come from a rule (`choose_config`), not `triton.autotune`: the decode graph is captured in
a CUDA graph, where an autotuner's benchmarking must not run, and the rule is the same in eager, compiled
and captured runs. `tools/bench_decode_gemm.py --sweep` times the alternatives on a GPU.

Registered with `torch.library.triton_op` (with a fake implementation that allocates the output), so
torch.compile sees the Triton kernels (inductor launches them from its generated code) and CUDA graphs
capture them. Triton is optional: without it (CPU-only torch builds) nothing is registered, `gemv_skip_reason`
says why, and rewriter::fp8_weight_linear runs its reference path. `_launch` runs the kernels directly,
also on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os

import torch

from rewriter.errors import first_line
from rewriter.runtime.fp8_ops import FP8_DTYPE, fp8_gemm_supported

__all__ = ["GEMV_MAX_ROWS", "GemvConfig", "choose_config", "gemv_available", "gemv_skip_reason",
           "fp8_weight_gemv", "gemv_failed", "routing_counts", "reset_routing_counts", "note_route", "TRITON_ERROR"]

GEMV_MAX_ROWS = 16
"""Rows (x.numel() // K) up to which rewriter::fp8_weight_linear runs the GEMV: a decode batch."""
_DOT_MIN_ROWS = 3
"""From this many rows the inner product runs on tensor cores (tl.dot, rows padded to 16); below it on
CUDA cores. A first guess: `tools/bench_decode_gemm.py --sweep` measures both forms."""
_PROGRAMS_PER_SM = 4  # programs wanted per SM: 4 x 8 KB tiles, about the weight bytes in flight HBM needs
_MAX_SPLIT_K = 16
_SUPPORTED_X = (torch.bfloat16, torch.float16)


try:
    import triton
    import triton.language as tl
    TRITON_ERROR: str | None = None
except Exception as exc:  # not installed (CPU-only torch builds) or broken: callers use the reference path
    triton = tl = None
    TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {first_line(exc, 120)})"


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """One launch configuration: output columns per program, K per loop step, programs along K, warps,
    pipeline stages, and whether the inner product runs on tensor cores."""
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    use_dot: bool = False


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def choose_config(m: int, n: int, k: int, sms: int = 132) -> GemvConfig:
    """The rule: 16-byte weight vectors, a 4-8 KB weight tile per program and loop step, and about
    `_PROGRAMS_PER_SM` programs per SM, so that enough weight bytes are in flight to reach HBM bandwidth.

    CUDA-core form (1-2 rows): where N / BLOCK_N gives too few programs, the tile gets narrower and longer
    (16 x 512 -> 8 x 1024 -> 4 x 2048 for one row: the same bytes per step); K is split only where even
    that leaves under 2 programs per SM. Tensor-core form (3-16 rows): tl.dot needs BLOCK_N >= 16, so K is
    split until about `_PROGRAMS_PER_SM` programs per SM (N = 2048: 128 tiles x 4).

    Example:
        >>> choose_config(1, 2048, 2048)  # 512 programs of 4 rows x 2048 bytes, no split
        GemvConfig(block_n=4, block_k=2048, split_k=1, num_warps=4, num_stages=2, use_dot=False)
        >>> choose_config(8, 2048, 2048)  # 128 column tiles of 16: K split in 4 (4 x 512)
        GemvConfig(block_n=16, block_k=512, split_k=4, num_warps=4, num_stages=3, use_dot=True)
    """
    want = _PROGRAMS_PER_SM * sms
    longest = min(2048, max(16, _pow2(k)))
    block_k = min(512, longest)
    if m >= _DOT_MIN_ROWS:
        block_n, floor, stages = 16, want, 3
    else:  # the 2-row form holds 2 x BLOCK_N x BLOCK_K fp32 partial sums: half the tile
        block_n, floor, stages = (16 if m == 1 else 8), 2 * sms, 2
        while _cdiv(n, block_n) < want and block_n > 2 and block_k * 2 <= longest:
            block_n, block_k = block_n // 2, block_k * 2
    tiles = _cdiv(n, block_n)
    steps = _cdiv(k, block_k)
    split = 1
    while tiles * split < floor and split * 2 <= min(steps, _MAX_SPLIT_K):
        split *= 2
    return GemvConfig(block_n, block_k, split, 4, stages, m >= _DOT_MIN_ROWS)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: the H100/H200's count, so tests run the same configurations
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------- the kernels

if triton is not None:
    @triton.jit
    def _epilogue(acc, rn, n_ok, scale_ptr, bias_ptr, SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr):
        if SCALE_PER_N:
            acc = acc * tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:
            acc = acc * tl.load(scale_ptr).to(tl.float32)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _fp8_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, ws_ptr, M, N, K, stride_xm, stride_wn,
                         k_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
                         DOT_F32: tl.constexpr, SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # rows and columns past the end load the last one again (no masks: 16-byte vectors stay intact);
        # the stores are masked
        rm_in = tl.minimum(rm, M - 1)
        rn_in = tl.minimum(rn, N - 1)
        k0 = pid_k * k_split
        x_ptrs = x_ptr + rm_in[:, None] * stride_xm + (k0 + rk)[None, :]
        w_ptrs = w_ptr + rn_in.to(tl.int64)[:, None] * stride_wn + (k0 + rk)[None, :]
        if USE_DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        elif BLOCK_M == 1:  # the plain GEMV: one activation row against a [BLOCK_N, BLOCK_K] weight tile
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            x_ptrs = x_ptr + k0 + rk
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k in range(0, k_split, BLOCK_K):
            if EVEN_K:
                xv = tl.load(x_ptrs)
                wv = tl.load(w_ptrs)
            else:  # a tail past K: zeros (an e4m3 byte past the row could be NaN, and 0 * NaN is NaN)
                k_ok = (k0 + k + rk) < K
                if BLOCK_M == 1 and not USE_DOT:
                    xv = tl.load(x_ptrs, mask=k_ok, other=0.0)
                else:
                    xv = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                wv = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if USE_DOT:
                if DOT_F32:  # the interpreter multiplies bf16's uint16 storage in tl.dot: exact fp32 instead
                    acc += tl.dot(xv.to(tl.float32), tl.trans(wv.to(tl.float32)), input_precision="ieee")
                else:
                    acc += tl.dot(xv, tl.trans(wv.to(xv.dtype)), out_dtype=tl.float32)
            elif BLOCK_M == 1:
                acc += wv.to(tl.float32) * xv.to(tl.float32)[None, :]
            else:
                acc += xv.to(tl.float32)[:, None, :] * wv.to(tl.float32)[None, :, :]
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if USE_DOT:
            total = acc
        elif BLOCK_M == 1:
            total = tl.sum(acc, axis=1)[None, :]
        else:
            total = tl.sum(acc, axis=2)
        m_ok = rm < M
        n_ok = rn < N
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            total = _epilogue(total, rn, n_ok, scale_ptr, bias_ptr, SCALE_PER_N, HAS_BIAS)
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ws_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], total, mask=mask)

    @triton.jit
    def _fp8_gemv_reduce_kernel(ws_ptr, scale_ptr, bias_ptr, out_ptr, M, N, SPLIT_K: tl.constexpr,
                                BLOCK_N: tl.constexpr, SCALE_PER_N: tl.constexpr, HAS_BIAS: tl.constexpr):
        row = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + s * M * N + row * N + rn, mask=n_ok, other=0.0)[None, :]
        acc = _epilogue(acc, rn, n_ok, scale_ptr, bias_ptr, SCALE_PER_N, HAS_BIAS)
        tl.store(out_ptr + row * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=n_ok[None, :])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
            out_dtype: torch.dtype, config: GemvConfig | None = None, wrap=None) -> torch.Tensor:
    """Run the GEMV: x [..., K] (bf16/fp16, rows <= GEMV_MAX_ROWS), w_fp8 [N, K] contiguous float8_e4m3fn,
    w_scale fp32 0-dim/[1]/[N], bias [N] or None -> [..., N] in out_dtype. `config`: GemvConfig (default:
    `choose_config`); `wrap`: torch.library.wrap_triton inside the triton_op, None to launch directly (eager,
    or on CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError(f"rewriter fp8 GEMV: {TRITON_ERROR}")
    n, k = w_fp8.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or choose_config(m, n, k, _sms(x.device))
    out = torch.empty((*x.shape[:-1], n), dtype=out_dtype, device=x.device)
    scale = w_scale.reshape(-1).to(torch.float32)
    per_n = scale.numel() != 1
    k_split = _cdiv(_cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k  # a multiple of BLOCK_K
    split = _cdiv(k, k_split)
    ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    dot = cfg.use_dot
    block_m = max(16, _pow2(m)) if dot else _pow2(m)
    main = _fp8_gemv_kernel if wrap is None else wrap(_fp8_gemv_kernel)
    main[(_cdiv(n, cfg.block_n), split)](
        x2, w_fp8, scale, bias if bias is not None else scale, out, ws, m, n, k, x2.stride(0), w_fp8.stride(0),
        k_split, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        EVEN_K=k % k_split == 0, USE_DOT=dot, DOT_F32=dot and _interpreted() and x.dtype == torch.bfloat16,
        SCALE_PER_N=per_n, HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        reduce = _fp8_gemv_reduce_kernel if wrap is None else wrap(_fp8_gemv_reduce_kernel)
        reduce[(m, _cdiv(n, 256))](ws, scale, bias if bias is not None else scale, out, m, n, SPLIT_K=split,
                                   BLOCK_N=256, SCALE_PER_N=per_n, HAS_BIAS=bias is not None, num_warps=2)
    return out


# ---------------------------------------------------------------- registration and routing

fp8_weight_gemv = None
"""`torch.ops.rewriter.fp8_weight_gemv` once registered (triton importable), else None."""

if triton is not None and hasattr(torch.library, "triton_op"):
    try:
        @torch.library.triton_op("rewriter::fp8_weight_gemv", mutates_args=())
        def _fp8_weight_gemv(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
            return _launch(x, w_fp8, w_scale, bias, out_dtype, wrap=torch.library.wrap_triton)

        @_fp8_weight_gemv.register_fake
        def _fp8_weight_gemv_fake(x, w_fp8, w_scale, bias, out_dtype):
            # the output only (triton_op's default fake runs the launcher, which the interpreter executes)
            return x.new_empty((*x.shape[:-1], w_fp8.shape[0]), dtype=out_dtype)
    except RuntimeError as exc:  # importlib.reload of this module: the op is already defined
        if "already" not in str(exc) and "multiple times" not in str(exc):
            raise
    fp8_weight_gemv = torch.ops.rewriter.fp8_weight_gemv.default

_ROUTES: collections.Counter = collections.Counter()
_FAILED: list[str] = []  # why the GEMV failed to compile or launch in this process (then never tried again)


def gemv_failed(exc: BaseException) -> str:
    """Record that the GEMV failed (a Triton compile error on this GPU or Triton version): this process
    runs the reference from now on. Returns the reason, which the caller warns with."""
    reason = f"the GEMV failed in this process ({type(exc).__name__}: {first_line(exc, 200)})"
    if not _FAILED:
        _FAILED.append(reason)
    return reason


def gemv_available() -> bool:
    """True when the GEMV is registered and a CUDA FP8 device (sm_89+) is present: what the FP8 plan
    assumes when it estimates a weight-only decode GEMM."""
    return fp8_weight_gemv is not None and not _FAILED and fp8_gemm_supported(None)


def gemv_skip_reason(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> str | None:
    """Why rewriter::fp8_weight_linear cannot run the GEMV for these operands (None: it can). Decided from
    static facts only (device, dtypes, shapes; a symbolic row count counts as not supported), so a traced
    graph makes the same choice as an eager call."""
    if fp8_weight_gemv is None:
        return TRITON_ERROR or "torch.library.triton_op is missing (torch < 2.6)"
    if _FAILED:
        return _FAILED[0]
    if x.device.type != "cuda" or not fp8_gemm_supported(x.device):
        return f"{x.device.type} device: the GEMV needs CUDA sm_89+ (Triton's float8_e4m3fn)"
    if x.dtype not in _SUPPORTED_X:
        return f"activation {x.dtype}: the GEMV takes bfloat16 or float16"
    if w_fp8.dtype != FP8_DTYPE or w_fp8.dim() != 2 or w_fp8.stride(-1) != 1 or w_fp8.device != x.device:
        return "weight not a contiguous 2-D float8_e4m3fn tensor on x's device"
    n, k = w_fp8.shape
    numel = x.numel()
    if not all(isinstance(v, int) for v in (numel, n, k, x.shape[-1])):
        return "symbolic shapes (the GEMV is chosen for a static decode graph)"
    if x.shape[-1] != k or numel == 0:
        return f"activation {tuple(x.shape)} against weight {tuple(w_fp8.shape)}: no rows of width K"
    rows = numel // k
    if rows > GEMV_MAX_ROWS:
        return f"{rows} rows > {GEMV_MAX_ROWS}: a GEMM, not a GEMV"
    if w_scale.numel() not in (1, n) or (bias is not None and bias.numel() != n):
        return "scale or bias shape not [N] or 0-dim"
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return "autograd: the GEMV has no backward"
    if torch.onnx.is_in_onnx_export():
        return "ONNX export: the reference's aten ops translate to ONNX, a Triton kernel does not"
    return None


def note_route(kernel: str) -> None:
    """Count one routing decision of rewriter::fp8_weight_linear (made per eager call and per trace)."""
    _ROUTES[kernel] += 1


def routing_counts() -> dict:
    """{kernel or fallback reason: decisions} since the last `reset_routing_counts`: what ran (eager) or
    was compiled into a graph (torch.compile traces the decision once per graph)."""
    return dict(_ROUTES)


def reset_routing_counts() -> None:
    _ROUTES.clear()
