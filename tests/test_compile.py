"""Optional torch.compile of the base model's forward: the same losses as eager."""
from __future__ import annotations

import pytest
import torch
from strict import inductor_missing, need

from softprompt.data.readers import read_examples
from softprompt.train import TrainConfig, Trainer


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny, tiny_dir, sentiment_files, tmp_path):
    need(inductor_missing() is None, str(inductor_missing()))
    data = read_examples(sentiment_files[0])
    losses, prompts = {}, {}
    for compile_ in (False, True):
        cfg = TrainConfig(model=str(tiny_dir), tokens=4, steps=3, batch_size=4, lr=0.1, init="random", seed=0,
                          device="cpu", compile=compile_, precision="fp32")
        t = Trainer(cfg, data, out=tmp_path / str(compile_), base=tiny, progress=False)
        assert (t.compiled is not None) == compile_
        losses[compile_] = [t.train_step()["loss"] for _ in range(cfg.steps)]
        prompts[compile_] = t.prompt.embeddings.detach().clone()
    # inductor fuses and reorders float32 arithmetic: agreement to ~1e-6 relative, not bit for bit
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
    torch.testing.assert_close(prompts[True], prompts[False], atol=1e-4, rtol=1e-4)
    # the shared base model was not replaced by the compiled one
    assert not hasattr(tiny.model.model, "_orig_mod")
