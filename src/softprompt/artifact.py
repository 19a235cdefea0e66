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
MAX_TENSOR_BYTES = 512 << 20  # a prompt is kilobytes to megabytes; anything larger is refused unread
MAX_HEADER_BYTES = 1 << 20  # safetensors' JSON header of a prompt's few tensors is a few hundred bytes
MAX_META_BYTES = 16 << 20


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
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise ArtifactError(f"{meta_path}: {meta_path.stat().st_size} bytes, over the limit of {MAX_META_BYTES}")
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{meta_path}: corrupt metadata ({e})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path}: corrupt metadata (not a JSON object)")
    for key in ("kind", "n_virtual", "hidden_size", "template", "base_model"):
        if key not in meta:
            raise ArtifactError(f"{meta_path}: missing field {key!r}")
    if not isinstance(meta.get("format_version", 0), int) or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{meta_path}: format version {meta['format_version']} is newer than this softprompt supports")
    for key in ("n_virtual", "hidden_size"):
        if type(meta[key]) is not int or meta[key] < 1:
            raise ArtifactError(f"{meta_path}: {key!r} must be a positive integer")
    if not isinstance(meta["kind"], str) or not isinstance(meta["template"], str) or not isinstance(meta["base_model"], dict) \
            or not isinstance(meta.get("kind_config", {}), dict) or not isinstance(meta.get("format", {}), dict):
        raise ArtifactError(f"{meta_path}: 'kind' and 'template' must be strings, 'base_model', 'kind_config' and "
                            "'format' objects")
    fmt = meta.get("format", {})
    if not isinstance(fmt.get("chat", True), bool) or not isinstance(fmt.get("system"), (str, type(None))):
        raise ArtifactError(f"{meta_path}: 'format.chat' must be true or false and 'format.system' a string or null")
    return meta


def check_tensor_file(path: Path) -> None:
    """Refuse a tensor file before reading it: over :data:`MAX_TENSOR_BYTES`, or a safetensors header
    whose claimed length is over :data:`MAX_HEADER_BYTES` or past the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ArtifactError(f"{path.parent}: missing {TENSORS}") from None
    if size > MAX_TENSOR_BYTES:
        raise ArtifactError(f"{path}: {size} bytes, over the limit of {MAX_TENSOR_BYTES} for a prompt")
    if len(head) < 8:
        raise ArtifactError(f"{path}: corrupt tensor file (truncated: {size} bytes)")
    claimed = int.from_bytes(head, "little")
    if claimed > MAX_HEADER_BYTES or claimed > size - 8:
        raise ArtifactError(f"{path}: corrupt tensor file (its header claims {claimed} bytes; the file has {size})")


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, after :func:`check_tensor_file`; a missing or corrupt file is an
    ArtifactError naming it."""
    check_tensor_file(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ArtifactError(f"{path.parent}: missing {path.name}") from None
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: corrupt tensor file ({e})") from None


def check_tensors(path: Path, prompt: SoftPrompt, expected: dict[str, tuple], tensors: dict[str, torch.Tensor],
                  meta: dict) -> None:
    """The stored tensors agree with prompt.json (every tensor a prompt of its kind and dimensions
    has, with that shape) and hold only finite values."""
    if prompt.n_virtual != meta["n_virtual"] or prompt.hidden_size != meta["hidden_size"]:
        raise ArtifactError(f"{path}: prompt.json says {meta['n_virtual']} virtual tokens of size {meta['hidden_size']}, "
                            f"its kind_config builds {prompt.n_virtual} of size {prompt.hidden_size}")
    for key, shape in expected.items():
        if key not in tensors:
            raise ArtifactError(f"{path}: tensors do not match prompt.json (no tensor {key!r})")
        if tuple(tensors[key].shape) != shape:
            raise ArtifactError(f"{path}: tensors do not match prompt.json ({key!r} has shape "
                                f"{tuple(tensors[key].shape)}, prompt.json implies {shape})")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{path}: tensor {key!r} holds NaN or infinite values")


def load_artifact(path: str | Path, base: BaseModel | None = None, device: str | torch.device | None = None) -> PromptArtifact:
    """Load a prompt; with ``base`` given, refuse it unless it was trained on that base model."""
    path = Path(path)
    meta = read_meta(path)
    if base is not None:
        check_fingerprint(meta["base_model"], base.fingerprint, what=f"prompt {path}")
    tensors = load_tensor_file(path / TENSORS)
    cls = kind_class(meta["kind"])
    try:
        prompt = cls(hidden_size=meta["hidden_size"], **meta.get("kind_config", {}))
        with torch.no_grad():
            expected = {k: tuple(v.shape) for k, v in prompt.export_tensors().items()}
        check_tensors(path, prompt, expected, tensors, meta)
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
