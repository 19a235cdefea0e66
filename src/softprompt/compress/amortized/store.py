"""The compressor artifact (``compressor.safetensors`` + ``compressor.json``) and its use: one forward
turns a context into an ordinary prompt artifact.

compressor.json records the form, the memory size, the layout, the base model's fingerprint (loading
on another base is refused), the training configuration and metrics, and the ids (hashes) of the
contexts it was trained and early-stopped on.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from softprompt import __version__
from softprompt.artifact import build_meta, load_tensor_file, save_artifact
from softprompt.atomic import atomic_save_tensors, atomic_write_json
from softprompt.base_model import BaseModel, check_fingerprint, load_base
from softprompt.compress.amortized.jobs import context_job
from softprompt.compress.amortized.model import Encoding, MemoryEncoder
from softprompt.compress.compressor import Compressor, context_sha
from softprompt.errors import ArtifactError, SoftPromptError
from softprompt.precision import resolve_precision
from softprompt.prompts import SoftPrompt

TENSORS = "compressor.safetensors"
META = "compressor.json"
FORMAT = "softprompt-compressor"
FORMAT_VERSION = 1


def tensors_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class AmortizedCompressor:
    """A trained compressor on its base model: ``prompt(context)`` is one forward, no training."""

    def __init__(self, base: BaseModel, encoder: MemoryEncoder, meta: dict | None = None, placement: str = "system",
                 precision: str = "auto", path: Path | None = None):
        self.base, self.encoder, self.meta, self.placement, self.path = base, encoder.to(base.device), dict(meta or {}), placement, path
        self.precision = resolve_precision(precision, base.device)
        self._encodings: dict[tuple, Encoding] = {}

    @property
    def form(self) -> str:
        return self.encoder.form

    @property
    def memory(self) -> int:
        return self.encoder.n_memory

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path, **extra) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        atomic_save_tensors(path / TENSORS, tensors, {"format": FORMAT})
        self.meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "softprompt_version": __version__,
                          **self.encoder.config(), "placement": self.placement, "base_model": self.base.fingerprint,
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra})
        atomic_write_json(path / META, self.meta)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, base: BaseModel | None = None, device=None, precision: str = "auto") -> "AmortizedCompressor":
        """Load a compressor; refuse it (one line) on a base model other than the one it was trained on."""
        path = Path(path)
        meta_path = path / META
        if not meta_path.is_file():
            raise ArtifactError(f"{path}: not a compressor (no {META})" + ("" if path.exists() else "; the directory does not exist"))
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{meta_path}: corrupt metadata ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ArtifactError(f"{meta_path}: not a compressor (field 'format' is not {FORMAT!r})")
        for key in ("form", "memory", "hidden_size", "base_model"):
            if key not in meta:
                raise ArtifactError(f"{meta_path}: missing field {key!r}")
        base = base or load_base(meta["base_model"]["id"], device=device)
        check_fingerprint(meta["base_model"], base.fingerprint, what=f"compressor {path}")
        tensors = load_tensor_file(path / TENSORS)
        try:
            enc = MemoryEncoder(meta["hidden_size"], meta["memory"], meta["form"], projector_hidden=meta.get("projector_hidden"),
                                lora=meta.get("encoder_lora"))
        except (SoftPromptError, AttributeError, TypeError) as e:
            raise ArtifactError(f"{meta_path}: bad compressor settings ({e})") from None
        enc.attach(base.model)  # an encoder LoRA's weights live in the twin's peft layers
        try:
            enc.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise ArtifactError(f"{path}: tensors do not match {META} ({str(e).splitlines()[0]})") from None
        enc.requires_grad_(False)
        return cls(base, enc, meta, meta.get("placement", "system"), precision, path)

    # -- use ---------------------------------------------------------------------------------------
    def job(self, text: str, out: str | Path = ".", **cfg) -> Compressor:
        """The per-context compression job for ``text`` (layout, teacher, loss, report)."""
        cfg.setdefault("precision", "bf16" if self.precision.bf16 else "fp32")
        return context_job(self.base, text, self.form, self.memory, out, self.placement, **cfg)

    def encoding(self, job: Compressor) -> Encoding:
        key = tuple(job.head_ids)
        if key not in self._encodings:
            self._encodings[key] = Encoding(self.base, self.encoder, job.head_ids, self.precision.bf16)
        return self._encodings[key]

    def prompt(self, text: str, job: Compressor | None = None) -> SoftPrompt:
        """The context's prompt (``prefix`` for the kv form, ``prompt-tuning`` for the projector): one forward."""
        job = job or self.job(text)
        self.encoder.eval()
        return self.encoding(job).prompt(job.ctx_ids)

    def prompt_meta(self, job: Compressor, prompt: SoftPrompt, **extra) -> dict:
        comp = {"form": self.form, "memory": self.memory, "path": str(self.path) if self.path else None,
                "tensors_sha256": tensors_sha(self.path / TENSORS) if self.path and (self.path / TENSORS).exists() else None}
        return build_meta(prompt, job.template_source, self.base, init="compressor", format=job.student_fmt.describe(),
                          precision=self.precision.to_meta(),
                          compression={"method": "amortized", "context_tokens": len(job.ctx_ids), "soft_tokens": self.memory,
                                       "compression_ratio": len(job.ctx_ids) / self.memory, "context_sha256": context_sha(job.context),
                                       "placement": job.layout.placement, "kind": prompt.kind, "compressor": comp, **extra})

    def compress(self, text: str, out: str | Path) -> tuple[Path, SoftPrompt, float]:
        """Write the context's prompt artifact to ``out``; returns (path, prompt, seconds of the forward)."""
        if not isinstance(text, str) or not text.strip():
            raise SoftPromptError("the context is empty: nothing to compress")
        job = self.job(text, out)
        t0 = time.perf_counter()
        prompt = self.prompt(text, job)
        seconds = time.perf_counter() - t0
        save_artifact(out, prompt, self.prompt_meta(job, prompt, forward_s=seconds))
        return Path(out), prompt, seconds

