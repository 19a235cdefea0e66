"""A stand-in for a vLLM server, for the gateway tests that run without vLLM: it speaks the part of
vLLM's API that ``--engine vllm`` uses (``/health``, ``/v1/models``, streamed ``/v1/completions``
with ``prompt_embeds``) and really generates, greedily, with a transformers model on the embeddings
it receives, so what the gateway sends is checked by what comes back. It records every body, and
can be told to fail (``fail``: requests answer 503; ``down``: /health answers 503 too)."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class FakeVLLM:
    def __init__(self, model, tokenizer, eos_ids: list[int], max_model_len: int = 512):
        import uvicorn
        from serve_helpers import _free_port

        self.model, self.tok, self.eos = model, tokenizer, set(eos_ids)
        self.bodies: list[dict] = []
        self.fail = self.down = False
        self.delay = 0.0  # seconds per streamed token (a slow upstream)
        self.lock = threading.Lock()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = FastAPI()

        @app.get("/health")
        async def health():
            return JSONResponse({}, status_code=503 if self.down else 200)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": max_model_len}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            if self.fail or self.down:
                return JSONResponse({"error": {"message": "engine dead"}}, status_code=503)
            if "prompt" in body:
                return JSONResponse({"error": {"message": "The decoder prompt cannot be empty"}}, status_code=400)
            embeds = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
            out = self.greedy(embeds, body["max_tokens"])

            def stream():
                text_so_far = ""
                for i, t in enumerate(out):
                    time.sleep(self.delay)
                    text = self.tok.decode(out[:i + 1], skip_special_tokens=True)
                    delta, text_so_far = text[len(text_so_far):], text
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": delta, "token_ids": [t],
                                                               "finish_reason": None}]}) + "\n\n"
                reason = "stop" if out and out[-1] in self.eos else "length"
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": reason}]}) + "\n\n"
                yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": len(embeds),
                                                                      "completion_tokens": len(out)}}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        self.uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_tokens: int) -> list[int]:
        with self.lock:
            x = embeds.to(torch.float32).unsqueeze(0)
            out: list[int] = []
            emb = self.model.get_input_embeddings()
            for _ in range(max_tokens):
                t = int(self.model(inputs_embeds=x).logits[0, -1].argmax())
                out.append(t)
                if t in self.eos:
                    break
                x = torch.cat([x, emb(torch.tensor([[t]]))], 1)
            return out

    def __enter__(self) -> "FakeVLLM":
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)
