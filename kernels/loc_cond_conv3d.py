"""Fused Loc-CondConv 3D convolution in Triton: kernels, launchers, autograd wrapper.

Loc-CondConv (Yu et al. 2023, eqs. 3-4) convolves sample b with ``sum_e r[g, e] * W_e``, where
``g = index[b]`` is the sample's landmark and ``r`` the landmark's sigmoid routing weights.
Samples of a landmark share that kernel exactly, so every kernel here is an implicit GEMM
whose rows run over *all samples of one landmark* (``LandmarkPartition.order/offsets``); the deep
layers (2^3 or 1^3 outputs per sample) then still fill whole tiles.

- ``_forward_kernel``: y = conv(x, mixed kernel) + bias. The mixed kernel tile is formed in
  registers from the E experts and the routing weights; no per-landmark kernel is written.
  GEMM: M = group's output voxels, N = C_out, K = k^3 * C_in.
- ``_grad_input_kernel``: dx = transposed conv of dy with the mixed kernel.
  GEMM: M = group's input voxels, N = C_in, K = k^3 * C_out.
- ``_grad_mixed_kernel_kernel``: gW[g] = sum over the group's output voxels of dy x patch.
  GEMM: M = C_out, N = k^3 * C_in, K = group's output voxels (split over programs, atomics).
  The experts' and routing weights' gradients are two small matmuls of gW (PyTorch).

Layout: the reduction index runs tap-major (``kk = tap * C + c``) so that channels-last
inputs are read contiguously. All kernels take element strides, so contiguous,
channels-last-3d and broadcast (stride 0) tensors need no copy. Accumulation is float32;
bfloat16/float16 operands go to ``tl.dot`` as they are (see ``_dot`` for the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.testing import do_bench

from drasclr.conv_common import IntOrTriple, LandmarkPartition, as_triple

from .support import interpreter_enabled, triton_unsupported_reason

# Split-K chunk of the kernel-gradient reduction: rows (group output voxels) per program.
DEFAULT_ROWS_PER_SPLIT = 2048


# ----------------------------------------------------------------------------- autotuning
def _gemm_configs() -> list[triton.Config]:
    """Block sizes to try; one config under the interpreter (tuning there is slow).

    The GPU list keeps the sizes that compile for sm_90 without spilling registers in all
    three kernels (cuobjdump resource usage, 2026-11-22): larger tiles such as 128x64x32 with
    4 warps or 128x128x32 spilled 0.5-2 KB per thread in the forward and grad-input kernels,
    whose mixed-kernel tiles and gathered input tiles live in registers.
    """
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 64, 32, 8, 3),  # for the kernel gradient; spills in the other two kernels
            (128, 32, 32, 8, 3),
            (64, 64, 64, 8, 3),
            (64, 64, 32, 8, 3),
            (64, 32, 32, 4, 3),
            (64, 16, 32, 4, 3),
            (32, 64, 32, 4, 3),
            (32, 32, 32, 4, 2),
            (16, 64, 64, 4, 2),  # few voxels per landmark (deep layers, distinct landmarks)
            (16, 16, 32, 2, 2),
        ]
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop block sizes far larger than the problem (e.g. BLOCK_N=128 for 8 channels)."""
    limits = {
        "BLOCK_M": max(16, triton.next_power_of_2(named_args["M_HINT"])),
        "BLOCK_N": max(16, triton.next_power_of_2(named_args["N_SIZE"])),
        "BLOCK_K": max(16, triton.next_power_of_2(named_args["K_SIZE"])),
    }
    kept = [c for c in configs if all(c.kwargs[name] <= limit for name, limit in limits.items())]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _short_bench(kernel_call, quantiles):
    """Short timing runs per candidate, so tuning a new shape costs well under a second."""
    return do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _autotune(**extra):
    """Autotune keyed on the GEMM sizes (and, by Triton, the tensors' dtypes); M_HINT is the
    largest group's rows rounded to a power of two, so uneven batches reuse a tuned entry."""
    return triton.autotune(
        configs=_gemm_configs(),
        key=["M_HINT", "N_SIZE", "K_SIZE"],
        prune_configs_by={"early_config_prune": _prune_configs},
        do_bench=_short_bench,
        **extra,
    )


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _mix_experts(w_ptr, r_ptr, g, offs, mask, NUM_EXPERTS, EXPERT_NUMEL):
    """Tile of landmark g's kernel, sum_e r[g, e] * W_e[offs], in float32 registers."""
    tile = tl.zeros(offs.shape, dtype=tl.float32)
    for e in range(NUM_EXPERTS):
        r = tl.load(r_ptr + g * NUM_EXPERTS + e).to(tl.float32)
        w = tl.load(w_ptr + e * EXPERT_NUMEL + offs, mask=mask, other=0.0)
        tile += r * w.to(tl.float32)
    return tile


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    UPCAST_BF16 works around the interpreter (triton 3.9), whose bf16 ``tl.dot`` returns
    garbage; a product of two bf16 values is exact in float32, so the result is the same.
    """
    if UPCAST_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@_autotune()
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, r_ptr, bias_ptr, y_ptr, order_ptr, offsets_ptr,
    C_IN, C_OUT, NUM_EXPERTS,
    D, H, W, OD, OH, OW,
    sx_b, sx_c, sx_d, sx_h, sx_w,
    sy_b, sy_c, sy_d, sy_h, sy_w,
    M_HINT, N_SIZE, K_SIZE,  # GEMM sizes; M_HINT only keys the autotuner
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[b] = conv(x[b], sum_e r[g, e] W_e) + bias for the samples b of landmark g."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    pid_n = tl.program_id(2)
    TAPS: tl.constexpr = KD * KH * KW
    first = tl.load(offsets_ptr + g)
    voxels = OD * OH * OW
    rows = (tl.load(offsets_ptr + g + 1) - first) * voxels
    if pid_m * BLOCK_M >= rows:  # grid is sized for the largest landmark
        return

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < rows
    b = tl.load(order_ptr + first + m // voxels, mask=m_mask, other=0)
    v = m % voxels
    od = v // (OH * OW)
    oh = (v // OW) % OH
    ow = v % OW
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N_SIZE

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_SIZE, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K_SIZE
        tap = kk // C_IN
        ci = kk % C_IN
        i_d = od[:, None] * SD - PD + (tap // (KH * KW))[None, :]
        i_h = oh[:, None] * SH - PH + ((tap // KW) % KH)[None, :]
        i_w = ow[:, None] * SW - PW + (tap % KW)[None, :]
        a_mask = (m_mask[:, None] & k_mask[None, :] & (i_d >= 0) & (i_d < D)
                  & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W))
        a_offs = b[:, None] * sx_b + ci[None, :] * sx_c + i_d * sx_d + i_h * sx_h + i_w * sx_w
        a = tl.load(x_ptr + a_offs, mask=a_mask, other=0.0)
        w_offs = n[None, :] * (C_IN * TAPS) + ci[:, None] * TAPS + tap[:, None]
        w_mask = k_mask[:, None] & n_mask[None, :]
        w_tile = _mix_experts(w_ptr, r_ptr, g, w_offs, w_mask, NUM_EXPERTS, C_OUT * C_IN * TAPS)
        acc = _dot(a, w_tile.to(a.dtype), acc, DOT_PRECISION, UPCAST_BF16)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_offs = (b * sy_b + od * sy_d + oh * sy_h + ow * sy_w)[:, None] + n[None, :] * sy_c
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@_autotune()
@triton.jit
def _grad_input_kernel(
    dy_ptr, w_ptr, r_ptr, dx_ptr, order_ptr, offsets_ptr,
    C_IN, C_OUT, NUM_EXPERTS,
    D, H, W, OD, OH, OW,
    sg_b, sg_c, sg_d, sg_h, sg_w,
    sx_b, sx_c, sx_d, sx_h, sx_w,
    M_HINT, N_SIZE, K_SIZE,  # GEMM sizes; M_HINT only keys the autotuner
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[b] = conv_transpose(dy[b], sum_e r[g, e] W_e) for the samples b of landmark g.

    Input voxel i receives tap t from output voxel o when o * stride - pad + t = i, i.e. when
    i + pad - t is a non-negative multiple of the stride below stride * output size.
    """
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    pid_n = tl.program_id(2)
    TAPS: tl.constexpr = KD * KH * KW
    first = tl.load(offsets_ptr + g)
    voxels = D * H * W
    rows = (tl.load(offsets_ptr + g + 1) - first) * voxels
    if pid_m * BLOCK_M >= rows:
        return

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < rows
    b = tl.load(order_ptr + first + m // voxels, mask=m_mask, other=0)
    v = m % voxels
    i_d = v // (H * W)
    i_h = (v // W) % H
    i_w = v % W
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel
    n_mask = n < N_SIZE

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_SIZE, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K_SIZE
        tap = kk // C_OUT
        co = kk % C_OUT
        t_d = i_d[:, None] + PD - (tap // (KH * KW))[None, :]
        t_h = i_h[:, None] + PH - ((tap // KW) % KH)[None, :]
        t_w = i_w[:, None] + PW - (tap % KW)[None, :]
        o_d = t_d // SD
        o_h = t_h // SH
        o_w = t_w // SW
        a_mask = (m_mask[:, None] & k_mask[None, :]
                  & (t_d >= 0) & (t_d % SD == 0) & (o_d < OD)
                  & (t_h >= 0) & (t_h % SH == 0) & (o_h < OH)
                  & (t_w >= 0) & (t_w % SW == 0) & (o_w < OW))
        a_offs = b[:, None] * sg_b + co[None, :] * sg_c + o_d * sg_d + o_h * sg_h + o_w * sg_w
        a = tl.load(dy_ptr + a_offs, mask=a_mask, other=0.0)
        w_offs = co[:, None] * (C_IN * TAPS) + n[None, :] * TAPS + tap[:, None]
        w_mask = k_mask[:, None] & n_mask[None, :]
        w_tile = _mix_experts(w_ptr, r_ptr, g, w_offs, w_mask, NUM_EXPERTS, C_OUT * C_IN * TAPS)
        acc = _dot(a, w_tile.to(a.dtype), acc, DOT_PRECISION, UPCAST_BF16)

    dx_offs = (b * sx_b + i_d * sx_d + i_h * sx_h + i_w * sx_w)[:, None] + n[None, :] * sx_c
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@_autotune(reset_to_zero=["gw_ptr"])  # programs accumulate atomically: tuning runs start at 0
@triton.jit
def _grad_mixed_kernel_kernel(
    dy_ptr, x_ptr, gw_ptr, order_ptr, offsets_ptr,
    C_IN, C_OUT,
    D, H, W, OD, OH, OW,
    sg_b, sg_c, sg_d, sg_h, sg_w,
    sx_b, sx_c, sx_d, sx_h, sx_w,
    ROWS_PER_SPLIT,
    M_HINT, N_SIZE, K_SIZE,  # C_out, k^3 * C_in, rows per program; K_SIZE only keys the tuner
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gW[g] += sum over a chunk of landmark g's output voxels of dy (x) input patch.

    Each program reduces ROWS_PER_SPLIT rows (split-K) so that one landmark holding the whole
    batch still spreads over many programs; partial sums meet in float32 atomics.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    TAPS: tl.constexpr = KD * KH * KW
    first = tl.load(offsets_ptr + g)
    voxels = OD * OH * OW
    rows = (tl.load(offsets_ptr + g + 1) - first) * voxels
    start = split * ROWS_PER_SPLIT
    if start >= rows:
        return
    end = tl.minimum(start + ROWS_PER_SPLIT, rows)

    n_tiles = tl.cdiv(N_SIZE, BLOCK_N)
    co = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    co_mask = co < C_OUT
    col = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col < N_SIZE
    tap = col // C_IN
    ci = col % C_IN
    kd = tap // (KH * KW)
    kh = (tap // KW) % KH
    kw = tap % KW

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        r_mask = r < end
        b = tl.load(order_ptr + first + r // voxels, mask=r_mask, other=0)
        v = r % voxels
        od = v // (OH * OW)
        oh = (v // OW) % OH
        ow = v % OW
        dy_offs = co[:, None] * sg_c + (b * sg_b + od * sg_d + oh * sg_h + ow * sg_w)[None, :]
        a = tl.load(dy_ptr + dy_offs, mask=co_mask[:, None] & r_mask[None, :], other=0.0)
        i_d = od[:, None] * SD - PD + kd[None, :]
        i_h = oh[:, None] * SH - PH + kh[None, :]
        i_w = ow[:, None] * SW - PW + kw[None, :]
        x_mask = (r_mask[:, None] & col_mask[None, :] & (i_d >= 0) & (i_d < D)
                  & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W))
        x_offs = b[:, None] * sx_b + ci[None, :] * sx_c + i_d * sx_d + i_h * sx_h + i_w * sx_w
        x_tile = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0)
        acc = _dot(a, x_tile.to(a.dtype), acc, DOT_PRECISION, UPCAST_BF16)

    gw_offs = g * (C_OUT * C_IN * TAPS) + co[:, None] * (C_IN * TAPS) + (ci * TAPS + tap)[None, :]
    tl.atomic_add(gw_ptr + gw_offs, acc, mask=co_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------- launchers
def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last_3d for channels-last inputs (outputs follow, as cuDNN does), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _dot_options(x: Tensor) -> dict:
    """The kernels' DOT_PRECISION and UPCAST_BF16 for operands of x's dtype and device."""
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32
    upcast = x.dtype == torch.bfloat16 and interpreter_enabled()
    return dict(DOT_PRECISION="tf32" if tf32 else "ieee", UPCAST_BF16=upcast)


def _output_spatial(spatial, kernel_size, stride, padding) -> tuple[int, int, int]:
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(spatial, kernel_size, stride, padding))


def _geometry(kernel_size, stride, padding) -> dict:
    (kd, kh, kw), (sd, sh, sw), (pd, ph, pw) = kernel_size, stride, padding
    return dict(KD=kd, KH=kh, KW=kw, SD=sd, SH=sh, SW=sw, PD=pd, PH=ph, PW=pw)


def loc_cond_conv3d_forward(
    x: Tensor,
    weight: Tensor,
    routing: Tensor,
    bias: Tensor | None,
    partition: LandmarkPartition,
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    out: Tensor | None = None,
) -> Tensor:
    """Launch the fused forward kernel; returns ``out`` (allocated when None).

    ``out`` may be any (B, C_out, D', H', W') tensor of x's dtype and device, any strides; the
    kernel writes every element of it (tests pass a NaN-filled buffer to check exactly that).
    """
    batch, c_in, *spatial = x.shape
    _, c_out, _, *kernel_size = weight.shape
    out_spatial = _output_spatial(spatial, kernel_size, stride, padding)
    if out is None:
        out = torch.empty((batch, c_out, *out_spatial), dtype=x.dtype, device=x.device,
                          memory_format=_memory_format(x))
    weight = weight.contiguous()
    routing = routing.contiguous()
    rows = max(partition.counts) * out_spatial[0] * out_spatial[1] * out_spatial[2]
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), partition.num_landmarks,
                         triton.cdiv(c_out, meta["BLOCK_N"]))
    _forward_kernel[grid](
        x, weight, routing, bias if bias is not None else weight, out, partition.order, partition.offsets,
        c_in, c_out, weight.shape[0],
        *spatial, *out_spatial,
        *x.stride(), *out.stride(),
        triton.next_power_of_2(rows), c_out, c_in * kernel_size[0] * kernel_size[1] * kernel_size[2],
        **_geometry(kernel_size, stride, padding),
        HAS_BIAS=bias is not None, **_dot_options(x),
    )
    return out


def loc_cond_conv3d_grad_input(
    grad_out: Tensor,
    weight: Tensor,
    routing: Tensor,
    partition: LandmarkPartition,
    input_shape: tuple[int, ...],
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    out: Tensor | None = None,
) -> Tensor:
    """Gradient of the input; ``out`` (any strides) is fully written, allocated when None."""
    batch, c_in, *spatial = input_shape
    _, c_out, _, *kernel_size = weight.shape
    if out is None:
        out = torch.empty(input_shape, dtype=grad_out.dtype, device=grad_out.device,
                          memory_format=_memory_format(grad_out))
    weight = weight.contiguous()
    routing = routing.contiguous()
    rows = max(partition.counts) * spatial[0] * spatial[1] * spatial[2]
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), partition.num_landmarks,
                         triton.cdiv(c_in, meta["BLOCK_N"]))
    _grad_input_kernel[grid](
        grad_out, weight, routing, out, partition.order, partition.offsets,
        c_in, c_out, weight.shape[0],
        *spatial, *grad_out.shape[2:],
        *grad_out.stride(), *out.stride(),
        triton.next_power_of_2(rows), c_in, c_out * kernel_size[0] * kernel_size[1] * kernel_size[2],
        **_geometry(kernel_size, stride, padding),
        **_dot_options(grad_out),
    )
    return out


def loc_cond_conv3d_grad_mixed_kernel(
    grad_out: Tensor,
    x: Tensor,
    partition: LandmarkPartition,
    kernel_size: tuple[int, int, int],
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    rows_per_split: int = DEFAULT_ROWS_PER_SPLIT,
) -> Tensor:
    """Gradient of each landmark's mixed kernel: (G, C_out, C_in, kD, kH, kW), float32."""
    batch, c_in, *spatial = x.shape
    c_out = grad_out.shape[1]
    out_spatial = grad_out.shape[2:]
    taps = kernel_size[0] * kernel_size[1] * kernel_size[2]
    grad_mixed = torch.zeros((partition.num_landmarks, c_out, c_in, *kernel_size), dtype=torch.float32,
                             device=x.device)
    rows = max(partition.counts) * out_spatial[0] * out_spatial[1] * out_spatial[2]
    grid = lambda meta: (triton.cdiv(c_out, meta["BLOCK_M"]) * triton.cdiv(taps * c_in, meta["BLOCK_N"]),
                         partition.num_landmarks, triton.cdiv(rows, rows_per_split))
    _grad_mixed_kernel_kernel[grid](
        grad_out, x, grad_mixed, partition.order, partition.offsets,
        c_in, c_out,
        *spatial, *out_spatial,
        *grad_out.stride(), *x.stride(),
        rows_per_split,
        c_out, taps * c_in, triton.next_power_of_2(min(rows, rows_per_split)),
        **_geometry(kernel_size, stride, padding),
        **_dot_options(x),
    )
    return grad_mixed


# ----------------------------------------------------------------------------- autograd
class LocCondConv3dFunction(torch.autograd.Function):
    """Fused Loc-CondConv: forward and backward kernels, float32 accumulation.

    Gradients: dx from the grad-input kernel; gW (per landmark) from the reduction kernel, then
    d experts = r^T gW and d routing = gW W^T (small matmuls), d bias = sum of dy.
    """

    @staticmethod
    def forward(ctx, x, weight, routing, bias, partition, stride, padding):
        ctx.save_for_backward(x, weight, routing)
        ctx.partition, ctx.stride, ctx.padding = partition, stride, padding
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loc_cond_conv3d_forward(x, weight, routing, bias, partition, stride, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, routing = ctx.saved_tensors
        need_x, need_weight, need_routing, need_bias = ctx.needs_input_grad[:4]
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_weight = grad_routing = grad_bias = None
        if need_x:
            grad_x = loc_cond_conv3d_grad_input(
                grad_out, weight, routing, ctx.partition, tuple(x.shape), ctx.stride, ctx.padding)
        if need_weight or need_routing:
            grad_mixed = loc_cond_conv3d_grad_mixed_kernel(
                grad_out, x, ctx.partition, tuple(weight.shape[3:]), ctx.stride, ctx.padding)
            grad_mixed = grad_mixed.flatten(1)  # (G, C_out * C_in * k^3)
            with torch.autocast(x.device.type, enabled=False):  # keep these contractions in fp32
                if need_weight:
                    grad_weight = (routing.float().T @ grad_mixed).view(weight.shape).to(weight.dtype)
                if need_routing:
                    grad_routing = (grad_mixed @ weight.float().flatten(1).T).to(routing.dtype)
        if need_bias:
            grad_bias = grad_out.float().sum((0, 2, 3, 4)).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_routing, grad_bias, None, None, None


def loc_cond_conv3d_triton(
    x: Tensor,
    weight: Tensor,
    routing: Tensor,
    bias: Tensor | None,
    partition: LandmarkPartition,
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    dilation: IntOrTriple = 1,
) -> Tensor:
    """Loc-CondConv with the fused Triton kernels (Yu et al. 2023, eqs. 3-4).

    Sample b is convolved with ``sum_e routing[partition.index[b], e] * weight[e]``, plus ``bias``.

    Args:
        x: (B, C_in, D, H, W), float32/bfloat16/float16, contiguous or channels-last-3d.
        weight: (E, C_out, C_in, k, k, k) experts, k in {1, 3}.
        routing: (G, E) per-landmark routing weights (already through the sigmoid).
        bias: (C_out,) or None.
        partition: the batch's ``LandmarkPartition`` (G groups over B samples).
        stride, padding, dilation: int or 3 ints; strides 1/2, paddings 0/1, dilation 1.

    Returns:
        (B, C_out, D', H', W') in the original sample order, in x's dtype (the autocast dtype
        under ``torch.autocast``) and memory format.

    Raises:
        ValueError: for shapes that do not fit together or a call ``triton_unsupported_reason``
            rejects (callers ask it first and fall back).
    """
    reason = triton_unsupported_reason(x, weight, stride, padding, dilation, 1)
    if reason is not None:
        raise ValueError(f"loc_cond_conv3d_triton: unsupported call: {reason}")
    stride3, padding3 = as_triple(stride, "stride"), as_triple(padding, "padding")
    batch, c_in, *spatial = x.shape
    num_experts, c_out, w_c_in, *kernel_size = weight.shape
    if w_c_in != c_in:
        raise ValueError(f"weight: experts expect {w_c_in} input channels, x has {c_in}")
    if tuple(routing.shape) != (partition.num_landmarks, num_experts):
        raise ValueError(f"routing: expected shape ({partition.num_landmarks}, {num_experts}) "
                         f"(landmarks, experts), got {tuple(routing.shape)}")
    if partition.batch_size != batch:
        raise ValueError(f"partition: grouping is for {partition.batch_size} samples, x has {batch}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias: expected shape ({c_out},), got {tuple(bias.shape)}")
    if any(n <= 0 for n in _output_spatial(spatial, kernel_size, stride3, padding3)):
        raise ValueError(f"x: spatial size {tuple(spatial)} is smaller than kernel {tuple(kernel_size)}")
    tensors = [t for t in (weight, routing, bias, partition.order, partition.offsets) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all tensors must be on x's device {x.device}")

    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    # The Function manages precision itself (fp32 accumulation); autocast must not recast
    # the small PyTorch contractions inside it.
    with torch.autocast(device_type, enabled=False):
        return LocCondConv3dFunction.apply(x, weight, routing, bias, partition, stride3, padding3)
