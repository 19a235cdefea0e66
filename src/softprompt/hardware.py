"""What machine a number was measured on: CPU model, ISA level, torch's kernel level, and the matmul
peak measured in fp32 and bf16 in the same run. Every benchmark records it beside its results, since
the same code is 100x apart in bf16 between an AVX2-only CPU and one with AMX (see docs/speed.md)."""
from __future__ import annotations

import os
import platform
import time

import torch

from softprompt.precision import cpu_model, isa_level, native_bf16, probe


def matmul_flops_per_s(dtype: torch.dtype, size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Measured throughput of ``torch.matmul`` on two ``size x size`` matrices of ``dtype``: the best
    of ``repeats`` timed runs after a warm-up (the best, because other load only slows a run down)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=device).to(dtype)
    b = torch.randn(size, size, generator=g, device=device).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def hardware_report(device: str = "cpu", measure: bool = True) -> dict:
    """The machine's description and, when ``measure``, its fp32 and bf16 matmul peaks (GFLOP/s)."""
    cap = probe(device)
    native, why = native_bf16(cap)
    out = {"cpu_model": cpu_model(), "isa": isa_level(probe("cpu")),
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": cap.device,
           "native_bf16": native, "native_bf16_reason": why, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine()}
    if cap.device == "cuda":
        out["gpu"] = cap.name
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        if os.environ.get(var):
            out[var] = os.environ[var]
    if measure:
        size = 2048 if cap.device == "cuda" or native else 1024  # emulated bf16 at 2048 takes tens of seconds
        out["matmul_gflops"] = {name: round(matmul_flops_per_s(dt, size=size, device=device) / 1e9, 1)
                                for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        out["matmul_size"] = size
    return out


def hardware_line(hw: dict) -> str:
    """One Markdown line for a results file."""
    peaks = hw.get("matmul_gflops")
    peak = f"; matmul peak fp32 {peaks['fp32']} / bf16 {peaks['bf16']} GFLOP/s ({hw['matmul_size']}^2)" if peaks else ""
    env = "".join(f"; {k}={hw[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in hw)
    return (f"Hardware: {hw['cpu_model']} [{hw['isa']}], torch kernels {hw['torch_cpu_capability']}, "
            f"{hw['torch_threads']} threads of {hw['cpu_count']} cores, native bf16: {'yes' if hw['native_bf16'] else 'no'}"
            f"{peak}{env}; torch {hw['torch']}.")
