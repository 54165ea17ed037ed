"""What this process's CPU runs well, decided once: native bf16, and oneDNN's fused Linear.

x86-64 CPUs differ. oneDNN has bf16 kernels only for AVX-512 (or AVX-NE-CONVERT / AMX) parts;
on an AVX2-only CPU its fused linear op raises in bf16, and ATen runs bf16 through reference
code about ten times slower than fp32. So every fast path here is a capability check plus a
tiny trial call, cached per dtype: a model falls back to the plain modules on a CPU the fast
path was never tried on, instead of failing there.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry, register_flop_formula

_fused_linear_enabled = True


def cpu_name() -> str:
    """The CPU's model name, for messages ("AMD EPYC 7B13"); the architecture elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """The name and the vector ISA PyTorch picked for it: "AMD EPYC (AVX2)"."""
    return f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})"


@functools.cache
def has_native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU, so bf16 is worth running on it."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def bf16_unsupported_reason() -> str | None:
    """Why bf16 should not run on this CPU, naming what it lacks; None where it should."""
    if has_native_bf16():
        return None
    return (
        f"this CPU, {cpu_description()}, has no native bf16: oneDNN's bf16 kernels need "
        "AVX-512 (avx512bw/vl/dq), AVX-NE-CONVERT or AMX, and without them bf16 runs about "
        "ten times slower than fp32"
    )


def _has_fused_linear_op() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _fused_linear_works(dtype: torch.dtype) -> bool:
    if dtype not in (torch.float32, torch.bfloat16) or not _has_fused_linear_op():
        return False
    if dtype is torch.bfloat16 and not has_native_bf16():
        return False
    return _trial(dtype)


def _trial(dtype: torch.dtype) -> bool:
    """One tiny fused call against the plain modules; False if oneDNN refuses it."""
    g = torch.Generator(device="cpu").manual_seed(0)
    # weights of init scale: outputs of order one, so bf16's rounding (~0.01) stays well inside
    # the tolerance, which is there to catch wrong results, not rounding
    x = torch.randn(4, 16, generator=g, device="cpu")
    w = torch.randn(32, 16, generator=g, device="cpu") / 4
    b = torch.randn(32, generator=g, device="cpu") / 4
    try:
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            got = fused_linear(x.to(dtype), w.to(dtype), b.to(dtype), gelu=True)
            want = F.gelu(F.linear(x, w, b))
    except (RuntimeError, TypeError):  # no kernel for this CPU and dtype, or another signature
        return False
    tolerance = 1e-4 if dtype is torch.float32 else 5e-2
    return bool(torch.allclose(got.float(), want, rtol=tolerance, atol=tolerance))


def fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool
) -> torch.Tensor:
    """`F.linear` (then GELU) in one oneDNN kernel: the one place that calls the private op.
    Callers check `fused_linear_works(dtype)` first."""
    attr, algorithm = ("gelu", "none") if gelu else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


def fused_linear_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's Linear + GELU kernel (`mkldnn._linear_pointwise`, the one Inductor
    uses on CPU) runs here in `dtype` and agrees with the plain modules; checked once per
    dtype, and False while `set_fused_linear(False)`."""
    return _fused_linear_enabled and _fused_linear_works(dtype)


def set_fused_linear(enabled: bool) -> None:
    """Turn the fused kernel off (or back on) for this process: for benchmarks and debugging."""
    global _fused_linear_enabled
    _fused_linear_enabled = enabled


def fast_path_summary() -> str:
    """One line for logs and benchmarks: which CPU paths this process takes, and why."""
    paths = {
        "fp32": fused_linear_works(torch.float32),
        "bf16": fused_linear_works(torch.bfloat16),
    }
    taken = ", ".join(f"{k} {'fused oneDNN' if v else 'plain'}" for k, v in paths.items())
    bf16 = "native bf16" if has_native_bf16() else "no native bf16"
    return f"CPU {cpu_description()}, {bf16}; block MLP: {taken}"


if _has_fused_linear_op() and torch.ops.mkldnn._linear_pointwise not in flop_registry:

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_pointwise_flop(x_shape, w_shape, *args, **kwargs) -> int:
        """As `aten.addmm`: 2 x rows x in x out, so FlopCounterMode sees the fused MLP."""
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * w_shape[0] * w_shape[1]
