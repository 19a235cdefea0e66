"""Which float precision to compute in: ``auto | fp32 | bf16``, resolved against the hardware.

bf16 halves memory traffic and, where the hardware has bf16 matrix units, runs matmuls at about twice
the fp32 rate (AMX or AVX-512-BF16 on x86 CPUs, tensor cores on GPUs). Without them it is emulated
and slow: on an AVX2-only AMD EPYC a 2048x2048 bf16 matmul ran under 1 GFLOP/s against 86 GFLOP/s in
fp32, and a bf16 training step took 50 s against 5 s in fp32. So ``auto`` picks bf16 only where it is
native, and an explicit ``bf16`` elsewhere still runs, with one warning line.

What the probe reads is what torch will actually run: ``torch.backends.cpu.get_cpu_capability()``
(which honours ``ATEN_CPU_CAPABILITY``), the CPU flags, and ``ONEDNN_MAX_CPU_ISA`` (oneDNN runs the
bf16 matmuls on CPU). Setting ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX-512 CPU
therefore behaves, and resolves, like an AVX2-only CPU.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from softprompt.errors import SoftPromptError

log = logging.getLogger(__name__)

SETTINGS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which oneDNN has no bf16 instructions
_ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
SLOWDOWN = ("expect bf16 matmuls about 100x and training steps 10-25x slower than fp32 (measured with AVX2 "
            "kernels: 0.9 vs 86-186 GFLOP/s, 50 vs 5 and 21.7 vs 0.94 s/step; bench/results/precision.md)")


@dataclass(frozen=True)
class Capability:
    """What the hardware probe saw."""
    device: str  # cpu | cuda | mps | ...
    cpu_capability: str = ""  # torch's dispatch level: DEFAULT, AVX2, AVX512, ...
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    onednn_max_isa: str = ""  # the ONEDNN_MAX_CPU_ISA cap, if set
    cuda_bf16: bool = False
    name: str = ""  # CPU model or GPU name


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def probe(device: torch.device | str = "cpu") -> Capability:
    """Read the hardware's bf16 support for ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return Capability("cuda", cuda_bf16=bool(torch.cuda.is_bf16_supported()), name=torch.cuda.get_device_name(dev))
    if dev.type != "cpu":
        return Capability(dev.type, name=dev.type)
    return Capability("cpu", cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_flags=cpu_flags(),
                      onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper(),
                      name=cpu_model())


def isa_level(cap: Capability) -> str:
    """A short name for the CPU's vector/matrix level: AMX, AVX-512-BF16, AVX-512, AVX2 or the torch level."""
    if cap.device != "cpu":
        return cap.device
    f = cap.cpu_flags
    if "amx_bf16" in f:
        return "AMX"
    if "avx512_bf16" in f:
        return "AVX-512-BF16"
    if "avx512f" in f:
        return "AVX-512"
    if "avx2" in f:
        return "AVX2"
    return cap.cpu_capability or "unknown"


def native_bf16(cap: Capability) -> tuple[bool, str]:
    """Whether bf16 matmuls run natively on this hardware, and why (one phrase)."""
    if cap.device == "cuda":
        return (True, f"{cap.name} supports bf16") if cap.cuda_bf16 else (False, f"{cap.name} has no bf16 support")
    if cap.device != "cpu":
        return False, f"no native-bf16 check for {cap.device}"
    has = [f for f in BF16_CPU_FLAGS if f in cap.cpu_flags]
    if not has:
        return False, f"the CPU has no AMX or AVX-512-BF16 (torch runs {cap.cpu_capability or 'DEFAULT'} kernels)"
    if not cap.cpu_capability.upper().startswith(("AVX512", "AMX")):
        return False, f"torch runs {cap.cpu_capability or 'DEFAULT'} kernels (ATEN_CPU_CAPABILITY), not AVX-512"
    if cap.onednn_max_isa in _ONEDNN_NO_BF16:
        return False, f"oneDNN is capped at {cap.onednn_max_isa} (ONEDNN_MAX_CPU_ISA), below bf16"
    return True, f"the CPU has {'AMX' if 'amx_bf16' in has else 'AVX-512-BF16'}"


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the setting asked for, what it resolved to, and why."""
    setting: str
    dtype: str  # fp32 | bf16
    native_bf16: bool
    reason: str
    hardware: str = ""

    @property
    def bf16(self) -> bool:
        return self.dtype == "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def describe(self) -> str:
        return f"precision {self.dtype} ({self.setting}): {self.reason}"

    def to_meta(self) -> dict:
        return asdict(self)


def resolve_precision(setting: str | bool | None, device: torch.device | str = "cpu",
                      prober: Callable[[torch.device | str], Capability] | None = None,
                      announce: bool = True) -> Precision:
    """Resolve ``auto | fp32 | bf16`` (``True``/``False`` mean bf16/fp32) for ``device``.

    ``auto`` is bf16 where the hardware runs it natively, else fp32. An explicit bf16 without native
    support still resolves to bf16, with a warning that names the slowdown."""
    if isinstance(setting, bool):
        setting = "bf16" if setting else "fp32"
    setting = (setting or "auto").lower()
    if setting not in SETTINGS:
        raise SoftPromptError(f"precision {setting!r}: expected one of {', '.join(SETTINGS)}")
    cap = (prober or probe)(device)
    native, why = native_bf16(cap)
    hw = f"{cap.name} [{isa_level(cap)}]" if cap.name else isa_level(cap)
    if setting == "auto":
        p = Precision(setting, "bf16" if native else "fp32", native, why + (": bf16" if native else ": fp32"), hw)
    elif setting == "bf16" and not native:
        p = Precision(setting, "bf16", False, f"asked for, but {why}", hw)
        if announce:
            log.warning("bf16 asked for, but %s: %s; --precision auto picks fp32 here", why, SLOWDOWN)
    else:
        p = Precision(setting, setting, native, "asked for", hw)
    if announce:
        log.info(p.describe())
    return p


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16``, else a no-op context."""
    from contextlib import nullcontext

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
