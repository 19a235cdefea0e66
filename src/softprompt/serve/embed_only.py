"""The gateway's view of the base model: its tokenizer, config and input-embedding matrix, and
nothing else. ``softprompt serve --engine vllm`` builds each request's prompt embeddings here and
sends them to vLLM, so it never loads the transformer layers: only the ``embed_tokens`` tensor is
read from the model's safetensors (a 135M model: 113 MB of embeddings instead of 540 MB of weights).

:class:`EmbeddingBase` quacks like :class:`softprompt.base_model.BaseModel` where the registry and
the API need it (``tokenizer``, ``fingerprint``, ``device``, ``embedding``, ``hidden_size``,
``max_positions``, ``eos_ids``), so prompts are validated against the same fingerprint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompt.base_model import EMBEDDED, ModelFacts, embedding_hash, ensure_embedded, eos_ids_from
from softprompt.errors import SoftPromptError

# Names of the input-embedding tensor in the checkpoints of the usual architectures.
EMBED_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
              "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight", "language_model.model.embed_tokens.weight")


def model_dir(name: str) -> Path:
    """The local directory of ``name`` (an embedded name or a path; hub ids are not fetched here)."""
    if name in EMBEDDED:
        return ensure_embedded(name)
    p = Path(name).expanduser()
    if not (p / "config.json").exists():
        raise SoftPromptError(f"model {name!r}: --engine vllm needs a local model directory with config.json and "
                              f"safetensors (or an embedded name: {', '.join(EMBEDDED)})")
    return p


def load_embedding_matrix(directory: Path) -> torch.Tensor:
    """The input-embedding matrix from the safetensors files of ``directory``, read alone."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        candidates = [(k, directory / weight_map[k]) for k in EMBED_KEYS if k in weight_map]
    else:
        files = sorted(directory.glob("*.safetensors"))
        candidates = [(k, f) for f in files for k in EMBED_KEYS]
    for key, file in candidates:
        if not file.exists():
            continue
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    raise SoftPromptError(f"{directory}: no input-embedding tensor found in its safetensors (looked for {', '.join(EMBED_KEYS)})")


@dataclass
class EmbeddingBase(ModelFacts):
    """Tokenizer, config and input embeddings of a base model, without its layers."""

    name: str
    tokenizer: object
    fingerprint: dict
    embedding: torch.nn.Embedding
    config: dict
    generation_config: dict
    path: Path
    window: int | None = None  # the upstream's max_model_len, when it is smaller than the model's

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def max_positions(self) -> int:
        if self.window:
            return self.window
        return int(self.config.get("max_position_embeddings") or self.config.get("n_positions") or 2048)

    @property
    def dtype_name(self) -> str:
        """The checkpoint's dtype as vLLM's ``--dtype auto`` reads it from config.json."""
        return str(self.config.get("dtype") or self.config.get("torch_dtype") or "float32")

    def eos_ids(self) -> list[int]:
        return eos_ids_from(self.generation_config.get("eos_token_id"), self.tokenizer)


def load_embedding_base(name: str) -> EmbeddingBase:
    """An :class:`EmbeddingBase` for ``name``: the tokenizer and the embedding matrix (fp32), with the
    same fingerprint :func:`softprompt.base_model.make_fingerprint` gives the full model."""
    from transformers import AutoTokenizer

    directory = model_dir(name)
    config = json.loads((directory / "config.json").read_text())
    gen_path = directory / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    tok = AutoTokenizer.from_pretrained(str(directory))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    weight = load_embedding_matrix(directory).to(torch.float32)
    emb = torch.nn.Embedding.from_pretrained(weight, freeze=True)
    fingerprint = {
        "id": str(name),
        "model_type": config.get("model_type"),
        "hidden_size": int(weight.shape[1]),
        "vocab_size": int(weight.shape[0]),
        "num_layers": int(config.get("num_hidden_layers", 0) or 0),
        "embedding_sha256": embedding_hash(weight),
    }
    return EmbeddingBase(str(name), tok, fingerprint, emb, config, generation, directory)
