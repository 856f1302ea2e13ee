"""FP8 attention on cuDNN's fused SDPA (cudnn-frontend ``sdpa_fp8``, Hopper): ``attention=fp8_cudnn``.

Why beside the Triton kernels of :mod:`wanexp.kernels.attention`: those run at 0.83-0.85x cuDNN's
BF16 SDPA on the A14B shapes (the H200 bench), while cuDNN's FP8 forward is a warp-specialised,
TMA-fed kernel of FA3's class. cuDNN scales each FP8 operand by one fp32 number (a scalar per
tensor), so the recipe here is per tensor, with SageAttention's key smoothing:

    K'  = K - mean_tokens(K)                   (fp32, per head and channel; softmax is unchanged:
                                                it subtracts q·mean from every score of a row)
    s_X = 2^floor(log2(448 / max|X|))          X in Q, K', V, one fp32 scalar a tensor (a power
                                                of two: descaling is exact)
    X8  = E4M3(X · s_X)                        (round to nearest even, saturating)
    S   = (Q8 K8ᵀ) / (s_Q s_K) · scale         (fp32)
    P8  = E4M3(P̃ · 256),  P̃ = exp(S − running max) the online softmax's unnormalised P
    O   = (P8 V8) / (256 s_V) / rowsum(P̃)
    O8  = E4M3(O · s_V)                        (Hopper's cuDNN writes O in FP8; |O| <= max|V|, so
                                                V's scale cannot overflow it)
    out = bf16(O8 / s_V)

The plain-torch reference that defines these numerics is ``wanexp.quant.attention.cudnn_fp8_reference``
(one softmax over the whole row: cuDNN's online softmax rounds P̃ against the running maximum of its
key tiles, so the two agree to FP8 rounding, not bit for bit; the tests state the bound). The
quantizer here, :func:`quantize_qkv`, is this module's own (kernels sit below quant and do not
import it); a test checks its operands bit for bit against the reference's.

:func:`cudnn_fp8_attention` is the call: the quantization in plain torch (in a compiled block
inductor fuses its passes over Q, K, V and O), cuDNN's SDPA as one custom op
(``wanexp::cudnn_fp8_sdpa``) that a compiled block keeps whole. Needs the ``nvidia-cudnn-frontend`` package and a GPU of compute
capability 9.0 (Hopper): :func:`available` says whether this process has both; :func:`supports`
says whether cuDNN takes the shapes.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
P_SCALE = 256.0          # P̃ in [0, 1] to E4M3: a power of two, so the descale is exact
_GRAPHS: dict[tuple, tuple] = {}
_HANDLES: dict[int, object] = {}


# cudnn-frontend's FP8 forward checks (1.32, cudnn/_sdpa_validate.py and sdpa_support_surface.h): the
# head dim a multiple of 16, at most 256 on Hopper; 128 is what was run on the H200 (Wan's D), and
# the bound cuDNN keeps on Blackwell, so this module claims no more.
HEAD_DIM_MULTIPLE = 16
HEAD_DIM_MAX = 128
_AVAILABLE: dict[int, bool] = {}


@torch.compiler.assume_constant_result
def _probe(index: int) -> bool:
    """cudnn-frontend imports and device ``index`` is a Hopper GPU (run once a device; a compiled
    caller takes the answer as a constant instead of tracing the import)."""
    if index not in _AVAILABLE:
        ok = torch.cuda.get_device_capability(index)[0] == 9
        if ok:
            try:
                torch.backends.cudnn.version()   # loads torch's libcudnn first, which cudnn-frontend then finds
                import cudnn  # noqa: F401
            except Exception:  # noqa: BLE001  (missing or broken: the reference serves)
                ok = False
        _AVAILABLE[index] = ok
    return _AVAILABLE[index]


def available(device: torch.device | None = None) -> bool:
    """cudnn-frontend imports and the device is a Hopper GPU (where sdpa_fp8 writes FP8 O)."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        return False
    return _probe(device.index if device.index is not None else torch.cuda.current_device())


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Inputs cuDNN's FP8 forward takes here: CUDA, bf16 ``[B, H, S, D]`` with the same B, H and D
    for Q, K and V (Sq and Sk may differ), K and V of one length, D a multiple of
    :data:`HEAD_DIM_MULTIPLE` up to :data:`HEAD_DIM_MAX`, unit stride on D."""
    return (all(t.dim() == 4 and t.is_cuda and t.dtype == torch.bfloat16 and t.stride(-1) == 1 for t in (q, k, v))
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
            and q.shape[3] == k.shape[3] == v.shape[3]
            and q.shape[3] % HEAD_DIM_MULTIPLE == 0 and 0 < q.shape[3] <= HEAD_DIM_MAX
            and q.shape[2] > 0 and k.shape[2] > 0)


def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """s = 2^floor(log2(448 / max|x|)), the largest power of two with max|x| · s <= 448 (fp32
    scalar tensor on x's device; 1 for an all-zero x). From the exponent of max|x| (frexp), so no
    rounding of a division or a log2 can move it across a power of two."""
    amax = x.abs().amax().float()
    mantissa, exponent = torch.frexp(amax)             # amax = m · 2^E, m in [0.5, 1)
    e = 9 - exponent - (mantissa > E4M3_MAX / 512).to(exponent.dtype)   # 448 = 0.875 · 2^9
    return torch.where(amax > 0, torch.exp2(e.clamp(-126, 126).float()), torch.ones_like(amax))


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3(x · s), round to nearest even, saturating at ±448 (the product is exact: s is 2^n)."""
    return (x.float() * scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_qkv(q, k, v):
    """(q8, k8, v8, s_q, s_k, s_v): K minus its fp32 mean over the tokens (in fp32), each per tensor."""
    k = k.float() - k.mean(dim=-2, keepdim=True, dtype=torch.float32)
    s_q, s_k, s_v = tensor_scale(q), tensor_scale(k), tensor_scale(v)
    return to_e4m3(q, s_q), to_e4m3(k, s_k), to_e4m3(v, s_v), s_q, s_k, s_v


def _handle(device: torch.device):
    import cudnn
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with torch.cuda.device(index):
            _HANDLES[index] = cudnn.create_handle()
    handle = _HANDLES[index]
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(index).cuda_stream)
    return handle


def _graph(q8, k8, v8, o8, scale: float, handle):
    """The built cuDNN graph for these shapes and strides (cached), its tensors and workspace."""
    key = (tuple(q8.shape), q8.stride(), tuple(k8.shape), k8.stride(), v8.stride(), o8.stride(), scale, q8.device)
    if key in _GRAPHS:
        return _GRAPHS[key]
    import cudnn
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    tq, tk, tv = (graph.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)
                  for n, t in (("q", q8), ("k", k8), ("v", v8)))
    scalars = [graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
               for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
    o, _, amax_s, amax_o = graph.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scalars[0], descale_k=scalars[1],
                                          descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                          scale_o=scalars[5], is_inference=True, attn_scale=scale,
                                          use_causal_mask=False, name="wanexp_fp8_attention")
    o.set_output(True).set_dim(list(o8.shape)).set_stride(list(o8.stride())).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), device=q8.device, dtype=torch.uint8)
    _GRAPHS[key] = (graph, (tq, tk, tv, o, amax_s, amax_o), scalars, workspace)
    return _GRAPHS[key]


def _sdpa_fp8(q8, k8, v8, s_q, s_k, s_v, scale: float) -> torch.Tensor:
    """cuDNN's FP8 SDPA on quantized operands (E4M3 ``[B, H, S, D]``, any strides with unit stride on D,
    and their fp32 scalar scales) -> O8, E4M3 ``[B, H, Sq, D]`` stored as ``[B, Sq, H, D]``, scaled by s_V."""
    b, h, sq, d = q8.shape
    o8 = torch.empty(b, sq, h, d, device=q8.device, dtype=torch.float8_e4m3fn).transpose(1, 2)
    handle = _handle(q8.device)
    graph, (tq, tk, tv, to, tas, tao), scalars, workspace = _graph(q8, k8, v8, o8, scale, handle)
    one = torch.ones((), device=q8.device, dtype=torch.float32)
    values = (1.0 / s_q, 1.0 / s_k, 1.0 / s_v, one / P_SCALE, one * P_SCALE, s_v)
    amax_s = torch.empty(1, 1, 1, 1, device=q8.device, dtype=torch.float32)
    amax_o = torch.empty_like(amax_s)
    pack = {tq: q8, tk: k8, tv: v8, to: o8, tas: amax_s, tao: amax_o}
    pack.update({t: val.reshape(1, 1, 1, 1).contiguous() for t, val in zip(scalars, values)})
    graph.execute(pack, workspace, handle=handle)
    return o8


@torch.library.custom_op("wanexp::cudnn_fp8_sdpa", mutates_args=())
def _cudnn_fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, s_q: torch.Tensor, s_k: torch.Tensor,
                    s_v: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`_sdpa_fp8` as an op (``torch.compile`` keeps it whole; cuDNN's graph is no traceable code)."""
    return _sdpa_fp8(q8, k8, v8, s_q, s_k, s_v, scale)


@_cudnn_fp8_sdpa.register_fake
def _(q8, k8, v8, s_q, s_k, s_v, scale):
    b, h, sq, d = q8.shape
    return q8.new_empty(b, sq, h, d).transpose(1, 2)   # the real output's dtype and strides


def cudnn_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``attention=fp8_cudnn`` of bf16 ``[B, H, S, D]`` Q, K, V (any strides, unit stride on D) -> bf16
    ``[B, H, Sq, D]`` stored as ``[B, Sq, H, D]`` (what the output projection reads): the recipe of the
    module docstring. The quantization and the dequantization are plain torch, so in a compiled block
    inductor fuses their passes over Q, K, V and O; cuDNN's part is the op ``wanexp::cudnn_fp8_sdpa``.
    The caller checks :func:`available` and :func:`supports`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q8, k8, v8, s_q, s_k, s_v = quantize_qkv(q, k, v)
    o8 = torch.ops.wanexp.cudnn_fp8_sdpa(q8, k8, v8, s_q, s_k, s_v, scale)
    return (o8.float() / s_v).to(q.dtype)


__all__ = ["E4M3_MAX", "HEAD_DIM_MAX", "HEAD_DIM_MULTIPLE", "P_SCALE", "available", "cudnn_fp8_attention",
           "quantize_qkv", "supports", "tensor_scale", "to_e4m3"]
