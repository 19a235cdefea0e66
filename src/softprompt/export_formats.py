"""Exporting an input-level prompt for other serving engines: vLLM (prompt embeds) and TensorRT-LLM
(a prompt table).

Both need the same two things: the soft rows (the prompt's vectors, ``[n_virtual, hidden]``) and
where they go in the input. The second is written as *parts*, the prompt's whole input (the chat
template and system prompt applied, for chat formats) cut at its soft spans: a list of
``{"text": [pieces]}`` and ``{"soft": [rows]}``, where a text's pieces are strings and
``{"field": name}`` holes for the request's values. A client joins each text's pieces with its
values, tokenizes it without special tokens, and puts the soft rows between (``bos`` first when
given): :func:`ids_from_parts` does exactly that, and gives the ids :class:`PromptFormat` gives.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from softprompt.encoding import _MARK, PromptFormat
from softprompt.errors import SoftPromptError

_HOLE = re.compile("\ue002([^\ue003]*)\ue003")


def template_parts(fmt: PromptFormat) -> dict:
    """The input of ``fmt``'s prompt as text parts with field holes and soft spans (see the module)."""
    from softprompt.data.examples import Example

    fields = fmt.template.fields
    text = fmt._wrap(fmt.render(Example({f: f"\ue002{f}\ue003" for f in fields})))
    parts: list[dict] = []

    def add_text(s: str) -> None:
        if not s:
            return
        pieces: list = []
        pos = 0
        for m in _HOLE.finditer(s):
            if m.start() > pos:
                pieces.append(s[pos:m.start()])
            pieces.append({"field": m.group(1)})
            pos = m.end()
        if pos < len(s):
            pieces.append(s[pos:])
        parts.append({"text": pieces})

    pos = 0
    for m in _MARK.finditer(text):
        add_text(text[pos:m.start()])
        parts.append({"soft": list(fmt._rows[int(m.group(1))])})
        pos = m.end()
    add_text(text[pos:])
    return {"bos": fmt._bos[0] if (fmt._bos and not fmt.chat) else None, "fields": list(fields), "parts": parts}


def ids_from_parts(spec: dict, tokenizer, values: dict[str, str], soft_id=lambda row: -(row + 1)) -> list[int]:
    """Token ids for ``values`` from :func:`template_parts`'s ``spec``; soft row ``k`` becomes
    ``soft_id(k)`` (default: softprompt's slot marker ``-(k+1)``; TensorRT-LLM: ``vocab_size + k``)."""
    ids = [spec["bos"]] if spec.get("bos") is not None else []
    for part in spec["parts"]:
        if "soft" in part:
            ids += [soft_id(r) for r in part["soft"]]
        else:
            s = "".join(p if isinstance(p, str) else values[p["field"]].replace("\ue000", "").replace("\ue001", "")
                        for p in part["text"])
            ids += tokenizer(s, add_special_tokens=False).input_ids
    return ids


def _vectors(art) -> torch.Tensor:
    if not art.prompt.input_level:
        raise SoftPromptError(f"{art.path} is {art.kind}, whose per-layer keys/values neither vLLM nor TensorRT-LLM "
                              f"take as input embeddings: distill it first with "
                              f"`softprompt convert {art.path} --to prompt-tuning --out {art.path}-pt`")
    with torch.no_grad():
        return art.prompt.vectors().detach().to("cpu", torch.float32).contiguous()


def export_vllm(art, base, out: Path, dtype: str = "float32") -> list[Path]:
    """``soft_rows.pt`` (``torch.save``d ``[n_virtual, hidden]`` in ``dtype``, what vLLM's
    ``prompt_embeds`` carry), ``soft_rows.safetensors`` and ``vllm_prompt.json`` (template parts,
    dtype, base model); docs/vllm.md has the client that builds a request from them."""
    from safetensors.torch import save_file

    rows = _vectors(art).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(rows, out / "soft_rows.pt")
    save_file({"soft_rows": rows}, str(out / "soft_rows.safetensors"))
    fmt = art.prompt_format(base)
    spec = {"format": "softprompt-vllm", "version": 1, "kind": art.kind, "template": art.template.to_string(),
            "chat": fmt.chat, "system": fmt.system, "n_virtual": int(rows.shape[0]), "hidden_size": int(rows.shape[1]),
            "dtype": dtype, "base_model": base.fingerprint, **template_parts(fmt)}
    (out / "vllm_prompt.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    return [out / "soft_rows.pt", out / "soft_rows.safetensors", out / "vllm_prompt.json"]


def export_trtllm(art, base, out: Path, name: str, dtype: str = "float16") -> list[Path]:
    """A TensorRT-LLM prompt table: ``prompt_table.npy`` ``[1, n_virtual, hidden]`` (task 0),
    ``task_ids.json`` and ``trtllm_prompt.json`` (virtual token ``k`` is id ``vocab_size + k``; the
    template parts say where they go)."""
    import numpy as np

    rows = _vectors(art)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "prompt_table.npy", rows.numpy().astype(dtype)[None])
    vocab = int(base.fingerprint["vocab_size"])
    (out / "task_ids.json").write_text(json.dumps({name: 0}, indent=2) + "\n")
    fmt = art.prompt_format(base)
    spec = {"format": "softprompt-trtllm", "version": 1, "kind": art.kind, "template": art.template.to_string(),
            "chat": fmt.chat, "system": fmt.system, "task_id": 0, "vocab_size": vocab,
            "prompt_vocab_size": int(rows.shape[0]), "virtual_token_ids": [vocab + k for k in range(rows.shape[0])],
            "hidden_size": int(rows.shape[1]), "dtype": dtype, "base_model": base.fingerprint, **template_parts(fmt)}
    (out / "trtllm_prompt.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    return [out / "prompt_table.npy", out / "task_ids.json", out / "trtllm_prompt.json"]
