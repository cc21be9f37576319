"""Multi-tensor fused EMA / BEMA update: one launch for every tensor of a group.

Each profile k of the fp32 shadows updates in the lerp form ``ema <- ema + w_k * (theta - ema)``
with one weight per profile (EMA: ``w = 1 - d``, BEMA: ``w = beta``) computed in float64 on the
host and passed as an fp32 scalar: a constant theta keeps the shadow bit-equal to it, which
``d * ema + (1 - d) * theta`` (two separately rounded weights) does not.

The launcher keeps, on the device, a table of the tensors' data pointers and a block map
(block -> tensor, element offset), built once by :class:`AveragerPlan` and rebuilt by the caller
only when a parameter's storage moved. A launch therefore has no cap on the tensor count and its
blocks are the same size whatever the tensor sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch

BLOCK = 2048  # elements per program

_TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


MAX_PROFILES = 8  # EMA profiles one launch updates (their weights are scalar arguments)


@triton.jit
def _pick(k: tl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7):
    """The k-th of eight scalars, k known at compile time."""
    if k == 0:
        x = x0
    elif k == 1:
        x = x1
    elif k == 2:
        x = x2
    elif k == 3:
        x = x3
    elif k == 4:
        x = x4
    elif k == 5:
        x = x5
    elif k == 6:
        x = x6
    else:
        x = x7
    return x


@triton.jit
def _average_block(
    theta,  # [BLOCK] fp32 theta of this block
    ema_at,  # [BLOCK] pointers into profile 0 of the fp32 shadows; profile k is k * stride on
    stride,  # elements between two profiles' shadows (P)
    theta0_at,  # [BLOCK] pointers into theta_0 (BEMA only)
    out_at,  # [BLOCK] pointers into the BEMA output (BEMA only)
    teacher_at,  # [BLOCK] pointers into the teacher tensor (HAS_TEACHER only)
    mask,  # [BLOCK] elements to update, or None for all of them
    w0,
    w1,
    w2,
    w3,
    w4,
    w5,
    w6,
    w7,  # per profile, weight w of theta: ema + w * (theta - ema)
    alpha,
    TEACHER_DTYPE: tl.constexpr,
    IS_BEMA: tl.constexpr,
    RESET: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    TEACHER_EMA: tl.constexpr,
    PROFILES: tl.constexpr,
    TEACHER_PROFILE: tl.constexpr,
):
    """The update of one block for every profile, theta read once; ``mask`` None gives
    unmasked (vectorizable) accesses."""
    ema0 = theta
    avg = theta
    for k in tl.static_range(PROFILES):
        at = ema_at + k * stride
        if RESET:
            ema = theta
        else:
            if mask is None:
                ema = tl.load(at)
            else:
                ema = tl.load(at, mask=mask, other=0.0)
            w = _pick(k, w0, w1, w2, w3, w4, w5, w6, w7)
            ema = ema + w * (theta - ema)
        tl.store(at, ema, mask=mask)
        if k == 0:
            ema0 = ema
        if k == TEACHER_PROFILE:
            avg = ema
    if IS_BEMA:  # one profile
        if RESET:
            tl.store(theta0_at, theta, mask=mask)
            tl.store(out_at, theta, mask=mask)
        else:
            if mask is None:
                theta0 = tl.load(theta0_at)
            else:
                theta0 = tl.load(theta0_at, mask=mask, other=0.0)
            bema = ema0 + alpha * (theta - theta0)
            tl.store(out_at, bema, mask=mask)
            if not TEACHER_EMA:
                avg = bema
    if HAS_TEACHER:
        tl.store(teacher_at, avg.to(TEACHER_DTYPE), mask=mask)


@triton.jit
def _averager_kernel(
    param_ptrs,  # [T] int64 addresses of the live tensors theta (PARAM_DTYPE)
    teacher_ptrs,  # [T] int64 addresses of the teacher tensors (TEACHER_DTYPE), if HAS_TEACHER
    tensor_start,  # [T] int64 offset of each tensor in the flat fp32 buffers
    tensor_numel,  # [T] int64 element count of each tensor
    block_tensor,  # [B] int32 tensor index of each program
    block_offset,  # [B] int64 first element of each program inside its tensor
    ema_ptr,  # [K, P] fp32 shadows (EMAs of theta), one row per profile
    theta0_ptr,  # [P] fp32 theta_0 (BEMA only)
    out_ptr,  # [P] fp32 BEMA output (BEMA only)
    flag_ptr,  # [1] int32 set to 1 when a theta element is not finite
    stride,  # P, elements of one profile
    w0,
    w1,
    w2,
    w3,
    w4,
    w5,
    w6,
    w7,  # fp32 per profile: weight w of theta, ema + w * (theta - ema) (K used)
    alpha,  # fp32 BEMA bias-correction weight
    PARAM_DTYPE: tl.constexpr,
    TEACHER_DTYPE: tl.constexpr,
    IS_BEMA: tl.constexpr,
    RESET: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    TEACHER_EMA: tl.constexpr,  # BEMA: the teacher receives ema instead of the BEMA output
    PROFILES: tl.constexpr,  # K EMA profiles (BEMA: 1)
    TEACHER_PROFILE: tl.constexpr,  # the profile the teacher receives
    ALIGNED: tl.constexpr,  # host-checked: 16-byte aligned tensors, starts and P % 4 == 0
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor + pid).to(tl.int64)
    first = tl.load(block_offset + pid)
    numel = tl.load(tensor_numel + t)
    flat = tl.load(tensor_start + t) + first
    theta_base = tl.load(param_ptrs + t).to(tl.pointer_type(PARAM_DTYPE))
    teacher_base = theta_base
    if HAS_TEACHER:
        teacher_base = tl.load(teacher_ptrs + t).to(tl.pointer_type(TEACHER_DTYPE))
    if ALIGNED:
        # Alignment facts Triton cannot see through the tables: 128-bit accesses on full blocks.
        theta_base = tl.multiple_of(theta_base, 16)
        teacher_base = tl.multiple_of(teacher_base, 16)
        first = tl.multiple_of(first, BLOCK)
        flat = tl.multiple_of(flat, 4)
        stride = tl.multiple_of(stride, 4)
    offs = tl.arange(0, BLOCK)
    theta_at = theta_base + first + offs
    ema_at = ema_ptr + flat + offs
    theta0_at = theta0_ptr + flat + offs
    out_at = out_ptr + flat + offs
    teacher_at = teacher_base + first + offs
    in_bounds = first + offs < numel
    full = False
    if ALIGNED:
        full = first + BLOCK <= numel
    if full:
        theta = tl.load(theta_at).to(tl.float32)
    else:
        theta = tl.load(theta_at, mask=in_bounds, other=0.0).to(tl.float32)
    finite = (theta * 0.0) == 0.0  # False for inf and NaN
    bad = tl.max((in_bounds & ~finite).to(tl.int32), axis=0)
    fast = False
    if ALIGNED:
        fast = full & (bad == 0)
    if fast:
        _average_block(
            theta, ema_at, stride, theta0_at, out_at, teacher_at, None,
            w0, w1, w2, w3, w4, w5, w6, w7, alpha,
            TEACHER_DTYPE, IS_BEMA, RESET, HAS_TEACHER, TEACHER_EMA, PROFILES, TEACHER_PROFILE,
        )  # fmt: skip
    else:
        # A tail block, or a non-finite theta: those elements keep their average; flag it.
        tl.store(flag_ptr, bad, mask=bad > 0)
        _average_block(
            theta, ema_at, stride, theta0_at, out_at, teacher_at, in_bounds & finite,
            w0, w1, w2, w3, w4, w5, w6, w7, alpha,
            TEACHER_DTYPE, IS_BEMA, RESET, HAS_TEACHER, TEACHER_EMA, PROFILES, TEACHER_PROFILE,
        )  # fmt: skip


class AveragerPlan:
    """Device-side tables for one group of tensors (same device, same dtype).

    Args:
        params: the live tensors theta, contiguous, one dtype, one device.
        teachers: tensors of the same shapes written with the averaged values, or None.
    """

    def __init__(self, params: list[torch.Tensor], teachers: list[torch.Tensor] | None = None):
        if not params:
            raise ValueError("AveragerPlan needs at least one tensor")
        device, dtype = params[0].device, params[0].dtype
        if dtype not in _TL_DTYPES:
            raise TypeError(f"unsupported parameter dtype {dtype}")
        numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        starts = torch.cumsum(numels, 0) - numels
        blocks = (numels + BLOCK - 1) // BLOCK  # blocks per tensor (0 for empty tensors)
        block_tensor = torch.repeat_interleave(torch.arange(len(params)), blocks)
        first_block = torch.cumsum(blocks, 0) - blocks
        block_offset = (
            torch.arange(block_tensor.numel()) - torch.repeat_interleave(first_block, blocks)
        ) * BLOCK
        self.device = device
        self.numel = int(numels.sum())
        self.num_blocks = block_tensor.numel()
        self.param_dtype = _TL_DTYPES[dtype]
        self.teacher_dtype = _TL_DTYPES[teachers[0].dtype] if teachers else self.param_dtype

        addresses = [t.data_ptr() for t in params + (teachers or [])]
        # 128-bit accesses need 16-byte aligned tensors and flat starts on 4 fp32 elements.
        self.aligned = all(a % 16 == 0 for a in addresses) and bool((starts % 4 == 0).all())

        def pointers(tensors):
            return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)

        self.param_ptrs = pointers(params)
        self.teacher_ptrs = pointers(teachers) if teachers else self.param_ptrs
        self.has_teacher = bool(teachers)
        self.tensor_start = starts.to(device)
        self.tensor_numel = numels.to(device)
        self.block_tensor = block_tensor.to(device, torch.int32)
        self.block_offset = block_offset.to(device)


def averager_launch(
    plan: AveragerPlan,
    ema: torch.Tensor,
    theta0: torch.Tensor | None,
    out: torch.Tensor | None,
    flag: torch.Tensor,
    weights: list[float],
    alpha: float,
    reset: bool,
    teacher_ema: bool = False,
    teacher_profile: int = 0,
) -> Launch:
    """The launch of :func:`averager_update` (what the compile check compiles).

    ``ema`` is [K, P] (or [P]) for the K profiles whose weights of theta ``weights`` lists
    (host floats, rounded to fp32 once: EMA ``1 - d``, BEMA ``beta``).
    """
    profiles = len(weights)
    if not 1 <= profiles <= MAX_PROFILES:
        raise ValueError(f"1 to {MAX_PROFILES} profiles (one weight each), got {profiles}")
    if ema.numel() != profiles * plan.numel:
        raise ValueError(f"ema holds {ema.numel()} elements, not {profiles} x {plan.numel}")
    if not 0 <= teacher_profile < profiles:
        raise ValueError(f"teacher_profile {teacher_profile} is not one of {profiles} profiles")
    is_bema = theta0 is not None
    if is_bema and profiles != 1:
        raise ValueError("BEMA has one profile")
    pad = [0.0] * (MAX_PROFILES - profiles)
    flats = (ema, theta0, out) if is_bema else (ema,)
    aligned = plan.aligned and all(x.data_ptr() % 16 == 0 for x in flats)
    return Launch(
        _averager_kernel,
        (plan.num_blocks,),
        (
            plan.param_ptrs,
            plan.teacher_ptrs,
            plan.tensor_start,
            plan.tensor_numel,
            plan.block_tensor,
            plan.block_offset,
            ema,
            theta0 if is_bema else ema,
            out if is_bema else ema,
            flag,
            plan.numel,
            *[float(w) for w in weights],
            *pad,
            alpha,
        ),
        dict(
            PARAM_DTYPE=plan.param_dtype,
            TEACHER_DTYPE=plan.teacher_dtype,
            IS_BEMA=is_bema,
            RESET=reset,
            HAS_TEACHER=plan.has_teacher,
            TEACHER_EMA=bool(teacher_ema and is_bema and plan.has_teacher),
            PROFILES=profiles,
            TEACHER_PROFILE=teacher_profile if plan.has_teacher else 0,
            ALIGNED=aligned and (profiles == 1 or plan.numel % 4 == 0),
            BLOCK=BLOCK,
        ),
        num_warps=4,
    )


def averager_update(plan: AveragerPlan, *args, **kwargs) -> None:
    """One launch: update ``ema`` (and ``out``/``theta0`` for BEMA, the teachers if planned);
    the arguments of :func:`averager_launch`.

    ``theta0`` and ``out`` are both given (BEMA) or both None (EMA). Scalars are host floats.
    ``teacher_ema``: a BEMA's teachers receive ``ema`` instead of the BEMA output.
    """
    if plan.num_blocks:
        averager_launch(plan, *args, **kwargs)()
