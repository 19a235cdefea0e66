"""FLOP accounting: the analytic count equals torch's own FLOP counter on a real training step."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from softprompt.data.readers import read_examples
from softprompt.hardware import hardware_line, hardware_report, matmul_flops_per_s
from softprompt.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # FLOP accounting lives with the benchmarks
from flops import model_dims, train_step_flops  # noqa: E402


def test_dims_by_hand(tiny):
    d = model_dims(tiny.model)
    # per layer: q 32x32, k and v 32x16 (2 of 4 heads for keys/values), o 32x32, gate/up/down 3 x 32x64
    assert d.linear_params == 2 * (1024 + 512 + 512 + 1024 + 3 * 2048)
    assert (d.layers, d.attn_dim, d.head_params) == (2, 32, len(tiny.tokenizer) * 32)
    f = train_step_flops(d, [10, 6], head_positions=3)
    attn = 4 * 2 * 32 * (100 + 36)
    assert f.forward == 2 * d.linear_params * 16 + attn + 2 * d.head_params * 3
    assert f.backward == 2 * d.linear_params * 16 + 2 * attn + 2 * d.head_params * 3


def test_count_equals_torch_flop_counter(tiny, tiny_dir, sentiment_files, tmp_path):
    # torch's counter does not see inside the fused CPU attention kernel; eager attention runs the
    # same products as plain batched matmuls, which it counts
    before = tiny.model.config._attn_implementation
    tiny.model.set_attn_implementation("eager")
    try:
        _compare(tiny, tiny_dir, sentiment_files, tmp_path)
    finally:
        tiny.model.set_attn_implementation(before)


def _compare(tiny, tiny_dir, sentiment_files, tmp_path):
    for target_only_head in (True, False):
        cfg = TrainConfig(model=str(tiny_dir), tokens=4, steps=2, batch_size=1, init="random", device="cpu",
                          target_only_head=target_only_head)
        t = Trainer(cfg, read_examples(sentiment_files[0]), out=tmp_path / "p", base=tiny, progress=False)
        enc = t.encoded[t.plan[0][0]]  # one row: no padding, so every counted position is real
        targets = sum(1 for x in enc.labels[1:] if x != -100)
        heads = targets if target_only_head else len(enc.ids)
        with FlopCounterMode(display=False) as counter:
            t.train_step()
        expect = train_step_flops(model_dims(tiny.model), [len(enc.ids)], heads)
        assert counter.get_total_flops() == expect.total, (target_only_head, counter.get_flop_counts())


def test_matmul_throughput_is_measured():
    f = matmul_flops_per_s(torch.float32, size=256, repeats=2)
    assert 1e8 < f < 1e15


def test_hardware_report_names_the_cpu_and_its_peaks():
    hw = hardware_report(measure=False)
    assert hw["cpu_model"] and hw["isa"] and hw["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "matmul_gflops" not in hw and "Hardware:" in hardware_line(hw)
    hw["matmul_gflops"], hw["matmul_size"] = {"fp32": 80.0, "bf16": 0.9}, 1024
    assert "fp32 80.0 / bf16 0.9 GFLOP/s" in hardware_line(hw)


def test_shared_prefix_counts_shared_positions_once():
    from flops import ModelDims

    dims = ModelDims(linear_params=10, layers=1, attn_dim=1, head_params=0)
    plain = train_step_flops(dims, [5, 7], 0)
    shared = train_step_flops(dims, [5, 7], 0, shared=3)
    # linear: 12 tokens -> 9 computed; attention scores: 25 + 49 -> 3*3 + 2*5 + 4*7
    assert plain.forward == 2 * 10 * 12 + 4 * (25 + 49)
    assert shared.forward == 2 * 10 * 9 + 4 * (9 + 10 + 28)
