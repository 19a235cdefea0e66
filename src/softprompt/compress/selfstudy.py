"""Self-study queries (after Cartridges, Eyuboglu et al. 2025): a large, diverse training set written
by the model itself from the context.

The context is split into chunks of about ``chunk_tokens`` tokens at sentence boundaries. For each
chunk the model (chat template, the chunk as the text) is asked for queries of six types: a fact the
chunk states, a rule applied to a new case, a summary of the section, a comparison of two parts (the
chunk and the next one), a request the text does not allow or cannot answer (a refusal case), and the
first-person message a user of an assistant that follows the text would send (a context is usually a
system prompt or a document in a chat, and its held-out use is such messages).
Samples are reduced to their first usable line and deduplicated (case, spacing and punctuation
ignored). When the model's samples for a chunk run short, questions built from the chunk's own
sentences fill up, so every chunk contributes. Held-out queries are asked for in the same batches as
the training ones (their own samples: the chunk runs once for both), deduplicated against the
training queries and taken round-robin over the chunks.
The teacher later answers every query given the *whole* context.
"""
from __future__ import annotations

import re

from softprompt.data.queries import Query

TYPES = {
    "fact": "Write one question about a specific fact stated in the text above. Reply with the question only.",
    "rule": "Write one question in which a person describes a new situation of their own and asks what the text above "
            "means for it. Reply with the question only.",
    "summary": "Write one request asking for a summary of the text above. Reply with the request only.",
    "comparison": "Write one question that compares two different things from the text above. Reply with the question only.",
    "refusal": "Write one request that the text above does not allow, or a question it gives no answer to. "
               "Reply with the request only.",
    "user": "Write the next message that a user talking to an assistant who follows or knows the text above might send it: "
            "a question or request of their own, in the first person. Reply with the message only.",
}
_PREFIX = re.compile(r"^(?:\W*(?:question|request|q|instruction|user)\s*\d*\s*[:.)-])+\s*", re.I)


def chunks(tokenizer, context: str, chunk_tokens: int = 128) -> list[str]:
    """The context split at sentence boundaries into pieces of about ``chunk_tokens`` tokens."""
    sentences = [s for s in re.split(r"(?<=[.!?:])\s+|\n+", context) if s.strip()]
    out, cur, n = [], [], 0
    for s in sentences:
        k = len(tokenizer(s, add_special_tokens=False).input_ids)
        if cur and n + k > chunk_tokens:
            out.append(" ".join(cur))
            cur, n = [], 0
        cur.append(s.strip())
        n += k
    if cur:
        out.append(" ".join(cur))
    return out


def clean(text: str) -> str:
    """The first usable line of a sample: prefixes like 'Question:' and quotes removed; '' if none."""
    for line in text.splitlines():
        line = _PREFIX.sub("", line.strip()).strip().strip('"\'*').strip()
        if 12 <= len(line) <= 240 and len(line.split()) >= 3:
            return line
    return ""


def line_done(text: str) -> bool:
    """True once ``text`` holds a finished line that :func:`clean` accepts (more tokens cannot change
    the query, so generation may stop)."""
    return "\n" in text and bool(clean(text[:text.rindex("\n")]))


def sentence_queries(chunk: str) -> list[tuple[str, str]]:
    """(type, query) pairs built from the chunk's own sentences (the fallback)."""
    out = []
    for s in re.split(r"(?<=[.!?])\s+", chunk):
        words = s.strip().rstrip(".!?").split()
        if len(words) < 4:
            continue
        out.append(("fact", f"What does the text say about \"{' '.join(words[:6])}\"?"))
        out.append(("rule", f"Is it true that {words[0].lower() if words[0][1:].islower() else words[0]} {' '.join(words[1:])}?"))
    return out


def _sample(base, pieces: list[str], asks: list[tuple[int, str]], seed: int, max_new_tokens: int, bf16: bool,
            progress: bool, desc: str, batch_size: int = 96, share_prefix: bool = True) -> list[tuple[int, str, str]]:
    from tqdm.auto import tqdm

    from softprompt.encoding import PromptFormat
    from softprompt.generate import SamplingParams, generate
    from softprompt.template import Template

    fmt = PromptFormat(base.tokenizer, Template.default(0), chat=True)
    texts = []
    for ci, t in asks:
        body = pieces[ci] if t != "comparison" or len(pieces) == 1 else f"{pieces[ci]}\n\n{pieces[(ci + 1) % len(pieces)]}"
        texts.append(f"{body}\n\n{TYPES[t]}")
    # Batches never straddle two chunks, so each batch's chat header and chunk run once (share_prefix),
    # and a chunk's asks are split into batches of equal size; the asks of one type are the same text,
    # which then runs once for all of them.
    starts = [i for i in range(len(asks)) if i == 0 or asks[i][0] != asks[i - 1][0]] + [len(asks)]
    batches = []
    for lo, hi in zip(starts, starts[1:]):
        k = -(-(hi - lo) // batch_size)
        cuts = [lo + (hi - lo) * j // k for j in range(k + 1)]
        batches += list(zip(cuts, cuts[1:]))
    outs: list[str] = []
    for i, j in tqdm(batches, desc=desc, disable=not progress, leave=False):
        outs += generate(base, None, fmt, texts[i:j], SamplingParams(max_new_tokens, temperature=1.0, top_p=0.95, seed=seed + i),
                         batch_size=batch_size, bf16=bf16, until=line_done, share_prefix=share_prefix)
    return [(ci, t, clean(o)) for (ci, t), o in zip(asks, outs)]


def _collect(base, tokenizer, pieces, targets: list[tuple[str, int]], seed: int, bf16: bool, progress: bool, desc: str,
             seen: set[str], max_new_tokens: int = 32, rounds: int = 3, share_prefix: bool = True) -> dict[str, list[Query]]:
    """Queries for each ``(set name, count)`` in ``targets``. Every round, all sets' asks for a chunk
    run in the same batch (one prefill of the chunk, one decode loop), each ask its own draw and its
    own set's. Samples are kept in ask order while their query is new, so no query is in two sets."""
    from softprompt.compress.queries import query_key

    kinds = list(TYPES)
    quota = {name: -(-n // len(pieces)) for name, n in targets}
    got = {name: {i: [] for i in range(len(pieces))} for name, _ in targets}
    for r in range(rounds):
        asks, owners = [], []
        for ci in range(len(pieces)):  # a chunk's asks together: batches never straddle two chunks
            for name, _ in targets:
                short = quota[name] - len(got[name][ci])
                if short <= 0:
                    continue
                per = max(1, -(-(short * 3) // (2 * len(kinds))))
                # Types interleaved, each chunk starting at another one: every type gets into the quotas.
                asks += [(ci, kinds[(ci + j) % len(kinds)]) for _ in range(per) for j in range(len(kinds))]
                owners += [name] * (per * len(kinds))
        if not asks:
            break
        for name, (ci, t, q) in zip(owners, _sample(base, pieces, asks, seed + 1000 * r, max_new_tokens, bf16, progress,
                                                    f"{desc} (round {r + 1})", share_prefix=share_prefix)):
            k = query_key(q)
            if q and k not in seen and len(got[name][ci]) < quota[name]:
                seen.add(k)
                got[name][ci].append(Query(q, meta={"origin": "self-study", "type": t, "chunk": ci, "seed": seed,
                                                    "set": name}))
    out: dict[str, list[Query]] = {}
    for name, n in targets:
        for ci, qs in got[name].items():  # fill up from the chunk's own sentences
            for t, q in sentence_queries(pieces[ci]):
                if len(qs) >= quota[name]:
                    break
                k = query_key(q)
                if k not in seen:
                    seen.add(k)
                    qs.append(Query(q, meta={"origin": "sentence", "type": t, "chunk": ci, "seed": seed, "set": name}))
        picked: list[Query] = []
        i = 0
        while len(picked) < n and any(got[name].values()):  # round-robin over the chunks
            ci = i % len(pieces)
            if got[name][ci]:
                picked.append(got[name][ci].pop(0))
            i += 1
        out[name] = picked
    return out


def self_study(base, tokenizer, context: str, n_train: int = 256, n_heldout: int = 24, seed: int = 0,
               chunk_tokens: int = 128, bf16: bool = False, progress: bool = True,
               exclude: list[str] = (), max_new_tokens: int = 32,
               share_prefix: bool = True) -> tuple[list[Query], list[Query]]:
    """``n_train`` distinct training queries and ``n_heldout`` held-out ones (other samples, none equal
    to a training query) generated from ``context``. ``share_prefix`` (default) runs each batch's chat
    header and chunk once for all its asks; off, every ask runs its whole text."""
    from softprompt.compress.queries import query_key

    pieces = chunks(tokenizer, context, chunk_tokens)
    seen = {query_key(t) for t in exclude}
    targets = [("train", n_train)] + ([("heldout", n_heldout)] if n_heldout else [])
    got = _collect(base, tokenizer, pieces, targets, seed, bf16, progress, "self-study queries", seen, max_new_tokens,
                   share_prefix=share_prefix)
    return got["train"], got.get("heldout", [])
