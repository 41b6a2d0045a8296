"""Small facts about where the kernels run: interpreter or GPU, the GPU's name, its multiprocessor count."""

from __future__ import annotations

import os
import re

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read at kernel definition)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def check_device(name: str, *tensors: torch.Tensor) -> None:
    """The kernels take CUDA tensors, or CPU tensors under the interpreter; all on one device."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name}: needs CUDA tensors (got {device}); on CPU use moeserve.kernels.reference, "
            "or set TRITON_INTERPRET=1 before importing the kernels"
        )


def gpu_name(device: torch.device | None = None) -> str:
    if interpreting() or not torch.cuda.is_available():
        return "triton-interpreter"
    return torch.cuda.get_device_name(device)


def gpu_slug(device: torch.device | None = None) -> str:
    """The GPU's name as a file name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", gpu_name(device)).strip("_")


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream (no timing, no host syncs then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tokens_per_program(tokens: int, many: int) -> int:
    """For a kernel with one small row of work per token: `many` tokens a program once there are more than 8 * many
    tokens, one a program below (more programs for few tokens). One a program at 16k tokens left such kernels 4-5x
    below their bytes on an H200, as hundreds of thousands of tiny programs (session 20)."""
    return many if tokens > 8 * many else 1


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, INPUT_PRECISION) constexprs for tl.dot.

    DOT_F32: the interpreter multiplies bf16 operands as their raw uint16 bits (seen with triton 3.6), so under
    the interpreter operands are upcast to fp32 first. INPUT_PRECISION: fp32 inputs use full fp32 ("ieee")
    rather than tf32, since fp32 on GPU is a correctness path, not the fast one.
    """
    return interpreting(), ("ieee" if dtype == torch.float32 else "tf32")


def patch_interpreter_for_numpy() -> None:
    """Let the Triton 3.6 interpreter use runtime scalars as loop bounds with numpy >= 2.4.

    The interpreter holds scalars as 1-element arrays and converts them with int(array), which numpy 2.4 made an
    error ("only 0-dimensional arrays can be converted"), so `for i in range(0, n, BLOCK)` fails. Only touched
    under TRITON_INTERPRET=1; compiled kernels never see it.
    """
    if not interpreting():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_moeserve_numpy_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    patched._moeserve_numpy_compat = True
    interpreter._patch_lang_tensor = patched


patch_interpreter_for_numpy()


def upload(data, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data (list, numpy array or CPU tensor) onto `device` without waiting for the GPU. A copy from
    pageable memory makes PyTorch synchronise the stream, which would stall the host until every launched step
    is done (and async scheduling with it); from pinned memory, non_blocking, it is queued like a kernel."""
    t = data if isinstance(data, torch.Tensor) else torch.as_tensor(data, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
