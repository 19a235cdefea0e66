"""Shared fixtures: tiny random models made from a config (fast), and the real embedded SmolLM2
(for tests marked slow). Everything runs offline."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from strict import need, need_module, pytest_runtest_makereport  # noqa: F401 - the hook is conftest's

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SOFTPROMPT_PRECISION", "fp32")  # the CLI's default in subprocesses: outputs comparable on every CPU

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _fp32_on_every_cpu(request, monkeypatch):
    """Tiny-model tests compare against fp32 references, so ``precision="auto"`` resolves to fp32 in
    them on every CPU (as on one without native bf16). Real-model tests (marked slow) and the
    precision tests see the real hardware probe."""
    if request.node.get_closest_marker("slow") or request.node.module.__name__.endswith("test_precision"):
        return
    from softprompt import precision

    monkeypatch.setattr(precision, "probe", lambda device="cpu": precision.Capability(
        "cpu", "AVX2", frozenset({"avx2"}), name="tests: probe pinned to fp32"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2 converted to a safetensors directory (cached across runs)."""
    from softprompt.base_model import ensure_embedded

    return ensure_embedded("smollm2")


def make_tiny_model(directory: Path, tokenizer_dir: Path, seed: int = 0, layers: int = 2, kv_heads: int = 2, init_range: float = 0.2) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256, initializer_range=init_range,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer llama with grouped-query attention (4 query heads, 2 key/value heads) and the real
    SmolLM2 tokenizer and chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm2_dir)


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny2") / "other-llama", smollm2_dir, seed=1)


@pytest.fixture()
def tiny(tiny_dir):
    from softprompt.base_model import load_base

    return load_base(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    from softprompt.base_model import load_base

    return load_base("smollm2", device="cpu")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SENTIMENT = [
    ("I loved every minute of it", "positive"), ("What a wonderful day", "positive"),
    ("This is great news", "positive"), ("The food was delicious", "positive"),
    ("Absolutely fantastic work", "positive"), ("I am so happy with this", "positive"),
    ("That was terrible", "negative"), ("I hated the ending", "negative"),
    ("The service was awful", "negative"), ("What a waste of time", "negative"),
    ("This is the worst", "negative"), ("I am very disappointed", "negative"),
]


@pytest.fixture()
def sentiment_files(tmp_path):
    rows = [{"input": t, "target": y} for t, y in SENTIMENT]
    return write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "dev.jsonl", rows[::3])


# -- softprompt serve (tests/test_serve_*.py; helpers in serve_helpers.py) ----------------------------
@pytest.fixture(scope="session")
def base(tiny_dir):
    from softprompt.base_model import load_base

    return load_base(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def prompts_dir(base, tmp_path_factory) -> Path:
    """A prompts directory with one prompt of every kind (chat and plain formats), one trained."""
    from serve_helpers import _make_prompts

    root = tmp_path_factory.mktemp("prompts")
    _make_prompts(base, root, tmp_path_factory.mktemp("work"))
    return root


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    import yaml
    from serve_helpers import A_PROMPTS, KEY_A, KEY_ADMIN, KEY_B

    from softprompt.serve.auth import hash_key

    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [
        {"name": "a", "sha256": hash_key(KEY_A), "prompts": A_PROMPTS + ["replace-me", "uploaded"]},
        {"name": "b", "sha256": hash_key(KEY_B), "prompts": ["secret"]},
        {"name": "ops", "sha256": hash_key(KEY_ADMIN), "prompts": "*", "admin": True},
    ]}))
    return path


@pytest.fixture(scope="module")
def live(base, prompts_dir, keys_file):
    """A live server on prompts_dir with three tenants (a, b, admin), one per test module."""
    from serve_helpers import LiveServer

    from softprompt.serve.auth import Auth
    from softprompt.serve.registry import Registry
    from softprompt.serve.schemas import Limits
    from softprompt.serve.server import Server

    server = Server(base, Registry(base, prompts_dir), Auth.from_file(keys_file),
                    Limits(max_tokens=64, max_input_tokens=100, max_body_bytes=4096), max_batch=8, max_queue=64,
                    watch_interval=0.2)
    with LiveServer(server) as s:
        yield s
