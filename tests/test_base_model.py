"""Loading the frozen base: one shared object per (model, device), and no in-memory change ever reaching
the model's files (safetensors may be memory-mapped; a writable shared map would write through)."""

from __future__ import annotations

import hashlib

import torch

from softprompt.base_model import load_base


def _digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_loads_are_shared_by_name_and_device_unless_asked_for_a_fresh_one(tiny_dir):
    a = load_base(str(tiny_dir), device="cpu")
    assert load_base(str(tiny_dir), device="cpu") is a
    fresh = load_base(str(tiny_dir), device="cpu", reuse=False)
    assert fresh is not a and fresh.model is not a.model
    assert fresh.fingerprint == a.fingerprint


def test_an_in_place_change_to_a_loaded_weight_never_reaches_the_file_or_a_fresh_load(tiny_dir):
    before = _digest(tiny_dir)
    assert before, "the tiny model has no safetensors file"
    base = load_base(str(tiny_dir), device="cpu", reuse=False)
    name, weight = next(iter(base.model.named_parameters()))
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    assert _digest(tiny_dir) == before, "writing into a loaded weight changed the model file"
    again = load_base(str(tiny_dir), device="cpu", reuse=False)
    assert torch.equal(dict(again.model.named_parameters())[name], original)
