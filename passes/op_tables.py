"""Op table: which ops run in low precision, which stay fp32, which follow their inputs.

The lists start from PyTorch autocast's CUDA policy (aten/src/ATen/autocast_mode.cpp) so that a
converted model computes each op in the precision autocast would, with weights cast once instead of
on every call. Deviations from autocast, each deliberate:
  * mean/var/std/norm reductions stay fp32 (fp16 ReduceMean/variance overflow: pytorch#66707).
  * batch_norm follows its input (cuDNN and the CPU kernels accumulate in fp32 for 16-bit inputs).
    Its statistics and affine parameters stay fp32, as under autocast (which never casts them):
    the kernels read a 16-bit input with fp32 parameters, and rounding running_var or the scale to
    bf16 costs accuracy for a few bytes (see FP32_PARAM_OPS).

An op is named by `op_name(node)`: the aten overload packet name for torch.export graphs
("linear", "softmax"), the function or method name for symbolic_trace graphs, and a module-type
mapping for call_module nodes, so one table serves both capture paths.
"""
from __future__ import annotations

import enum
import operator

import torch
import torch.nn as nn

__all__ = ["OpClass", "op_name", "op_class", "is_exact", "is_known_op", "reads_fp32_params", "CAST_OPS",
           "MODULE_OPS", "FP32_PARAM_OPS", "INPUT_DTYPE_FACTORIES", "NATIVE_PROMOTION_OPS",
           "promotes_natively", "EXPORT_TARGETS", "DATA_MOVEMENT_OPS", "target_gap"]


class OpClass(str, enum.Enum):
    LOWP = "lowp"            # tensor-core ops: run in fp16/bf16
    FP32 = "fp32"            # numerically sensitive: run in fp32
    FOLLOW = "follow"        # run in the precision of the first floating input
    PROMOTE = "promote"      # several floating inputs: run in the widest of them
    UNTOUCHED = "untouched"  # no floating compute to decide: ints, shapes, explicit casts, factories


LOWP_OPS = frozenset("""
conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d convolution
_convolution cudnn_convolution prelu _prelu_kernel addmm addmv addr matmul einsum mm mv linear addbmm
baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell
gru_cell rnn_tanh_cell rnn_relu_cell lstm gru scaled_dot_product_attention
_scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention
_scaled_dot_product_cudnn_attention _native_multi_head_attention
fp8_linear fp8_linear_train fp8_weight_linear
""".split())  # rewriter::fp8_linear, fp8_linear_train, fp8_weight_linear: the FP8 GEMMs made by passes/lower/fp8.py

FP32_OPS = frozenset("""
acos asin cosh erfinv exp exp2 expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow
float_power softplus layer_norm native_layer_norm group_norm native_group_norm rms_norm
_fused_rms_norm frobenius_norm nuclear_norm cosine_similarity poisson_nll_loss
cosine_embedding_loss nll_loss nll_loss2d nll_loss_nd hinge_embedding_loss kl_div l1_loss
smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss
triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits binary_cross_entropy
cross_entropy cross_entropy_loss dist pdist cdist renorm logsumexp upsample_nearest1d
upsample_nearest2d upsample_nearest3d upsample_linear1d upsample_bilinear2d upsample_bicubic2d
upsample_trilinear3d _upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d
_upsample_bilinear2d_aa _upsample_bicubic2d_aa interpolate grid_sampler grid_sample prod cumprod
cumsum linalg_vector_norm linalg_matrix_norm norm log_softmax _log_softmax softmax _softmax
_safe_softmax sum nansum mean nanmean var std var_mean std_mean
""".split())

PROMOTE_OPS = frozenset("""
add sub rsub mul div true_divide floor_divide where cat concat concatenate stack hstack vstack
addcmul addcdiv index_put index_put_ maximum minimum fmax fmin lerp atan2 cross dot vdot
tensordot bilinear scatter_add scatter masked_scatter copysign hypot remainder fmod
broadcast_tensors
""".split())

# The promote ops whose kernels promote mixed float inputs themselves: add(fp16, fp32) computes in fp32
# without a cast. The others (index_put, scatter*, masked_scatter, lerp, dot, vdot, cross, tensordot,
# bilinear) require equal dtypes, and broadcast_tensors returns each input in its own dtype: those need
# their inputs cast to the widest explicitly (as autocast's promote list does).
NATIVE_PROMOTION_OPS = frozenset("""
add sub rsub mul div true_divide floor_divide where cat concat concatenate stack hstack vstack
addcmul addcdiv maximum minimum fmax fmin atan2 copysign hypot remainder fmod
""".split())

# Ops whose result does not depend on the precision they run in: cast(op(x)) == op(cast(x)).
# The assignment may move casts across them to where the tensor is smallest.
EXACT_OPS = frozenset("""
view reshape _unsafe_view transpose permute t expand expand_as squeeze unsqueeze flatten unflatten
slice select getitem narrow split split_with_sizes chunk unbind tensor_split contiguous clone alias
detach lift_fresh_copy dropout feature_dropout alpha_dropout relu relu6 hardtanh max_pool1d
max_pool2d max_pool3d max_pool2d_with_indices adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d neg abs embedding index index_select gather take flip roll repeat tile
constant_pad_nd movedim moveaxis as_strided pixel_shuffle pixel_unshuffle channel_shuffle amax
amin max min identity view_as repeat_interleave diagonal narrow_copy select_copy slice_copy
permute_copy transpose_copy view_copy unsqueeze_copy squeeze_copy expand_copy t_copy
""".split())

# Ops that compute in the precision of their first input but read every other floating input
# (statistics, scale, shift) in fp32 whatever that precision is: the batch-norm kernels on CPU and CUDA
# accept a 16-bit input with fp32 parameters, which is how autocast runs them. Only the first input
# is cast; the parameters keep their dtype (and cast_weights leaves them fp32).
FP32_PARAM_OPS = frozenset("""
batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
_native_batch_norm_legit_functional cudnn_batch_norm miopen_batch_norm instance_norm
fp8_linear fp8_linear_train fp8_weight_linear
""".split())  # fp8_linear (and fp8_weight_linear) reads its float8 weight, fp32 scales and bias as stored, fp8_linear_train its
# fp32 master weight: only x is cast

# Explicit dtype changes written by the user or inserted by us.
CAST_OPS = frozenset("_to_copy to type type_as float half bfloat16 double _autocast_to_reduced_precision "
                     "_autocast_to_full_precision convert_element_type".split())

# Factories that make a tensor in the dtype of their first input unless given `dtype=`: they follow
# it (zeros_like(fp16) is fp16), so classify makes them FOLLOW when that input is floating.
INPUT_DTYPE_FACTORIES = frozenset("""
empty_like zeros_like ones_like full_like randn_like rand_like new_zeros new_ones new_full new_empty
new_tensor
""".split())

UNTOUCHED_OPS = frozenset("""
arange full zeros ones empty empty_like rand randn randint randperm scalar_tensor tensor
linspace logspace eye zeros_like ones_like full_like randn_like rand_like new_zeros new_ones
new_full new_empty new_tensor sym_size sym_numel sym_stride size dim numel _assert_tensor_metadata
_assert_scalar sym_constrain_range sym_constrain_range_for_size _assert_async
""".split()) | CAST_OPS

# Module types seen as call_module in symbolic_trace graphs, mapped to the op they compute.
MODULE_OPS: dict[type, str] = {
    nn.Linear: "linear", nn.Bilinear: "bilinear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d", nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d", nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.Embedding: "embedding", nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax", nn.ReLU: "relu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Dropout: "dropout",
    nn.Identity: "identity", nn.Flatten: "flatten", nn.MaxPool2d: "max_pool2d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d", nn.AvgPool2d: "avg_pool2d", nn.Upsample: "interpolate",
    nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse_loss", nn.PReLU: "prelu",
    nn.MultiheadAttention: "_native_multi_head_attention", nn.LSTM: "lstm", nn.GRU: "gru",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.ReLU6: "relu6",
}
if hasattr(nn, "RMSNorm"):
    MODULE_OPS[nn.RMSNorm] = "rms_norm"

_BUILTINS = {operator.getitem: "getitem", operator.add: "add", operator.sub: "sub",
             operator.mul: "mul", operator.truediv: "div", operator.floordiv: "floor_divide",
             operator.neg: "neg", operator.matmul: "matmul", operator.pow: "pow", getattr: "getattr"}


def op_name(node) -> str:
    """Canonical op name of an fx node, shared by torch.export and symbolic_trace graphs."""
    if node.op == "call_function":
        target = node.target
        if target in _BUILTINS:
            return _BUILTINS[target]
        packet = getattr(target, "_overloadpacket", None)
        name = getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))
        name = name.split("::")[-1].split(".")[0]
    elif node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module else None
        name = MODULE_OPS.get(type(module), f"module:{type(module).__name__}")
    else:
        return node.op
    if name.endswith("_") and not name.startswith("_") and name[:-1] not in ("__and", "__or"):
        name = name[:-1]  # in-place variant: same numerics as the functional op
    return name


def is_known_op(name: str) -> bool:
    return any(name in table for table in (LOWP_OPS, FP32_OPS, PROMOTE_OPS, EXACT_OPS, UNTOUCHED_OPS))


def op_class(name: str) -> tuple[OpClass, str]:
    """Static class of an op and the reason, before any analysis or override."""
    if name in LOWP_OPS:
        return OpClass.LOWP, f"{name} is a tensor-core op (autocast low-precision list)"
    if name in FP32_OPS:
        return OpClass.FP32, f"{name} is numerically sensitive (range or accumulation): kept fp32"
    if name in UNTOUCHED_OPS:
        return OpClass.UNTOUCHED, f"{name} has an explicit dtype or no floating compute"
    if name in PROMOTE_OPS:
        return OpClass.PROMOTE, f"{name} runs in the widest precision of its inputs"
    if name.startswith("module:"):
        return OpClass.FP32, f"opaque module {name[7:]}: kept fp32 (its ops could not be seen)"
    return OpClass.FOLLOW, f"{name} runs in the precision of its input"


def promotes_natively(name: str) -> bool:
    """True when the op's kernel itself computes mixed fp16/fp32 inputs in fp32 (no cast needed)."""
    return name in NATIVE_PROMOTION_OPS


def reads_fp32_params(name: str) -> bool:
    """True when only the op's first input follows its compute precision (see FP32_PARAM_OPS)."""
    return name in FP32_PARAM_OPS


def is_exact(name: str) -> bool:
    """True when the op's result is the same whichever float precision it runs in (data movement)."""
    return name in EXACT_OPS


# ---- export targets: the 16-bit kernels an ONNX Runtime execution provider lacks (used by
# passes/target/ort_kernels.py before export_onnx; the exported file is made to run there).
EXPORT_TARGETS = {
    "ort-cpu": "ONNX Runtime's CPU execution provider",
    "ort-cuda": "ONNX Runtime's CUDA execution provider",
    "tensorrt": "ONNX Runtime's TensorRT execution provider (nodes TensorRT refuses run on the CUDA EP)",
}

# Ops that only move or select elements: their ONNX ops (Reshape, Transpose, Slice, Split, Squeeze...)
# have kernels for every dtype on every execution provider.
DATA_MOVEMENT_OPS = frozenset("""
view reshape _unsafe_view transpose permute t expand expand_as squeeze unsqueeze flatten unflatten slice
select getitem narrow split split_with_sizes chunk unbind tensor_split contiguous clone alias detach
lift_fresh_copy dropout feature_dropout alpha_dropout identity view_as movedim moveaxis narrow_copy
select_copy slice_copy permute_copy transpose_copy view_copy unsqueeze_copy squeeze_copy expand_copy t_copy
""".split())

# onnxconverter-common's float16 DEFAULT_OP_BLOCK_LIST (ops ONNX Runtime lacks fp16 kernels for on some
# EPs), as the torch ops that export to them: TopK, Range, CumSum, Min/Max, Resize/Upsample, RoiAlign, NMS.
_NO_FP16_KERNEL = frozenset("""
topk arange cumsum minimum maximum fmin fmax upsample_nearest1d upsample_nearest2d upsample_nearest3d
upsample_linear1d upsample_bilinear2d upsample_bicubic2d upsample_trilinear3d _upsample_nearest_exact1d
_upsample_nearest_exact2d _upsample_nearest_exact3d _upsample_bilinear2d_aa _upsample_bicubic2d_aa interpolate
roi_align nms
""".split())

# The CUDA EP: pooling kernels for float, double and float16, not bfloat16. Measured on an H200 with
# onnxruntime-gpu 1.31.1 (tests/passes/target/test_ort_kernels.py, one-node models, CPU fallback off): a
# bfloat16 Conv loads and runs on the CUDA EP, a bfloat16 MaxPool fails at session creation ("Provider type
# for MaxPool node ... is not set"). ConvTranspose and the other pools are not measured: kept on the list
# (an fp32 island costs two Casts; a missing kernel costs a file that does not load).
_CUDA_NO_BF16_KERNEL = _NO_FP16_KERNEL | frozenset("""
conv_transpose1d conv_transpose2d conv_transpose3d
max_pool1d max_pool2d max_pool3d max_pool2d_with_indices avg_pool1d avg_pool2d avg_pool3d
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d adaptive_max_pool2d
""".split())

# None: no kernel for any op that computes but those of _CPU_BF16_KERNELS (measured on onnxruntime 1.32 by
# loading one-node models: tests/passes/target/test_ort_kernels.py checks the table against the installed one).
_CPU_BF16_KERNELS = frozenset("layer_norm native_layer_norm clamp clip hardtanh".split())
_TARGET_GAPS: dict[tuple[str, str], frozenset | None] = {
    ("ort-cpu", "float16"): _NO_FP16_KERNEL,
    ("ort-cpu", "bfloat16"): None,
    ("ort-cuda", "float16"): _NO_FP16_KERNEL,
    ("ort-cuda", "bfloat16"): _CUDA_NO_BF16_KERNEL,
    ("tensorrt", "float16"): _NO_FP16_KERNEL,
    ("tensorrt", "bfloat16"): _CUDA_NO_BF16_KERNEL,
}


def target_gap(target: str, dtype_name: str, name: str) -> bool:
    """True when `target`'s execution provider has no `dtype_name` ("float16", "bfloat16") kernel for
    the op `name` (op_name of an fx node); data movement and casts always have one."""
    if name in DATA_MOVEMENT_OPS or name in CAST_OPS or (target, dtype_name) not in _TARGET_GAPS:
        return False
    gaps = _TARGET_GAPS[(target, dtype_name)]
    if gaps is None:
        return not (target == "ort-cpu" and name in _CPU_BF16_KERNELS)
    return name in gaps
