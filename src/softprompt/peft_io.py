"""Moving prompts to and from HF PEFT's adapter format.

PEFT writes ``adapter_config.json`` and ``adapter_model.safetensors`` with one tensor,
``prompt_embeddings``:

* ``PROMPT_TUNING`` and ``P_TUNING``: ``[n, hidden]`` input vectors placed before the whole input
  (P-tuning's encoder output is saved materialized, so it imports as prompt tuning);
* ``PREFIX_TUNING``: ``[n, layers * 2 * kv_heads * head_dim]``, each row ordered (layer, key/value,
  head, dim); the input tokens then take positions ``n, n+1, ...``.

Our prefix layout ``[layers, 2, kv_heads, n, head_dim]`` is a permutation of PEFT's. peft itself is
not needed for either direction. Since PEFT places virtual tokens before the whole input, only
prompts whose soft tokens come first can be exported; imported prompts get the template
``[soft:N]{input}`` (or ``{input}`` for prefixes) without the chat template, which reproduces what
PEFT computes on the same input text.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from softprompt import __version__
from softprompt.artifact import PromptArtifact, build_meta, save_artifact
from softprompt.atomic import atomic_save_tensors, atomic_write_json
from softprompt.base_model import BaseModel, check_fingerprint
from softprompt.errors import ArtifactError, SoftPromptError
from softprompt.prompts import PrefixTuning, PromptTuning
from softprompt.prompts.prefix import cache_layout
from softprompt.template import Field, Soft, Template, Text, parse_template

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
INPUT_TYPES = ("PROMPT_TUNING", "P_TUNING")
SUPPORTED = (*INPUT_TYPES, "PREFIX_TUNING")


def base_model_id(base: BaseModel) -> str:
    """The id PEFT users know the base by (the hub id of the embedded model)."""
    return getattr(base.model.config, "name_or_path", None) or base.name


def _peft_prefix(kv: torch.Tensor) -> torch.Tensor:
    layers, two, heads, n, dim = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(n, layers * two * heads * dim)


def _our_prefix(flat: torch.Tensor, layers: int, heads: int, dim: int) -> torch.Tensor:
    n = flat.shape[0]
    return flat.reshape(n, layers, 2, heads, dim).permute(1, 2, 3, 0, 4).contiguous()


def export_peft(art: PromptArtifact, base: BaseModel, out: str | Path) -> Path:
    """Write ``art`` as a PEFT adapter directory ``out``."""
    out = Path(out)
    prompt, n = art.prompt, art.prompt.n_virtual
    layers, kv_heads, head_dim = cache_layout(base.model)
    common = {"base_model_name_or_path": base_model_id(base), "inference_mode": True, "num_layers": layers,
              "num_transformer_submodules": 1, "num_virtual_tokens": n, "revision": None, "task_type": "CAUSAL_LM",
              "modules_to_save": None, "auto_mapping": None}
    if not prompt.input_level:  # keys and values at every layer (prefix tuning)
        tensor = _peft_prefix(prompt.key_values().detach().float().cpu())
        config = {**common, "peft_type": "PREFIX_TUNING", "token_dim": kv_heads * head_dim,
                  "num_attention_heads": kv_heads, "encoder_hidden_size": kv_heads * head_dim,
                  "prefix_projection": False}
    elif prompt.input_level:
        segs = art.template.segments
        first_soft = next((i for i, s in enumerate(segs) if isinstance(s, Soft)), None)
        leading_text = any(isinstance(s, Text) and s.text for s in segs[:first_soft or 0])
        if art.chat or first_soft is None or leading_text or len(art.template.spans()) != 1 or \
                sum(isinstance(s, Soft) for s in segs) != 1:
            raise SoftPromptError(
                f"{art.path}: PEFT places virtual tokens before the whole input, but this prompt's soft tokens sit "
                f"{'inside the chat template' if art.chat else 'elsewhere'} (template {art.meta['template']!r}); "
                f"only a single leading soft span without the chat template can be exported")
        tensor = prompt.vectors().detach().float().cpu()
        config = {**common, "peft_type": "PROMPT_TUNING", "token_dim": prompt.hidden_size,
                  "num_attention_heads": base.model.config.num_attention_heads, "prompt_tuning_init": "RANDOM",
                  "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
    else:
        raise SoftPromptError(f"{art.path}: kind {art.kind!r} has no PEFT equivalent")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "softprompt_version": __version__, "softprompt_kind": art.kind,
            "softprompt_base": json.dumps(base.fingerprint), "softprompt_template": art.meta["template"]}
    atomic_save_tensors(out / WEIGHTS, {"prompt_embeddings": tensor.contiguous()}, meta)
    atomic_write_json(out / CONFIG, config)
    return out


def read_peft(path: str | Path) -> tuple[dict, torch.Tensor, dict]:
    """``(adapter_config, prompt_embeddings, safetensors metadata)`` of a PEFT prompt adapter."""
    path = Path(path)
    cfg_path = path / CONFIG
    if not cfg_path.exists():
        raise ArtifactError(f"{path}: not a PEFT adapter (no {CONFIG})")
    try:
        config = json.loads(cfg_path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{cfg_path}: corrupt adapter config ({e})") from None
    kind = config.get("peft_type")
    if kind not in SUPPORTED:
        raise ArtifactError(f"{cfg_path}: peft_type {kind!r} is not a soft prompt method this tool imports "
                            f"(supported: {', '.join(SUPPORTED)})")
    if kind == "P_TUNING" or config.get("prefix_projection"):
        pass  # PEFT saves the encoder's output materialized; it imports as plain vectors
    wpath = path / WEIGHTS
    if not wpath.exists():
        raise ArtifactError(f"{path}: missing {WEIGHTS} (only safetensors adapters are read)")
    try:
        with safe_open(str(wpath), framework="pt") as f:
            if "prompt_embeddings" not in f.keys():
                raise ArtifactError(f"{wpath}: no tensor 'prompt_embeddings' (has {', '.join(f.keys()) or 'none'})")
            tensor = f.get_tensor("prompt_embeddings").float()
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise ArtifactError(f"{wpath}: corrupt tensor file ({e})") from None
    return config, tensor, meta


def _check_base(path: Path, config: dict, meta: dict, base: BaseModel, force: bool) -> None:
    if "softprompt_base" in meta:
        check_fingerprint(json.loads(meta["softprompt_base"]), base.fingerprint, what=f"PEFT adapter {path}")
        return
    want = config.get("base_model_name_or_path")
    have = {base.name, base_model_id(base)}
    if want and want not in have and not force:
        raise SoftPromptError(f"PEFT adapter {path} was made for base model {want!r}, not {base_model_id(base)!r}: "
                              f"load it with --model {want} (or pass --force if they are the same weights)")


def import_peft(path: str | Path, base: BaseModel, out: str | Path, template: str | None = None,
                chat: bool = False, system: str | None = None, force: bool = False) -> Path:
    """Convert a PEFT prompt adapter into a prompt artifact directory ``out`` for ``base``."""
    path = Path(path)
    config, tensor, meta = read_peft(path)
    kind, n = config["peft_type"], int(config.get("num_virtual_tokens", tensor.shape[0]))
    layers = base.model.config.num_hidden_layers
    where = path / CONFIG
    if config.get("num_transformer_submodules", 1) != 1:
        raise SoftPromptError(f"{where}: adapters for encoder-decoder models are not supported")
    if config.get("num_layers") not in (None, layers):
        raise SoftPromptError(f"{where}: adapter is for a {config['num_layers']}-layer model; this base has {layers}")
    if tensor.ndim != 2 or tensor.shape[0] < n:
        raise SoftPromptError(f"{path / WEIGHTS}: prompt_embeddings has shape {tuple(tensor.shape)}, expected [{n}, ...]")
    tensor = tensor[:n]
    _check_base(path, config, meta, base, force)
    if kind in INPUT_TYPES:
        if tensor.shape[1] != base.hidden_size:
            raise SoftPromptError(f"{where}: adapter vectors have size {tensor.shape[1]}; this base's hidden size is "
                                  f"{base.hidden_size} (made for another base model)")
        prompt = PromptTuning(n, base.hidden_size, init=tensor)
        default = Template((Soft(n), Field("input")))
    else:
        layers, kv_heads, head_dim = cache_layout(base.model)
        if tensor.shape[1] != layers * 2 * kv_heads * head_dim:
            raise SoftPromptError(f"{where}: prefix rows have size {tensor.shape[1]}; this base needs "
                                  f"{layers}x2x{kv_heads}x{head_dim} = {layers * 2 * kv_heads * head_dim} "
                                  f"(made for another base model)")
        prompt = PrefixTuning(n, base.hidden_size, layers, kv_heads, head_dim,
                              init=_our_prefix(tensor, layers, kv_heads, head_dim))
        default = Template((Field("input"),))
    parsed = parse_template(template) if template else default
    source = template or default.to_string()
    if prompt.input_level and parsed.n_virtual != n:
        raise SoftPromptError(f"--template has {parsed.n_virtual} virtual tokens but the adapter has {n}")
    if not prompt.input_level and parsed.n_virtual:
        raise SoftPromptError("a prefix adapter takes a template without [soft] spans")
    meta_out = build_meta(prompt, source, base, init="peft", format={"chat": chat, "system": system},
                          imported_from={"path": str(path), "peft_type": kind,
                                         "base_model_name_or_path": config.get("base_model_name_or_path"),
                                         "peft_version": config.get("peft_version")})
    return save_artifact(out, prompt, meta_out)
