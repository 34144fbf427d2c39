"""Host-side code shared by the Triton ops of kdkernels: dtypes, tile sizes, launch context.

The ops check their inputs with kdkernels/ops/_checks.py, as their shared fakes do. Nothing here knows a family;
the device-side numerics live in ``_common.py``.
"""

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------------------------------
# Launch setup
# ------------------------------------------------------------------------------------------------------------------


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16 / bf16 / fp32 accumulate in fp32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride in its last dim (any row stride): the kernels address x[row, col] as base + row * stride(0)
    + col."""
    return x if (x.size(1) <= 1 or x.stride(1) == 1) else x.contiguous()


def _block_and_warps(V: int, acc_dtype: torch.dtype, widest_input_bytes: int):
    """BLOCK (tile width, a power of two) and num_warps for a row of V elements.

    Heuristic: BLOCK = min(next_pow2(V), cap) with cap = 8192 for 16-bit inputs, 4096 when an input is fp32 and 2048
    for fp64, and num_warps = clamp(BLOCK / 512, 4, 16), i.e. 4 warps up to BLOCK 2048, 8 at 4096, 16 at 8192.
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


def _inv_t_args(temperature: float, acc_dtype: torch.dtype, dummy: torch.Tensor):
    """(inv_t_ptr, inv_t_arg): fp64 needs 1/T in full precision, which a Triton scalar argument (fp32) cannot hold,
    so it gets a one-element fp64 tensor; fp32 passes the scalar (and ``dummy`` as the unused pointer)."""
    inv_t = 1.0 / temperature
    if acc_dtype == torch.float64:
        return torch.full((1,), inv_t, dtype=torch.float64, device=dummy.device), inv_t
    return dummy, inv_t


@dataclasses.dataclass
class _RowLaunch:
    """What every launch over [N, V] logits needs: the logits with unit last stride, BLOCK / num_warps for V, 1 / T
    (see _inv_t_args) and the ACC / F64 constexprs."""

    logits: tuple
    block: int
    num_warps: int
    inv_t_ptr: torch.Tensor
    inv_t_arg: float
    dtypes: dict


def _row_launch(temperature: float, *logits: torch.Tensor) -> _RowLaunch:
    acc_dtype = _acc_dtype(*logits)
    block, num_warps = _block_and_warps(logits[0].shape[1], acc_dtype, max(x.element_size() for x in logits))
    f64 = acc_dtype == torch.float64
    return _RowLaunch(tuple(_unit_last_stride(x) for x in logits), block, num_warps,
                      *_inv_t_args(temperature, acc_dtype, logits[0]),
                      {"ACC": tl.float64 if f64 else tl.float32, "F64": f64})


def _pair_gradients(student: torch.Tensor, teacher: torch.Tensor, student_grad: bool, teacher_grad: bool):
    """(grad_s, grad_t, launch): gradient buffers in the inputs' dtypes, the empty [0] tensor for one not requested,
    and whether a kernel has anything to write."""
    N, V = student.shape
    grad_s = torch.empty((N, V) if student_grad else (0,), dtype=student.dtype, device=student.device)
    grad_t = torch.empty((N, V) if teacher_grad else (0,), dtype=teacher.dtype, device=teacher.device)
    return grad_s, grad_t, N > 0 and V > 0 and (student_grad or teacher_grad)


@triton.jit
def _probe():
    pass


def _launch_guard(x: torch.Tensor):
    """Context for a launch on x's device.

    CUDA: Triton launches on the current device (and its current stream), so make it x's device. Interpreter
    (TRITON_INTERPRET=1, numpy): the kernels form inf / NaN intermediates on purpose (exp overflow of a discarded
    factor, -inf - -inf in masked lanes) and discard them with tl.where; silence numpy's floating-point warnings.
    """
    if x.is_cuda:
        return torch.cuda.device(x.device)
    if type(_probe).__name__ == "InterpretedFunction":
        import numpy

        return numpy.errstate(all="ignore")
    return contextlib.nullcontext()
