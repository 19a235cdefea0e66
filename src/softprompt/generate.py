"""Generation with a soft prompt: batched greedy or sampled decoding over a KV cache, optionally
streamed. Prefill runs the prompt's own ``model_inputs``; each later step feeds one token per row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from softprompt.base_model import BaseModel
from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat, collate
from softprompt.hf_cache import cache_kw, cache_of
from softprompt.kv_prefix import after_prefix, grow_in_place, kv_cache, layer_kv, reusable_prefix, select_rows
from softprompt.objectives import split_model
from softprompt.precision import autocast
from softprompt.prompts import SoftPrompt, as_prompt


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                rows: torch.Tensor | None = None, n_rows: int | None = None) -> torch.Tensor:
    """Next token per row from ``[batch, vocab]`` logits. Sampling is torch.multinomial's own method
    for one draw (``argmax(p / q)``, ``q ~ Exp(1)``). With ``rows`` (the batch's rows among
    ``n_rows``), the noise is drawn for all ``n_rows`` and the given rows' taken, so a row draws the
    same as in the full batch after others have left it."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    if rows is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    q = probs.new_empty(n_rows, probs.shape[-1]).exponential_(1, generator=generator)[rows]
    return (probs / q).argmax(-1)


@torch.no_grad()
def generate_ids(model, prompt: SoftPrompt | None, batch: dict, params: SamplingParams, eos_ids: list[int],
                 on_token: Callable[[int, int], bool | None] | None = None, bf16: bool = False) -> list[list[int]]:
    """New token ids per row for a left-padded batch (``input_ids`` may hold slot markers). A row ends at
    an end-of-sequence token, or when ``on_token(row, token)`` returns True; the batch ends when every row has."""
    device = next(model.parameters()).device
    inputs = as_prompt(prompt).model_inputs(model, batch["input_ids"], batch["attention_mask"])
    with autocast(device, bf16):
        res = model(**inputs, use_cache=True)
    return _decode(model, res.logits[:, -1], cache_of(res), inputs["attention_mask"], inputs["position_ids"][:, -1] + 1,
                   params, eos_ids, on_token, bf16)


@torch.no_grad()
def generate_ids_shared(model, rows: list[list[int]], params: SamplingParams, eos_ids: list[int],
                        on_token: Callable[[int, int], bool | None] | None = None, bf16: bool = False) -> list[list[int]]:
    """:func:`generate_ids` for plain token rows (no soft prompt) whose longest common prefix runs
    once: its keys/values are shared by every row (expanded, not copied), each row's own tokens are
    right-padded and masked after it, and every row keeps its own positions. Rows that are equal
    (several samples of one prompt) run their own tokens once too; the LM head runs only at each
    row's last position."""
    device = next(model.parameters()).device
    prefix = reusable_prefix(rows)
    distinct: dict[tuple[int, ...], int] = {}
    which = [distinct.setdefault(tuple(r), len(distinct)) for r in rows]
    urows = [list(r) for r in distinct]
    n, u, P = len(rows), len(urows), len(prefix)
    cache = None
    if P:
        once = DynamicCache(config=model.config)
        with autocast(device, bf16):
            model(input_ids=torch.tensor([prefix], device=device), position_ids=torch.arange(P, device=device)[None],
                  **cache_kw(once), use_cache=True)
        keys, values = layer_kv(once)
        cache = kv_cache(list(zip(keys, values)), u, device, keys[0].dtype, config=model.config)
    ids, mask, pos, lens = after_prefix(urows, P, device)
    at = (torch.arange(u, device=device), torch.tensor(lens, device=device) - 1)
    parts = split_model(model)
    with autocast(device, bf16):
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                  **(cache_kw(cache) if cache is not None else {}))
        if parts is not None:
            res = parts[0](**kw)
            last = parts[1](res.last_hidden_state[at])
        else:
            res = model(**kw)
            last = res.logits[at]
    cache = cache_of(res)
    if u < n:  # every row gets its own copy of its distinct row's cache (with room to decode into)
        index = torch.tensor(which, device=device)
        cache, last, mask = select_rows(cache, index), last[index], mask[index]
    return _decode(model, last, cache, mask, torch.tensor([len(r) for r in rows], device=device),
                   params, eos_ids, on_token, bf16)


def _decode(model, logits: torch.Tensor, cache, mask: torch.Tensor, next_pos: torch.Tensor, params: SamplingParams,
            eos_ids: list[int], on_token: Callable[[int, int], bool | None] | None, bf16: bool) -> list[list[int]]:
    """The decoding loop after a prefill: ``logits`` ``[batch, vocab]`` predict each row's next token,
    which goes at ``next_pos``; ``mask`` covers every position in ``cache``. Finished rows leave the
    batch once a quarter of it has finished (their cache rows are dropped), so they cost no more steps."""
    device = logits.device
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    n = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))  # the original row of each row still in the batch
    done = torch.zeros(n, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids or [-1], device=device)
    cache = grow_in_place(cache, params.max_new_tokens)  # each step appends in place, no copy of the cache
    for step in range(params.max_new_tokens):
        nxt = sample_next(logits, params, gen, torch.tensor(live, device=device), n)
        for i in (~done).nonzero().flatten().tolist():
            tok = int(nxt[i])
            if tok in eos_ids:
                continue
            out[live[i]].append(tok)
            if on_token and on_token(live[i], tok):
                done[i] = True
        done |= torch.isin(nxt, eos)
        if done.all():
            break
        if 4 * int(done.sum()) >= len(live):  # drop the finished rows
            keep = (~done).nonzero().flatten()
            live = [live[i] for i in keep.tolist()]
            cache = grow_in_place(select_rows(cache, keep), params.max_new_tokens - step - 1)
            nxt, mask, next_pos, done = nxt[keep], mask[keep], next_pos[keep], done[keep]
        m = len(live)
        mask = torch.cat([mask, torch.ones(m, 1, dtype=mask.dtype, device=device)], 1)
        with autocast(device, bf16):
            res = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=next_pos.unsqueeze(1),
                        **cache_kw(cache), use_cache=True)
        cache, next_pos, logits = cache_of(res), next_pos + 1, res.logits[:, -1]
    return out


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def generate(base: BaseModel, prompt: SoftPrompt | None, fmt: PromptFormat, inputs: list[str | Example],
             params: SamplingParams | None = None, batch_size: int = 8, bf16: bool = False,
             stream: Callable[[int, str], None] | None = None, field: str | None = None,
             until: Callable[[str], bool] | None = None, share_prefix: bool = False) -> list[str]:
    """Complete each input (a text for the template's first field, or an Example) and return the
    decoded continuations. ``stream(i, piece)`` receives text as it is produced; a row stops early
    once ``until(text so far)`` is true (the batch stops when every row has). With ``share_prefix``
    (no soft prompt), each batch's longest common token prefix runs once (:func:`generate_ids_shared`):
    inputs that repeat a long text should be ordered so that a batch shares it."""
    params = params or SamplingParams()
    if share_prefix and prompt is not None:
        raise ValueError("generate: share_prefix runs plain token rows; it takes no soft prompt")
    field = field or (fmt.template.fields[0] if fmt.template.fields else "input")
    examples = [x if isinstance(x, Example) else Example({field: x}) for x in inputs]
    tok = base.tokenizer
    results: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        enc = [fmt.encode(e, with_target=False) for e in chunk]
        batch = {k: v.to(base.device) for k, v in collate(enc, tok.pad_token_id, left=True).items()}
        emitted = [""] * len(chunk)
        ids_so_far: list[list[int]] = [[] for _ in chunk]

        def on_token(i: int, t: int, ids_so_far: list[list[int]] = ids_so_far, emitted: list[str] = emitted,
                     start: int = start) -> bool:
            ids_so_far[i].append(t)
            if not stream and not until:
                return False
            text = _cut_at_stop(tok.decode(ids_so_far[i], skip_special_tokens=True), params.stop)
            if stream and len(text) > len(emitted[i]) and not text.endswith("\ufffd"):
                stream(start + i, text[len(emitted[i]):])
                emitted[i] = text
            return bool(until and until(text))

        if share_prefix:
            ids = generate_ids_shared(base.model, [list(e.ids) for e in enc], params, base.eos_ids(), on_token, bf16=bf16)
        else:
            ids = generate_ids(base.model, prompt, batch, params, base.eos_ids(), on_token, bf16=bf16)
        for i, row in enumerate(ids):
            text = _cut_at_stop(tok.decode(row, skip_special_tokens=True), params.stop)
            if stream and len(text) > len(emitted[i]):
                stream(start + i, text[len(emitted[i]):])
            results.append(text)
    return results
