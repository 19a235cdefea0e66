"""Data-parallel training: two CPU processes (gloo) under ``accelerate launch`` learn the prompt one
process learns from the same global batches and seed."""
# The artifact's ``world_size`` is checked so that a launcher that silently starts independent
# single-rank processes (each would train on the full batch and match trivially) cannot pass.
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from strict import need

from softprompt.artifact import load_artifact
from softprompt.distributed import Dist

REPO = Path(__file__).resolve().parents[1]

# Tolerance: the 2-process gradient is the sum of two partial sums, the 1-process one a single sum,
# so the float32 results differ in the last bits; after a few AdamW steps (which divide by the root of
# the squared-gradient average and so can magnify tiny differences) they agree to about 1e-6.
ATOL, RTOL = 1e-5, 1e-4


def test_shard_covers_batch_once():
    idx = [7, 3, 9, 1, 4]
    parts = [Dist(r, 2).shard(idx) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(idx) and parts == [[7, 9, 4], [3, 1]]
    assert Dist(2, 3).shard([5]) == [] and Dist().shard(idx) == idx


def _accelerate() -> str:
    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    need(exe is not None, "the accelerate launcher is not installed")
    return exe


def test_two_processes_equal_one(tiny_dir, sentiment_files, tmp_path):
    train_f, dev_f = sentiment_files
    # batch size 5 so that the two ranks get unequal slices (3 + 2); grad accumulation over 2 micro-batches
    common = ["train", "--model", str(tiny_dir), "--data", str(train_f), "--dev", str(dev_f), "--tokens", "4",
              "--steps", "6", "--batch-size", "5", "--grad-accum", "2", "--lr", "0.1", "--init", "random",
              "--eval-every", "3", "--device", "cpu", "--quiet", "--seed", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "ACCELERATE_LOG_LEVEL": "error"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "softprompt.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    # --multi_gpu selects accelerate's torchrun launcher (it also runs without GPUs; "--cpu" with several
    # processes would need mpirun); the trainer then joins a gloo process group
    two = subprocess.run([_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                          "-m", "softprompt.cli", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    # rank 0 alone reported and wrote the log (one line per step and evaluation, not two)
    assert two.stdout.count("saved ") == 1, two.stdout
    logs = {name: [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("one", "two")}
    assert [r["type"] for r in logs["two"]] == [r["type"] for r in logs["one"]] == ["train"] * 3 + ["eval"] + ["train"] * 3 + ["eval"]
    for a, b in zip(logs["one"], logs["two"]):
        if a["type"] == "train":  # the logged loss and token count are global, summed over ranks
            assert b["tokens"] == a["tokens"]
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        else:
            assert b["dev_loss"] == pytest.approx(a["dev_loss"], rel=1e-4)
    one_art, two_art = load_artifact(tmp_path / "one"), load_artifact(tmp_path / "two")
    assert two_art.meta["metrics"]["world_size"] == 2 and "world_size" not in one_art.meta["metrics"]
    pa, pb = one_art.prompt.export_tensors(), two_art.prompt.export_tensors()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=ATOL, rtol=RTOL)
    # the prompt moved (the comparison is not between two untrained prompts)
    init = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    assert init["grad_norm"] > 0
