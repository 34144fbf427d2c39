"""Triton backend of the ``softmax_kl`` family: per-row KL(softmax(teacher / T) || softmax(student / T)).

Two ``torch.library.custom_op``s with hand-written fake (meta) kernels; autograd is registered by
``kdkernels/ops/softmax_kl.py`` for all backends. The contract (and the numerical specification, which lives in
``kdkernels/reference/softmax_kl.py``) is the one of the C++ ops ``torch.ops.kdkernels.softmax_kl_forward`` and
``softmax_kl_backward``:

* ``triton_softmax_kl_forward(student, teacher, T) -> (loss, stats_student, stats_teacher)``: inputs [N, V] with
  unit stride in the last dim (any row stride), each fp32 / fp16 / bf16 (they may differ) or both fp64; loss is [N]
  and each stats tensor [N, 2] = (max, log_sum) per row with log p = (x - max) / T - log_sum, in the accumulation
  dtype (fp32, fp64 for fp64 inputs).
* ``triton_softmax_kl_backward(grad_loss, student, teacher, stats_student, stats_teacher, loss, T, student_grad,
  teacher_grad) -> (grad_student, grad_teacher)``: contiguous [N, V] gradients in the dtype of their input, or an
  empty tensor of shape [0] when that gradient is not requested.

Kernel design
-------------
Forward: grid ``(N,)``, one program per row. The program streams the row in ``BLOCK``-wide tiles, reading each input
exactly once, and keeps the online state ``(M_s, d_s, M_t, d_t, acc)`` of the CPU and CUDA kernels (see the
reference docstring and ``_softmax_kl_fwd_kernel``): per tile it takes the tile maxima, moves the state to the new
maxima, then accumulates the tile. Two implementation details that do not change the state's meaning:

* the maxima are tracked on the raw logits (``M_s = max s`` rather than ``max s / T``; ``T > 0`` so the arg-max is the
  same) and a shifted exponent is formed as ``(s - M_s) * k``. The subtraction of two nearby logits is exact, so the
  loss of rows with large logits (|s / T| ~ 1e5) does not inherit the rounding of ``s / T``;
* for fp32 accumulation ``k = log2(e) / T`` and the kernel works with ``exp2`` / ``log2`` (results are converted back
  to natural units by ``ln 2`` at the end); for fp64 accumulation ``k = 1 / T`` with ``exp`` / ``log``.

Backward: grid ``(N, cdiv(V, BLOCK))``, elementwise from the saved per-row statistics, so small batches still fill
the GPU. Rows with ``grad_loss == 0`` or an all ``-inf`` teacher skip their loads and write zeros.

Triton passes Python floats to kernels as fp32, so for fp64 inputs ``1 / T`` is passed as a one-element fp64 tensor.
Loads are upcast to the accumulation dtype immediately (the Triton interpreter computes bf16 arithmetic wrongly).
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

__all__ = ["softmax_kl_forward", "softmax_kl_backward"]

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _exp(x, F64: tl.constexpr):
    # fp32: exponents are in log2 units (k = log2(e) / T); fp64: natural units (k = 1 / T).
    if F64:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _log(x, F64: tl.constexpr):
    if F64:
        return tl.log(x)
    else:
        return tl.log2(x)


@triton.jit
def _softmax_kl_fwd_kernel(
    s_ptr,
    t_ptr,
    loss_ptr,
    stats_s_ptr,  # [N, 2] contiguous: (max, log_sum) per row
    stats_t_ptr,
    inv_t_ptr,  # fp64 [1] holding 1 / T (read only when F64)
    inv_t_arg,  # fp32 scalar 1 / T (used only when not F64)
    V,
    stride_s,
    stride_t,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    if F64:
        inv_t = tl.load(inv_t_ptr).to(ACC)
        k = inv_t  # exponent scale: natural units
        unit = 1.0  # natural-log units per exponent unit
    else:
        inv_t = tl.cast(inv_t_arg, ACC)
        k = inv_t * _LOG2E  # exponent scale: log2 units
        unit = _LN2

    neg_inf = float("-inf")
    offs = tl.arange(0, BLOCK)

    # Online state. M_* are maxima of the raw logits; the safe shift is m~ = (M == -inf) ? 0 : M.
    #   d_s = sum exp((s - m~_s) k),  d_t = sum exp((t - m~_t) k),
    #   acc = sum e_t * ((t - m~_t) k - (s - m~_s) k)   with e_t = exp((t - m~_t) k), a term := 0 where e_t == 0.
    m_s = tl.full([], neg_inf, ACC)
    m_t = tl.full([], neg_inf, ACC)
    d_s = tl.full([], 0.0, ACC)
    d_t = tl.full([], 0.0, ACC)
    acc = tl.full([], 0.0, ACC)

    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(ACC)
        t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(ACC)

        # 1. tile maxima -> new state maxima
        m_s_new = tl.maximum(m_s, tl.max(s, axis=0))
        m_t_new = tl.maximum(m_t, tl.max(t, axis=0))
        sh_s_old = tl.where(m_s == neg_inf, 0.0, m_s)
        sh_t_old = tl.where(m_t == neg_inf, 0.0, m_t)
        sh_s = tl.where(m_s_new == neg_inf, 0.0, m_s_new)
        sh_t = tl.where(m_t_new == neg_inf, 0.0, m_t_new)

        # 2. move the state to the new shifts. delta_* >= 0 when the old maximum was finite; a state whose old
        #    maximum was -inf is empty (stays 0) and its factors (possibly inf) are discarded by tl.where.
        delta_s = (sh_s - sh_s_old) * k
        delta_t = (sh_t - sh_t_old) * k
        c_s = _exp(-delta_s, F64)
        c_t = _exp(-delta_t, F64)
        # c_t == 0 (old teacher mass underflows) also zeroes acc: that keeps acc = +inf (a student -inf under a
        # teacher-finite entry) from becoming 0 * inf = NaN; the underflowed terms have p_t == 0 and contribute 0.
        acc = tl.where((m_t == neg_inf) | (c_t == 0.0), 0.0, c_t * (acc + (delta_s - delta_t) * d_t))
        d_t = tl.where(m_t == neg_inf, 0.0, c_t * d_t)
        d_s = tl.where(m_s == neg_inf, 0.0, c_s * d_s)

        # 3. accumulate the tile (masked lanes and -inf logits give exponent -inf -> e == 0)
        x_s = (s - sh_s) * k
        x_t = (t - sh_t) * k
        e_s = _exp(x_s, F64)
        e_t = _exp(x_t, F64)
        d_s += tl.sum(e_s, axis=0)
        d_t += tl.sum(e_t, axis=0)
        acc += tl.sum(tl.where(e_t == 0.0, 0.0, e_t * (x_t - x_s)), axis=0)

        m_s = m_s_new
        m_t = m_t_new

    # Per-row statistics (max, log_sum) with log p = (x - max) / T - log_sum; an all -inf row has (-inf, -inf).
    log_sum_s = _log(d_s, F64) * unit
    log_sum_t = _log(d_t, F64) * unit
    # loss = acc / d_t - log d_t + log d_s; +inf for a student row that is all -inf under a finite teacher (log 0);
    # 0 for an all -inf teacher row.
    loss = (acc / d_t - _log(d_t, F64) + _log(d_s, F64)) * unit
    loss = tl.where(m_s == neg_inf, float("inf"), loss)
    loss = tl.where(m_t == neg_inf, 0.0, loss)

    tl.store(loss_ptr + row, loss)
    tl.store(stats_s_ptr + 2 * row, m_s)
    tl.store(stats_s_ptr + 2 * row + 1, log_sum_s)
    tl.store(stats_t_ptr + 2 * row, m_t)
    tl.store(stats_t_ptr + 2 * row + 1, log_sum_t)


@triton.jit
def _softmax_kl_bwd_kernel(
    g_ptr,
    s_ptr,
    t_ptr,
    stats_s_ptr,
    stats_t_ptr,
    loss_ptr,
    gs_ptr,  # [N, V] contiguous (written only when STUDENT_GRAD)
    gt_ptr,  # [N, V] contiguous (written only when TEACHER_GRAD)
    inv_t_ptr,
    inv_t_arg,
    V,
    stride_g,
    stride_s,
    stride_t,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    if F64:
        inv_t = tl.load(inv_t_ptr).to(ACC)
        to_exp = 1.0  # natural units -> exponent units
    else:
        inv_t = tl.cast(inv_t_arg, ACC)
        to_exp = _LOG2E
    neg_inf = float("-inf")

    g = tl.load(g_ptr + row * stride_g).to(ACC)
    max_s = tl.load(stats_s_ptr + 2 * row).to(ACC)
    log_sum_s = tl.load(stats_s_ptr + 2 * row + 1).to(ACC)
    max_t = tl.load(stats_t_ptr + 2 * row).to(ACC)
    log_sum_t = tl.load(stats_t_ptr + 2 * row + 1).to(ACC)
    loss = tl.load(loss_ptr + row).to(ACC)
    # Rows with g == 0 or an all -inf teacher have zero gradients: skip their loads. (`block_mask & scalar_bool`
    # is avoided on purpose: the Triton 3.9 interpreter splats a scalar comparison result with the operands' dtype
    # and then fails in np.bitwise_and; comparing against a selected bound and a scalar-condition tl.where work.)
    active = (g != 0.0) & (max_t != neg_inf)
    lmask = cols < tl.where(active, V, 0)
    s = tl.load(s_ptr + row * stride_s + cols, mask=lmask, other=neg_inf).to(ACC)
    t = tl.load(t_ptr + row * stride_t + cols, mask=lmask, other=neg_inf).to(ACC)

    gi = g * inv_t
    # log p = (x - max) / T - log_sum: the subtraction of nearby logits is exact, so large |x| / T costs nothing.
    # NaN only on inactive rows, where tl.where discards it.
    log_p_t = (t - max_t) * inv_t - log_sum_t
    log_p_s = (s - max_s) * inv_t - log_sum_s
    p_t = _exp(log_p_t * to_exp, F64)
    out_offs = row * V + cols
    if STUDENT_GRAD:
        p_s = tl.where(max_s == neg_inf, 0.0, _exp(log_p_s * to_exp, F64))
        grad_s = tl.where(active, gi * (p_s - p_t), 0.0)
        tl.store(gs_ptr + out_offs, grad_s.to(gs_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        r = log_p_t - log_p_s - loss
        grad_t = tl.where(active, tl.where(p_t != 0.0, gi * p_t * r, 0.0), 0.0)
        tl.store(gt_ptr + out_offs, grad_t.to(gt_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------------------------


def _block_and_warps(V: int, acc_dtype: torch.dtype, widest_input_bytes: int):
    """BLOCK (tile width, a power of two) and num_warps for both kernels.

    Heuristic: BLOCK = min(next_pow2(V), cap) with cap = 8192 for two 16-bit inputs, 4096 when an input is fp32 and
    2048 for fp64, and num_warps = clamp(BLOCK / 512, 4, 16), i.e. 4 warps up to BLOCK 2048, 8 at 4096, 16 at 8192.
    Each thread then holds at most 16 elements per tensor and tile (upcast to the accumulation dtype), which keeps
    register pressure low (unlike Liger's JSD kernel, 4 warps for blocks up to 65536) while a tile still moves
    16 KiB per tensor (8192 x 2 B, 4096 x 4 B, 2048 x 8 B). Not tuned on a GPU yet.
    """
    if acc_dtype == torch.float64:
        cap = 2048
    elif widest_input_bytes >= 4:
        cap = 4096
    else:
        cap = 8192
    block = min(max(triton.next_power_of_2(max(V, 1)), 16), cap)
    num_warps = min(max(block // 512, 4), 16)
    return block, num_warps


def _acc_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    return torch.float64 if (student.dtype == torch.float64 or teacher.dtype == torch.float64) else torch.float32


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> None:
    if student.dim() != 2:
        raise ValueError(f"student: expected a 2-D [N, V] tensor, got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher: expected shape {tuple(student.shape)} (the student's), got {tuple(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher: expected device {student.device} (the student's), got {teacher.device}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        raise TypeError(f"student, teacher: float64 must be used for both inputs, got {student.dtype} and "
                        f"{teacher.dtype}")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels address x[row, col] as base + row * stride(0) + col.
    return x if (x.size(1) <= 1 or x.stride(1) == 1) else x.contiguous()


def _inv_t_args(temperature: float, acc_dtype: torch.dtype, dummy: torch.Tensor):
    """(inv_t_ptr, inv_t_arg): fp64 needs 1/T in full precision, which a Triton scalar argument (fp32) cannot hold."""
    inv_t = 1.0 / temperature
    if acc_dtype == torch.float64:
        return torch.full((1,), inv_t, dtype=torch.float64, device=dummy.device), inv_t
    return dummy, inv_t


# ------------------------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("kdkernels::triton_softmax_kl_forward", mutates_args=())
def softmax_kl_forward(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: per-row loss [N] and (max, log_sum) statistics [N, 2] in the accumulation dtype."""
    _check_inputs(student, teacher, temperature)
    acc_dtype = _acc_dtype(student, teacher)
    N, V = student.shape
    loss = torch.empty(N, dtype=acc_dtype, device=student.device)
    stats_s = torch.empty((N, 2), dtype=acc_dtype, device=student.device)
    stats_t = torch.empty((N, 2), dtype=acc_dtype, device=student.device)
    if N == 0:
        return loss, stats_s, stats_t
    student = _unit_last_stride(student)
    teacher = _unit_last_stride(teacher)
    block, num_warps = _block_and_warps(V, acc_dtype, max(student.element_size(), teacher.element_size()))
    inv_t_ptr, inv_t_arg = _inv_t_args(temperature, acc_dtype, student)
    with _launch_guard(student):
        _softmax_kl_fwd_kernel[(N,)](
            student, teacher, loss, stats_s, stats_t, inv_t_ptr, inv_t_arg,
            V, student.stride(0), teacher.stride(0),
            BLOCK=block,
            ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            F64=acc_dtype == torch.float64,
            num_warps=num_warps,
        )
    return loss, stats_s, stats_t


@softmax_kl_forward.register_fake
def _softmax_kl_forward_fake(student, teacher, temperature):
    _check_inputs(student, teacher, temperature)
    acc_dtype = _acc_dtype(student, teacher)
    N = student.shape[0]
    return (student.new_empty((N,), dtype=acc_dtype), student.new_empty((N, 2), dtype=acc_dtype),
            student.new_empty((N, 2), dtype=acc_dtype))


@torch.library.custom_op("kdkernels::triton_softmax_kl_backward", mutates_args=())
def softmax_kl_backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    stats_student: torch.Tensor,
    stats_teacher: torch.Tensor,
    loss: torch.Tensor,
    temperature: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: gradients of sum(grad_loss * loss) w.r.t. student and teacher ([0]-shaped if not requested)."""
    _check_inputs(student, teacher, temperature)
    _check_row_stats(student, grad_loss, stats_student, stats_teacher, loss)
    acc_dtype = _acc_dtype(student, teacher)
    N, V = student.shape
    device = student.device
    grad_s = (torch.empty((N, V), dtype=student.dtype, device=device) if student_grad
              else torch.empty(0, dtype=student.dtype, device=device))
    grad_t = (torch.empty((N, V), dtype=teacher.dtype, device=device) if teacher_grad
              else torch.empty(0, dtype=teacher.dtype, device=device))
    if N == 0 or V == 0 or not (student_grad or teacher_grad):
        return grad_s, grad_t
    student = _unit_last_stride(student)
    teacher = _unit_last_stride(teacher)
    stats_student = stats_student.contiguous()
    stats_teacher = stats_teacher.contiguous()
    loss = loss.contiguous()
    block, num_warps = _block_and_warps(V, acc_dtype, max(student.element_size(), teacher.element_size()))
    inv_t_ptr, inv_t_arg = _inv_t_args(temperature, acc_dtype, student)
    # An output that is not requested is never written (constexpr flag); pass an input as its placeholder pointer.
    with _launch_guard(student):
        _softmax_kl_bwd_kernel[(N, triton.cdiv(V, block))](
            grad_loss, student, teacher, stats_student, stats_teacher, loss,
            grad_s if student_grad else student, grad_t if teacher_grad else teacher,
            inv_t_ptr, inv_t_arg,
            V, grad_loss.stride(0), student.stride(0), teacher.stride(0),
            BLOCK=block,
            ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            F64=acc_dtype == torch.float64,
            STUDENT_GRAD=bool(student_grad),
            TEACHER_GRAD=bool(teacher_grad),
            num_warps=num_warps,
        )
    return grad_s, grad_t


@softmax_kl_backward.register_fake
def _softmax_kl_backward_fake(grad_loss, student, teacher, stats_student, stats_teacher, loss, temperature,
                              student_grad, teacher_grad):
    _check_inputs(student, teacher, temperature)
    _check_row_stats(student, grad_loss, stats_student, stats_teacher, loss)
    N, V = student.shape
    grad_s = student.new_empty((N, V)) if student_grad else student.new_empty((0,))
    grad_t = teacher.new_empty((N, V)) if teacher_grad else teacher.new_empty((0,))
    return grad_s, grad_t


def _check_row_stats(student, grad_loss, stats_student, stats_teacher, loss) -> None:
    N = student.shape[0]
    for name, x, shape in (("grad_loss", grad_loss, (N,)), ("stats_student", stats_student, (N, 2)),
                           ("stats_teacher", stats_teacher, (N, 2)), ("loss", loss, (N,))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
        if x.device != student.device:
            raise ValueError(f"{name}: expected device {student.device} (the student's), got {x.device}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def _launch_guard(x: torch.Tensor):
    """Context for a launch on x's device.

    CUDA: Triton launches on the current device (and its current stream), so make it x's device. Interpreter
    (TRITON_INTERPRET=1, numpy): the kernels form inf / NaN intermediates on purpose (exp overflow of a discarded
    factor, -inf - -inf in masked lanes) and discard them with tl.where; silence numpy's floating-point warnings.
    """
    if x.is_cuda:
        return torch.cuda.device(x.device)
    if type(_softmax_kl_fwd_kernel).__name__ == "InterpretedFunction":
        import numpy

        return numpy.errstate(all="ignore")
    return contextlib.nullcontext()
