"""The prompt artifact: a directory with ``prompt.safetensors`` and ``prompt.json``.

prompt.json records the kind, the template, the dimensions, the initialization, the training
configuration, final metrics, the package version and a fingerprint of the base model (id, hidden
size, vocabulary size, hash of the embedding matrix). Loading on another base model is refused.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from softprompt import __version__
from softprompt.atomic import atomic_save_tensors, atomic_write_json
from softprompt.base_model import BaseModel, check_fingerprint
from softprompt.errors import ArtifactError
from softprompt.prompts import SoftPrompt, kind_class
from softprompt.template import Template, parse_template

FORMAT_VERSION = 1
TENSORS = "prompt.safetensors"
META = "prompt.json"


@dataclass
class PromptArtifact:
    """A loaded prompt with everything needed to use it."""

    prompt: SoftPrompt
    template: Template
    meta: dict
    path: Path | None = None
    tensors: dict = field(default_factory=dict)  # the tensors as stored in prompt.safetensors

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def chat(self) -> bool:
        return bool(self.meta.get("format", {}).get("chat", True))

    @property
    def system(self) -> str | None:
        return self.meta.get("format", {}).get("system")

    @property
    def base_id(self) -> str:
        return self.meta["base_model"]["id"]

    def prompt_format(self, base: BaseModel):
        from softprompt.encoding import PromptFormat

        return PromptFormat(base.tokenizer, self.template, chat=self.chat, system=self.system,
                            max_length=base.max_positions)


def build_meta(prompt: SoftPrompt, template_source: str, base: BaseModel, **extra) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "softprompt_version": __version__,
        "kind": prompt.kind,
        "n_virtual": prompt.n_virtual,
        "hidden_size": prompt.hidden_size,
        "template": template_source,
        "kind_config": prompt.config(),
        "base_model": base.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def save_artifact(path: str | Path, prompt: SoftPrompt, meta: dict) -> Path:
    """Write the tensors and then the metadata, each atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path / TENSORS, prompt.export_tensors(), {"kind": prompt.kind, "format": "softprompt"})
    atomic_write_json(path / META, meta)
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a prompt directory" + ("" if path.exists() else " (does not exist)"))
    meta_path = path / META
    if not meta_path.exists():
        raise ArtifactError(f"{path}: not a prompt artifact (no {META})")
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{meta_path}: corrupt metadata ({e})") from None
    for key in ("kind", "n_virtual", "hidden_size", "template", "base_model"):
        if key not in meta:
            raise ArtifactError(f"{meta_path}: missing field {key!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{meta_path}: format version {meta['format_version']} is newer than this softprompt supports")
    return meta


def load_artifact(path: str | Path, base: BaseModel | None = None, device: str | torch.device | None = None) -> PromptArtifact:
    """Load a prompt; with ``base`` given, refuse it unless it was trained on that base model."""
    path = Path(path)
    meta = read_meta(path)
    if base is not None:
        check_fingerprint(meta["base_model"], base.fingerprint, what=f"prompt {path}")
    try:
        tensors = load_file(str(path / TENSORS))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing {TENSORS}") from None
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path / TENSORS}: corrupt tensor file ({e})") from None
    cls = kind_class(meta["kind"])
    try:
        prompt = cls(hidden_size=meta["hidden_size"], **meta.get("kind_config", {}))
        prompt.load_tensors(tensors)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path}: tensors do not match prompt.json ({e})") from None
    template = parse_template(meta["template"])
    if device is None and base is not None:
        device = base.device
    if device is not None:
        prompt = prompt.to(device)
    prompt.requires_grad_(False)
    prompt.eval()
    return PromptArtifact(prompt, template, meta, path, tensors)
