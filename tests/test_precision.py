"""Precision follows the hardware: the choice logic on both answers of the probe (probe injected), the
warning for bf16 without native support, and ``auto`` training the same prompt as the setting it
resolves to."""
from __future__ import annotations

import logging

import pytest
import torch

from softprompt import precision as P
from softprompt.errors import SoftPromptError
from softprompt.precision import Capability, native_bf16, resolve_precision

SPR = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
EPYC_AVX2 = frozenset({"avx", "avx2", "fma", "f16c"})


def cpu(flags, capability="AVX512", isa="", name="test cpu"):
    return lambda device: Capability("cpu", capability, flags, isa, name=name)


@pytest.mark.parametrize("prober,native", [
    (cpu(SPR), True),                                        # Sapphire Rapids: AMX
    (cpu(frozenset({"avx512f", "avx512_bf16"})), True),      # Zen 4: AVX-512-BF16
    (cpu(EPYC_AVX2, "AVX2"), False),                         # AVX2-only EPYC
    (cpu(frozenset({"avx512f", "avx512bw"})), False),        # AVX-512 without BF16 (Skylake-X)
    (cpu(SPR, "AVX2"), False),                               # ATEN_CPU_CAPABILITY=avx2 on an AMX CPU
    (cpu(SPR, "AVX512", "AVX2"), False),                     # ONEDNN_MAX_CPU_ISA=AVX2
    (cpu(SPR, "AVX512", "AVX512_CORE_AMX"), True),
    (lambda d: Capability("cuda", cuda_bf16=True, name="H100"), True),
    (lambda d: Capability("cuda", cuda_bf16=False, name="T4"), False),
    (lambda d: Capability("mps", name="mps"), False),
])
def test_auto_is_bf16_only_where_native(prober, native):
    p = resolve_precision("auto", "cpu", prober=prober, announce=False)
    assert p.dtype == ("bf16" if native else "fp32") and p.native_bf16 is native and p.setting == "auto"
    assert p.reason and p.torch_dtype == (torch.bfloat16 if native else torch.float32)


def test_explicit_settings_are_kept_and_bf16_without_native_warns(caplog):
    with caplog.at_level(logging.INFO, logger="softprompt.precision"):
        p = resolve_precision("bf16", "cpu", prober=cpu(EPYC_AVX2, "AVX2"))
    assert p.bf16 and not p.native_bf16
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "slower than fp32" in warnings[0].getMessage()
    assert "AVX2" in warnings[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["precision bf16 (bf16): asked for, but " + native_bf16(cpu(EPYC_AVX2, "AVX2")("cpu"))[1]]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="softprompt.precision"):
        assert resolve_precision("bf16", "cpu", prober=cpu(SPR)).bf16
        assert not resolve_precision("fp32", "cpu", prober=cpu(SPR)).bf16
        assert resolve_precision(True, "cpu", prober=cpu(SPR)).setting == "bf16"
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    with pytest.raises(SoftPromptError, match="precision 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_the_real_probe_matches_the_cpu_flags():
    cap = P.probe("cpu")
    assert cap.device == "cpu" and cap.cpu_capability == torch.backends.cpu.get_cpu_capability()
    native, _ = native_bf16(cap)
    if not any(f in cap.cpu_flags for f in P.BF16_CPU_FLAGS):
        assert not native
    assert P.isa_level(cap) in ("AMX", "AVX-512-BF16", "AVX-512", "AVX2") or P.isa_level(cap) == cap.cpu_capability


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "avx2-only"])
def test_auto_trains_the_same_prompt_as_its_resolution(tiny, tmp_path, monkeypatch, native):
    from safetensors.torch import load_file

    from softprompt.artifact import read_meta
    from softprompt.data.readers import read_examples
    from softprompt.train import TrainConfig, train

    monkeypatch.setattr(P, "probe", cpu(SPR) if native else cpu(EPYC_AVX2, "AVX2"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"input": "text {i}", "target": " {"ab"[i % 2]}"}}\n' for i in range(8)))
    exs = read_examples(data)
    runs = {}
    for setting in ("auto", "bf16" if native else "fp32"):
        cfg = TrainConfig(model=str(tiny.name), tokens=4, steps=3, batch_size=4, seed=0, precision=setting, device="cpu")
        res = train(cfg, exs, None, tmp_path / setting, base=tiny, progress=False)
        runs[setting] = (load_file(str(res.out / "prompt.safetensors")), read_meta(res.out)["precision"])
    (auto_t, auto_m), (expl_t, expl_m) = runs.values()
    assert auto_m["dtype"] == expl_m["dtype"] == ("bf16" if native else "fp32")
    assert auto_m["setting"] == "auto" and auto_t.keys() == expl_t.keys()
    for k in auto_t:
        assert torch.equal(auto_t[k], expl_t[k]), k
    # and the resolution is what ran: the other precision trains a different prompt
    other_setting = "fp32" if native else "bf16"
    res = train(TrainConfig(model=str(tiny.name), tokens=4, steps=3, batch_size=4, seed=0, precision=other_setting,
                            device="cpu"), exs, None, tmp_path / other_setting, base=tiny, progress=False)
    other = load_file(str(res.out / "prompt.safetensors"))
    assert any(not torch.equal(auto_t[k], other[k]) for k in auto_t)
