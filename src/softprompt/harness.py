"""The ``softprompt`` model for EleutherAI's lm-evaluation-harness (PyPI ``lm-eval``): a frozen base
model with a soft prompt of any kind applied, so the harness's tasks run on a soft-prompted model.

Importing this module registers the model with lm-eval's registry (lm-eval 0.4 has no plugin
discovery, so a plain ``lm_eval --model softprompt`` cannot find it): ``softprompt lm-eval ARGS`` runs
lm-eval's own command line after the import, and in Python ``import softprompt.harness`` comes before
``lm_eval.simple_evaluate(model="softprompt", model_args="model=smollm2,prompt=DIR", ...)``.

Each request's context fills the prompt's template field (``[soft:20] Review: {sentence}\\nSentiment:``
renders it inside the template, with the chat template when the prompt was trained with one) and
the continuation is the target, so a request is scored as ``softprompt eval`` scores a label:

* ``loglikelihood``: the continuation's total log-probability and whether it is the greedy one
  (``scoring.continuation_scores``); with ``target_eos=true`` the end-of-turn token the prompt was
  trained to emit after a target is part of it, as in ``softprompt eval``'s label ranking;
* ``loglikelihood_rolling``: the document as the continuation of an empty context, in windows of
  the model's length, each after the prompt;
* ``generate_until``: ``generate.generate`` with the request's ``until`` stop strings,
  ``max_gen_toks``, and sampling settings.

Without ``prompt`` it is the bare model on the plain text (``{input}``, no chat template), which is
what lm-eval's own ``hf`` model computes.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from tqdm import tqdm

from softprompt.artifact import load_artifact, read_meta
from softprompt.base_model import default_device, load_base
from softprompt.data.examples import Example
from softprompt.encoding import IGNORE, Encoded, PromptFormat
from softprompt.errors import SoftPromptError
from softprompt.generate import SamplingParams, generate
from softprompt.precision import resolve_precision
from softprompt.scoring import continuation_scores
from softprompt.template import parse_template

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - depends on the environment
    raise SoftPromptError(f"the lm-eval harness is not installed ({e}): pip install 'softprompt[harness]'") from None

log = logging.getLogger(__name__)
NAME = "softprompt"
DEFAULT_BATCH = 16
GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "seed"}


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise SoftPromptError(f"model_args {name}={value!r}: expected true or false")


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise SoftPromptError(f"batch_size={value!r}: expected a positive integer or auto") from None
    if n < 1:
        raise SoftPromptError(f"batch_size={value!r}: expected a positive integer or auto")
    return n


def _device(device: str | None) -> str | None:
    """lm-eval's command line passes ``cuda`` unless told otherwise; without CUDA that means the default."""
    import torch

    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("softprompt harness: device %s is not available; using %s", device, default_device())
        return None
    return device


class SoftPromptLM(LM):
    """lm-eval model arguments: ``model`` (base model: ``smollm2``, a local directory or a hub id;
    default: the one the prompt was trained on), ``prompt`` (a prompt artifact directory; none: the
    bare model), ``precision`` (auto | fp32 | bf16; default $SOFTPROMPT_PRECISION or auto), ``target_eos`` (score the end-of-turn token after
    each continuation), ``chat`` (bare model only: wrap contexts in the chat template), and lm-eval's
    ``batch_size``, ``max_batch_size`` and ``device``."""

    def __init__(self, model: str | None = None, prompt: str | None = None, precision: str | None = None,
                 target_eos: bool | str = False, chat: bool | str = False, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, device: str | None = None, **unknown):
        super().__init__()
        device = _device(device)
        if unknown:
            raise SoftPromptError(f"unknown model_args for {NAME}: {', '.join(sorted(unknown))} (known: model, prompt, "
                                  "precision, target_eos, chat, batch_size, device)")
        if prompt:
            self.base = load_base(str(model or read_meta(prompt)["base_model"]["id"]), device=device)
            art = load_artifact(prompt, base=self.base)
            self.prompt, self.fmt = art.prompt, art.prompt_format(self.base)
        else:
            self.base = load_base(str(model or "smollm2"), device=device)
            self.prompt = None
            self.fmt = PromptFormat(self.base.tokenizer, parse_template("{input}"), chat=_flag(chat, "chat"),
                                    max_length=self.base.max_positions)
        fields = self.fmt.template.fields
        if len(fields) != 1:
            raise SoftPromptError(f"prompt {prompt}: its template has the fields {', '.join(fields) or 'none'}; the harness "
                                  "puts each request's context into one field, so it takes templates with exactly one")
        self.field = fields[0]
        self.target_eos = _flag(target_eos, "target_eos")
        self.bf16 = resolve_precision(precision or os.environ.get("SOFTPROMPT_PRECISION", "auto"), self.base.device).bf16
        self.batch_size = _batch_size(batch_size)
        tok = self.base.tokenizer
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    # -- encoding -----------------------------------------------------------------------------
    def _example(self, context: str, req) -> Example:
        return Example({self.field: context}, source=f"lm-eval task {getattr(req, 'task_name', None)} doc",
                       line=getattr(req, "doc_id", None))

    def _encode(self, context: str, continuation: str, req) -> Encoded:
        enc = self.fmt.encode(self._example(context, req), target=continuation, eos=self.target_eos)
        if enc.n_prompt == 0:  # the bare model on an empty context: condition on BOS (or EOS), as lm-eval's hf does
            enc = Encoded([self.prefix_id] + enc.ids, [IGNORE] + enc.labels, 1, enc.example)
        return enc

    def _score(self, items: list[Encoded], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        bar = tqdm(total=len(items), desc=desc, disable=disable_tqdm)
        try:
            return continuation_scores(self.base.model, self.prompt, items, self.base.tokenizer.pad_token_id,
                                       batch_size=self.batch_size, bf16=self.bf16, progress=bar.update)
        finally:
            bar.close()

    # -- the three request types ---------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        items = [self._encode(*req.args, req) for req in requests]
        out = self._score(items, "softprompt loglikelihood", disable_tqdm)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def _windows(self, text: str, req) -> list[Encoded]:
        ex = self._example("", req)
        head = self.fmt.prompt_ids(ex)  # the prompt before the document (empty for the bare model)
        rendered = self.fmt.render(ex)
        doc = self.fmt.target_ids(text, rendered[-1:].isspace() if rendered else True, eos=False)
        room = self.base.max_positions - len(head) - 1
        if room < 2:
            raise SoftPromptError(f"the prompt takes {len(head)} of the model's {self.base.max_positions} positions: "
                                  "no room for a rolling window")
        first = True
        out = []
        for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(doc, self.prefix_id, room, 1)):
            if first and head:
                ctx = []  # the prompt itself conditions the first token
            ids = head + ctx + pred
            out.append(Encoded(ids, [IGNORE] * (len(ids) - len(pred)) + pred, len(ids) - len(pred)))
            first = False
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows = [self._windows(req.args[0], req) for req in requests]
        flat = [w for ws in windows for w in ws]
        scores = iter(self._score(flat, "softprompt loglikelihood_rolling", disable_tqdm))
        out = []
        for req, ws in zip(requests, windows):
            total = sum(next(scores)[0] for _ in ws)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    def _params(self, kwargs: dict) -> SamplingParams:
        extra = sorted(set(kwargs) - GEN_KEYS)
        if extra:
            log.warning("softprompt harness: ignoring generation settings %s (supported: %s)", extra, sorted(GEN_KEYS))
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = _flag(kwargs.get("do_sample", False), "do_sample")
        temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0) or 0.0)
        if sample and temperature <= 0:
            temperature = 1.0
        return SamplingParams(max_new_tokens=int(kwargs.get("max_gen_toks", 256)), temperature=temperature if sample else 0.0,
                              top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=int(kwargs.get("seed", 0)) if sample else None,
                              stop=tuple(until))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="softprompt generate_until", disable=disable_tqdm)
        for idx in groups.values():
            params = self._params(dict(requests[idx[0]].args[1]))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                exs = [self._example(requests[i].args[0], requests[i]) for i in chunk]
                texts = generate(self.base, self.prompt, self.fmt, exs, params, batch_size=self.batch_size, bf16=self.bf16)
                for i, text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


def main(argv: list[str]) -> int:
    """lm-eval's command line (``lm-eval run ...``, or its arguments alone) with the ``softprompt`` model
    registered; what ``softprompt lm-eval ARGS`` runs."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


# lm-eval registers its own models (hf, vllm, ...) lazily, only while the registry is empty: do that
# first, or registering ours would hide them.
import lm_eval.models  # noqa: E402,F401

if NAME not in model_registry:  # importing twice (or reloading) keeps the first registration
    register_model(NAME)(SoftPromptLM)
