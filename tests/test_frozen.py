"""The frozen training copy (softprompt/frozen.py): linear layers prepacked for the forward and the
input gradient give nn.Linear's outputs and input gradients, no weight gradient, and training on the
copy follows training on the base step for step (fp32) while the base stays untouched."""
from __future__ import annotations

import pytest
import torch
from strict import need

from softprompt.artifact import load_artifact
from softprompt.data.readers import read_examples
from softprompt.errors import SoftPromptError
from softprompt.frozen import EAGER_OR_SDPA, FrozenLinear, cast_frozen_copy, fast_frozen_copy, training_attention, with_attention
from softprompt.onednn import packing_available
from softprompt.train import TrainConfig, Trainer


@pytest.fixture(autouse=True)
def _onednn():
    need(packing_available(torch.device("cpu")), "this torch build cannot prepack linear weights (no oneDNN)")

def _packed(model) -> bool:
    return any(isinstance(m, FrozenLinear) for m in model.modules())


BF16_PACKS = packing_available(torch.device("cpu"), torch.bfloat16)  # False on AVX2-only CPUs (oneDNN refuses)


def _linear_dtypes(model) -> set:
    return {m.weight.dtype for m in model.modules() if type(m) is torch.nn.Linear}


@pytest.mark.parametrize("shape", [(1, 3, 24), (5, 24), (2, 9, 24), (1, 40, 24)])
def test_frozen_linear_matches_linear_forward_and_input_gradient(shape):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    fl = FrozenLinear(lin)
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(*shape[:-1], 40)
    y, y_ref = fl(x), lin(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert not list(fl.parameters())  # nothing a weight gradient could reach
    with torch.no_grad():
        torch.testing.assert_close(fl(x), lin(x), rtol=1e-5, atol=1e-5)

def test_fast_copy_gives_the_base_logits_and_leaves_the_base_alone(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    fast = fast_frozen_copy(tiny.model)
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters())
    ids = torch.tensor([tiny.tokenizer("the movie was bad").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, tiny.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in before.items())
    assert any(type(m) is torch.nn.Linear for m in tiny.model.modules())  # the base keeps its own layers

@pytest.mark.parametrize("kind,precision", [("prompt-tuning", "fp32"), ("p-tuning", "fp32"), ("prefix", "fp32"),
                                            ("prompt-tuning", "bf16")])
def test_training_on_the_fast_copy_follows_the_base_step_for_step(tiny, tiny_dir, sentiment_files, tmp_path, kind, precision):
    """fp32: the same losses and prompt as training on the base; bf16: the copy's bf16 weights give
    autocast's products (the base under autocast casts the same weights to bf16 at every call)."""
    data = read_examples(sentiment_files[0])
    runs = {}
    for pack in (False, True):
        cfg = TrainConfig(model=str(tiny_dir), kind=kind, tokens=4, steps=6, batch_size=4, lr=0.05, init="random", seed=0,
                          device="cpu", precision=precision, pack_weights=pack)
        t = Trainer(cfg, data, data[:4], tmp_path / f"{kind}-{precision}-{pack}", base=tiny, progress=False)
        assert _packed(t.model) == (pack and (precision == "fp32" or BF16_PACKS))
        if pack and precision == "bf16" and not BF16_PACKS:  # the cast copy instead
            assert _linear_dtypes(t.model) == {torch.bfloat16}
        res = t.run()
        runs[pack] = (res, [h["loss"] for h in t.history if "loss" in h])
    (plain, plain_losses), (fast, fast_losses) = runs[False], runs[True]
    assert len(plain_losses) == 6
    assert plain_losses[-1] < plain_losses[0]
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-5)
    a, b = load_artifact(plain.out).prompt.export_tensors(), load_artifact(fast.out).prompt.export_tensors()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_the_default_packs_in_bf16_only(tiny, tiny_dir, sentiment_files, tmp_path):
    data = read_examples(sentiment_files[0])
    for precision, packed in (("fp32", False), ("bf16", BF16_PACKS)):
        cfg = TrainConfig(model=str(tiny_dir), tokens=4, steps=1, batch_size=4, init="random", device="cpu", precision=precision)
        t = Trainer(cfg, data, None, tmp_path / precision, base=tiny, progress=False)
        assert _packed(t.model) == packed, precision
        if not packed:  # fp32: the base itself; bf16 where oneDNN cannot pack it: the cast copy
            assert _linear_dtypes(t.model) == {torch.bfloat16 if precision == "bf16" else torch.float32}, precision


def test_where_oneDNN_cannot_pack_bf16_a_bf16_run_trains_on_the_cast_copy(tiny, tiny_dir, sentiment_files, tmp_path, monkeypatch):
    """AVX2-only CPUs: oneDNN refuses bf16 prepacking (it needs AVX-512 or AVX-NE-CONVERT), so a bf16
    run trains on the copy with linear weights cast once, and fp32 packing is unaffected."""
    import softprompt.frozen as frozen

    monkeypatch.setattr(frozen, "packing_available", lambda device, dtype=torch.float32: dtype == torch.float32)
    data = read_examples(sentiment_files[0])
    for precision, pack in (("bf16", None), ("fp32", True)):
        cfg = TrainConfig(model=str(tiny_dir), tokens=4, steps=2, batch_size=4, init="random", device="cpu", precision=precision,
                          pack_weights=pack)
        t = Trainer(cfg, data, None, tmp_path / precision, base=tiny, progress=False)
        assert _packed(t.model) == (precision == "fp32"), precision
        if precision == "bf16":
            assert t.model is not tiny.model and _linear_dtypes(t.model) == {torch.bfloat16}
            t.run()
            assert [h["loss"] for h in t.history if "loss" in h]
    assert _linear_dtypes(tiny.model) == {torch.float32}


def test_bf16_packing_is_offered_only_where_it_runs():
    if BF16_PACKS:
        w, x = torch.randn(16, 8), torch.randn(3, 8)
        from softprompt.onednn import pack, packed_mm

        got = packed_mm(x.bfloat16(), pack(w.bfloat16()), None).float()
        torch.testing.assert_close(got, x.bfloat16().float() @ w.bfloat16().float().t(), rtol=2e-2, atol=2e-2)
    else:  # the op really refuses here; the probe must have said so, not crashed
        from softprompt.onednn import pack

        with pytest.raises(RuntimeError):
            pack(torch.randn(16, 8).bfloat16())


def test_cast_copy_shares_all_but_the_linear_weights_and_gives_autocast_bit_for_bit(tiny):
    """The copy a compiled bf16 run trains on: linear weights cast once to bf16, everything else the
    base's own tensors; under autocast its logits and input gradients are the base's exactly."""
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    cast = cast_frozen_copy(tiny.model)
    lin = [m for m in cast.modules() if type(m) is torch.nn.Linear]
    assert lin and all(m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad for m in lin)
    base_ptrs = {t.data_ptr() for t in (*tiny.model.parameters(), *tiny.model.buffers())}
    lin_ptrs = {m.weight.data_ptr() for m in lin}
    others = [t for n, t in (*cast.named_parameters(), *cast.named_buffers()) if t.data_ptr() not in lin_ptrs]
    assert others and all(t.data_ptr() in base_ptrs for t in others)  # embeddings, norms: shared, not copied
    assert not lin_ptrs & base_ptrs
    ids = torch.tensor([tiny.tokenizer("the movie was bad, the acting worse").input_ids])
    grads = []
    for model in (tiny.model, cast):
        emb = tiny.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs_embeds=emb).logits.float()
        logits.logsumexp(-1).sum().backward()
        grads.append((logits.detach(), emb.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=0, atol=0)
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in before.items())
    assert all(m.weight.dtype == torch.float32 for m in tiny.model.modules() if type(m) is torch.nn.Linear)


def test_a_compiled_bf16_run_trains_on_the_cast_copy(tiny, tiny_dir, sentiment_files, tmp_path):
    data = read_examples(sentiment_files[0])
    for precision, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = TrainConfig(model=str(tiny_dir), tokens=4, steps=1, batch_size=4, init="random", device="cpu",
                          precision=precision, compile=True)
        t = Trainer(cfg, data, None, tmp_path / precision, base=tiny, progress=False)  # compiles lazily: nothing runs
        assert not _packed(t.model)
        assert {m.weight.dtype for m in t.model.modules() if type(m) is torch.nn.Linear} == {want}
        assert (t.model is tiny.model) == (precision == "fp32")


# -- the attention kernel training runs ---------------------------------------------------------------
def test_auto_attention_is_eager_or_sdpa_for_bf16_on_cpu_only():
    cpu = torch.device("cpu")
    assert training_attention("auto", cpu, bf16=True) == EAGER_OR_SDPA
    assert training_attention("auto", cpu, bf16=False) is None
    assert training_attention("auto", torch.device("cuda"), bf16=True) is None
    assert training_attention("sdpa", cpu, bf16=True) == "sdpa"
    with pytest.raises(SoftPromptError, match="attention 'flash'.*auto, sdpa, eager"):
        training_attention("flash", cpu, bf16=True)


def test_with_attention_shares_the_weights_and_leaves_the_base_alone(tiny):
    own = tiny.model.config._attn_implementation
    other = "eager" if own != "eager" else "sdpa"
    alt = with_attention(tiny.model, other)
    assert alt is not tiny.model and alt.config._attn_implementation == other
    assert tiny.model.config._attn_implementation == own
    base_ptrs = {t.data_ptr() for t in (*tiny.model.parameters(), *tiny.model.buffers())}
    assert {t.data_ptr() for t in (*alt.parameters(), *alt.buffers())} == base_ptrs  # no weight copied
    assert with_attention(tiny.model, own) is tiny.model and with_attention(tiny.model, None) is tiny.model
    ids = torch.tensor([tiny.tokenizer("the movie was bad, the acting worse").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(alt(input_ids=ids).logits, tiny.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_with_eager_attention_follows_sdpa(tiny, tiny_dir, sentiment_files, tmp_path, precision):
    """The kernel is a speed choice only: the same run with either gives the same losses (up to the
    rounding of the precision) and the bf16 default on CPU is eager."""
    data = read_examples(sentiment_files[0])
    own = tiny.model.config._attn_implementation
    losses = {}
    for attn in ("sdpa", "eager", "auto"):
        cfg = TrainConfig(model=str(tiny_dir), tokens=4, steps=5, batch_size=4, lr=0.05, init="random", seed=0,
                          device="cpu", precision=precision, attention=attn)
        t = Trainer(cfg, data, None, tmp_path / f"{precision}-{attn}", base=tiny, progress=False)
        assert t.model.config._attn_implementation == (EAGER_OR_SDPA if attn == "auto" and precision == "bf16" else
                                                       attn if attn != "auto" else own)
        losses[attn] = torch.tensor([t.train_step()["loss"] for _ in range(5)])
    assert losses["sdpa"][-1] < losses["sdpa"][0]
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=3e-2, atol=1e-2)
    torch.testing.assert_close(losses["eager"], losses["sdpa"], **tol)
    torch.testing.assert_close(losses["auto"], losses["sdpa"], **tol)
    assert tiny.model.config._attn_implementation == own  # the shared base keeps its kernel


@pytest.mark.parametrize("limit,path", [(1 << 30, "eager"), (0, "sdpa")])
def test_eager_or_sdpa_picks_by_score_size_and_equals_both_kernels(tiny, monkeypatch, limit, path):
    """The auto kernel runs eager attention under EAGER_MAX_SCORES scores per layer and SDPA above
    (a 200-step BoolQ run on eager alone ran out of memory); either way, with left padding and under
    bf16 autocast, the logits are those of the plain eager and sdpa models."""
    import softprompt.frozen as frozen

    calls = []
    for name in ("eager", "sdpa"):
        real = {"eager": "transformers.models.llama.modeling_llama.eager_attention_forward",
                "sdpa": "transformers.integrations.sdpa_attention.sdpa_attention_forward"}[name]
        mod, fn = real.rsplit(".", 1)
        orig = getattr(__import__(mod, fromlist=[fn]), fn)
        monkeypatch.setattr(f"{mod}.{fn}", lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    monkeypatch.setattr(frozen, "EAGER_MAX_SCORES", limit)
    auto = with_attention(tiny.model, training_attention("auto", torch.device("cpu"), bf16=True))
    refs = {k: with_attention(tiny.model, k) for k in ("eager", "sdpa")}
    enc = tiny.tokenizer(["the movie was bad", "a long and winding tale of two cities, told badly"], padding=True,
                         return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = auto(**enc).logits.float()
        calls.clear()
        got = auto(**enc).logits.float()
        assert set(calls) == {path}
        keep = enc["attention_mask"].bool()
        want = {k: ref(**enc).logits.float()[keep] for k, ref in refs.items()}
    assert not torch.equal(want["eager"], want["sdpa"])  # the two kernels differ in bf16 rounding here ...
    torch.testing.assert_close(got[keep], want[path], rtol=0, atol=0)  # ... and the one picked is matched bit for bit
