"""Optional torch.compile of the base model's forward: the same losses as eager."""
from __future__ import annotations

import pytest
import torch
from strict import inductor_missing, need

from softprompt.data.readers import read_examples
from softprompt.train import TrainConfig, Trainer


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_training_matches_eager(tiny, tiny_dir, sentiment_files, tmp_path, precision):
    """fp32: compiled on the base as loaded; bf16: compiled on the copy with linear weights cast once,
    against eager on the prepacked copy."""
    need(inductor_missing() is None, str(inductor_missing()))
    data = read_examples(sentiment_files[0])
    losses, norms, updates = {}, {}, {}
    for compile_ in (False, True):
        cfg = TrainConfig(model=str(tiny_dir), tokens=4, steps=3, batch_size=4, lr=0.1, init="random", seed=0,
                          device="cpu", compile=compile_, precision=precision)
        t = Trainer(cfg, data, out=tmp_path / str(compile_), base=tiny, progress=False)
        assert (t.compiled is not None) == compile_
        start = t.prompt.embeddings.detach().clone()
        stats = [t.train_step() for _ in range(cfg.steps)]
        losses[compile_], norms[compile_] = [s["loss"] for s in stats], [s["grad_norm"] for s in stats]
        updates[compile_] = (t.prompt.embeddings.detach() - start).flatten()
    # inductor fuses and reorders arithmetic: agreement to float rounding, not bit for bit
    if precision == "fp32":
        assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
        assert norms[True] == pytest.approx(norms[False], rel=1e-3)
        torch.testing.assert_close(updates[True], updates[False], atol=1e-4, rtol=1e-4)
    else:
        # bf16 keeps 8 mantissa bits, and Adam's first steps move each element by about +-lr whatever the
        # gradient's size, so an element whose tiny gradient flips sign under rounding moves 2*lr the other
        # way: the first step (same prompt, same batch) agrees to bf16 rounding, later losses closely, and the
        # update as a whole points the same way
        assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-2)
        assert norms[True][0] == pytest.approx(norms[False][0], rel=2e-2)
        assert losses[True] == pytest.approx(losses[False], rel=2e-2, abs=1e-2)
        cos = torch.nn.functional.cosine_similarity(updates[True], updates[False], dim=0)
        print(f"bf16 compiled vs eager: losses {losses}, grad norms {norms}, update cosine {float(cos):.4f}")
        assert cos > 0.9
    # the shared base model was not replaced by the compiled one
    assert not hasattr(tiny.model.model, "_orig_mod")
