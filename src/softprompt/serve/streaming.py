"""Server-sent events for streamed completions and chat completions, and the pieces of a response
both forms share: token logprobs in OpenAI's shapes and usage over a request's choices."""
from __future__ import annotations

import asyncio
import json
from typing import Callable


class TokenLog:
    """One choice's token logprobs, collected from the engine's ``("token", ...)`` events and handed
    out in OpenAI's shape: ``{"content": [...]}`` for chat, ``tokens``/``token_logprobs``/
    ``top_logprobs``/``text_offset`` for completions (offsets count from the completion's start)."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat
        self.pending: list[tuple[int, float, list]] = []
        self.offset = 0

    def add(self, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        self.pending.append((token, logprob, top))

    def take(self) -> dict | None:
        """The pending tokens' logprobs (None when there are none), and forget them."""
        if not self.pending:
            return None
        items, self.pending = self.pending, []
        text = lambda t: self.tok.decode([t])  # noqa: E731
        if self.chat:
            def entry(t: int, lp: float) -> dict:
                s = text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]} for t, lp, top in items]}
        tokens = [text(t) for t, _, _ in items]
        offsets = []
        for s in tokens:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in items],
                "top_logprobs": [{text(a): b for a, b in top} for _, _, top in items], "text_offset": offsets}


def usage(per_choice: list[dict]) -> dict:
    """OpenAI usage for a request's choices: the prompt counted once, the completions summed."""
    first = per_choice[0]
    completion = sum(u["completion_tokens"] for u in per_choice)
    return {"prompt_tokens": first["prompt_tokens"], "completion_tokens": completion,
            "total_tokens": first["prompt_tokens"] + completion,
            "prompt_tokens_details": {"cached_tokens": first["cached_tokens"]}}


def _event(data: dict | str) -> str:
    return "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n"


async def event_stream(queue: asyncio.Queue, n: int, cancel: Callable[[], None], rid: str, model: str, created: int,
                       chat: bool, include_usage: bool, logs: list[TokenLog] | None = None):
    """The SSE lines for ``n`` choices whose engine events arrive on ``queue`` as ``(i, event)``;
    a chat stream opens each choice with the assistant role; ``data: [DONE]`` ends it. When the
    stream ends early (the client left, or a choice failed), ``cancel()`` frees the batch slots."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, delta: str | None, reason: str | None = None, first: bool = False) -> str:
        lps = logs[i].take() if logs is not None and not first else None  # the tokens behind this text
        if chat:
            d = ({"role": "assistant", "content": ""} if first else ({"content": delta} if delta is not None else {}))
            choice = {"index": i, "delta": d, "finish_reason": reason, "logprobs": lps}
        else:
            choice = {"index": i, "text": delta or "", "finish_reason": reason, "logprobs": lps}
        return _event({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})

    finished = False
    usages: dict[int, dict] = {}
    try:
        if chat:
            for i in range(n):
                yield chunk(i, None, first=True)
        while len(usages) < n:
            i, ev = await queue.get()
            if ev[0] == "delta":
                yield chunk(i, ev[1])
            elif ev[0] == "token":
                if logs is not None:
                    logs[i].add(*ev[1:])
            elif ev[0] == "error":
                finished = True
                err = {"message": ev[1], "type": "server_error", "param": None, "code": None}
                yield _event({"error": err})
                break
            else:
                _, reason, usages[i] = ev
                yield chunk(i, None, reason)
        else:
            finished = True
            if include_usage:
                yield _event({"id": rid, "object": obj, "created": created, "model": model,
                              "choices": [], "usage": usage([usages[i] for i in range(n)])})
        yield _event("[DONE]")
    finally:
        if not finished:  # the client went away mid-stream (or a choice failed): free the batch slots
            cancel()
