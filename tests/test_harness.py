"""The lm-evaluation-harness model (softprompt.harness) on the task YAMLs in bench/harness_tasks/,
which read SST-2 from ../shared/data: its scores equal ``softprompt eval``'s for a prompt of each
kind, without a prompt they equal lm-eval's own ``hf`` model, and generation honours ``until`` and
``max_gen_toks``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED_DATA, need, need_module

need_module("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import softprompt.harness  # noqa: E402,F401 - registers the model
from softprompt.artifact import build_meta, load_artifact, save_artifact  # noqa: E402
from softprompt.data import load_recipe, load_split  # noqa: E402
from softprompt.encoding import PromptFormat  # noqa: E402
from softprompt.errors import SoftPromptError  # noqa: E402
from softprompt.evaluate import evaluate, soft_contender  # noqa: E402
from softprompt.harness import SoftPromptLM  # noqa: E402
from softprompt.prompts import PrefixTuning, PromptTuning, PTuning  # noqa: E402
from softprompt.scoring import label_logprobs  # noqa: E402
from softprompt.template import parse_template  # noqa: E402

TASKS = REPO / "bench" / "harness_tasks"
N = 12


@pytest.fixture(scope="module")
def sst2_test():
    need((SHARED_DATA / "sst2-sentences").exists(), f"public datasets not found at {SHARED_DATA}")
    return load_split(load_recipe("sst2"), SHARED_DATA, "test", limit=N, seed=0)


def run_harness(model: str, model_args: dict, tasks: list[str], limit: int = N, **kw) -> dict:
    """lm-eval's simple_evaluate on our task YAMLs; the tasks' datasets are the same seeded sample of
    ``limit`` examples that ``softprompt eval --limit`` takes."""
    tm = TaskManager(include_path=str(TASKS), metadata={"sample": limit, "sample_seed": 0, "data_dir": str(SHARED_DATA)})
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=tm, log_samples=True,
                           batch_size=kw.pop("batch_size", 4), device="cpu", random_seed=0, numpy_random_seed=0,
                           torch_random_seed=0, fewshot_random_seed=0, **kw)


def choice_scores(res: dict, task: str) -> list[list[float]]:
    """[doc][choice] log-likelihoods lm-eval received, in doc order."""
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def make_prompt(base, root, kind: str):
    torch.manual_seed(0)
    h = base.model.config.hidden_size
    if kind == "prompt-tuning":
        prompt, template, chat = PromptTuning(4, h, init=torch.randn(4, h)), "[soft:4] Review: {sentence}\nSentiment:", True
    elif kind == "hybrid-plain":
        prompt, template, chat = PromptTuning(4, h, init=torch.randn(4, h)), "[soft:2] Review: {sentence} [soft:2] Sentiment:", False
    elif kind == "p-tuning":
        prompt, template, chat = PTuning.create(5, base, torch.randn(5, h), {"encoder": "mlp"}), "[soft:5] {sentence}", True
    else:
        prompt, template, chat = PrefixTuning.create(5, base, torch.randn(5, h)), "Review: {sentence}\nSentiment:", True
    prompt.eval()
    fmt = PromptFormat(base.tokenizer, parse_template(template), chat=chat)
    return save_artifact(root / kind, prompt, build_meta(prompt, template, base, format=fmt.describe()))


@pytest.mark.parametrize("kind", ["prompt-tuning", "hybrid-plain", "p-tuning", "prefix"])
def test_prompt_scores_equal_softprompt_eval(tiny, tiny_dir, tmp_path, sst2_test, kind):
    path = make_prompt(tiny, tmp_path, kind)
    art = load_artifact(path, base=tiny)
    labels = load_recipe("sst2").label_words
    res = run_harness("softprompt", {"model": str(tiny_dir), "prompt": str(path), "target_eos": True}, ["softprompt_sst2"])
    docs = sorted(res["samples"]["softprompt_sst2"], key=lambda s: s["doc_id"])
    assert [d["doc"]["sentence"] for d in docs] == [e.fields["sentence"] for e in sst2_test]  # the same examples
    ours = label_logprobs(tiny.model, art.prompt, art.prompt_format(tiny), sst2_test, labels)
    assert torch.allclose(torch.tensor(choice_scores(res, "softprompt_sst2")), ours, atol=1e-4)
    ev = evaluate(tiny, [soft_contender(tiny, art)], sst2_test, "accuracy", labels, resamples=10)[0]
    assert res["results"]["softprompt_sst2"]["acc,none"] == pytest.approx(ev.score, abs=1e-12)


def test_without_target_eos_the_continuation_alone_is_scored(tiny, tiny_dir, tmp_path, sst2_test):
    path = make_prompt(tiny, tmp_path, "prompt-tuning")
    with_eos = choice_scores(run_harness("softprompt", {"model": str(tiny_dir), "prompt": str(path), "target_eos": True},
                                         ["softprompt_sst2"], limit=3), "softprompt_sst2")
    without = choice_scores(run_harness("softprompt", {"model": str(tiny_dir), "prompt": str(path)},
                                        ["softprompt_sst2"], limit=3), "softprompt_sst2")
    assert all(a < b for ra, rb in zip(with_eos, without) for a, b in zip(ra, rb))  # one more token's log-probability


def test_bare_model_equals_lm_eval_hf(tiny_dir, sst2_test):
    tasks = ["softprompt_sst2_hard", "softprompt_sst2_gen", "softprompt_sst2_ppl"]
    ours = run_harness("softprompt", {"model": str(tiny_dir)}, tasks)
    hf = run_harness("hf", {"pretrained": str(tiny_dir), "dtype": "float32"}, tasks)
    assert torch.allclose(torch.tensor(choice_scores(ours, tasks[0])), torch.tensor(choice_scores(hf, tasks[0])), atol=1e-4)
    assert ours["results"][tasks[0]]["acc,none"] == hf["results"][tasks[0]]["acc,none"]
    gen = [sorted(r["samples"][tasks[1]], key=lambda s: s["doc_id"]) for r in (ours, hf)]
    assert [s["resps"][0][0] for s in gen[0]] == [s["resps"][0][0] for s in gen[1]]
    ppl = [sorted(r["samples"][tasks[2]], key=lambda s: s["doc_id"]) for r in (ours, hf)]
    assert torch.allclose(torch.tensor([float(s["resps"][0][0]) for s in ppl[0]]),
                          torch.tensor([float(s["resps"][0][0]) for s in ppl[1]]), atol=1e-4)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"][tasks[2]][metric] == pytest.approx(hf["results"][tasks[2]][metric], rel=1e-5)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i, ("test", i, 1)) for i, a in enumerate(args)]


def test_rolling_windows_equal_hf_on_a_long_document(tiny_dir):
    """A document longer than the model's 256 positions is scored in windows exactly as lm-eval's hf
    scores it with the same window (ours needs one position for the last target's input)."""
    from lm_eval.models.huggingface import HFLM

    text = " ".join(f"word{i} is followed by another" for i in range(120))
    ours = SoftPromptLM(model=str(tiny_dir), batch_size=2)
    assert len(ours.base.tokenizer(text).input_ids) > 2 * ours.base.max_positions
    hf = HFLM(pretrained=str(tiny_dir), dtype="float32", device="cpu", batch_size=2, max_length=ours.base.max_positions - 1)
    reqs = requests("loglikelihood_rolling", [(text,), ("short text",)])
    assert ours.loglikelihood_rolling(reqs, disable_tqdm=True) == pytest.approx(hf.loglikelihood_rolling(reqs, disable_tqdm=True), rel=1e-6)


def test_rolling_with_a_prompt_is_the_document_after_an_empty_context(tiny, tiny_dir, tmp_path):
    path = make_prompt(tiny, tmp_path, "prompt-tuning")
    lm = SoftPromptLM(model=str(tiny_dir), prompt=str(path))
    docs = ["the film was long", "a second, different document"]
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)
    direct = lm.loglikelihood(requests("loglikelihood", [("", d) for d in docs]), disable_tqdm=True)
    assert rolling == pytest.approx([r[0] for r in direct], abs=1e-4)


@pytest.mark.parametrize("kind", ["prompt-tuning", "prefix"])
def test_generate_until_respects_stop_strings_and_max_gen_toks(tiny, tiny_dir, tmp_path, kind):
    path = make_prompt(tiny, tmp_path, kind)
    lm = SoftPromptLM(model=str(tiny_dir), prompt=str(path), batch_size=2)
    tok = lm.base.tokenizer
    contexts = ["a gorgeous, witty film", "dull and far too long", "it 's a charming journey"]
    free = lm.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 16}) for c in contexts]), disable_tqdm=True)
    assert all(len(tok(t, add_special_tokens=False).input_ids) >= 8 for t in free)  # room to cut
    stops = [t[len(t) // 2:len(t) // 2 + 2] for t in free]
    cut = lm.generate_until(requests("generate_until", [(c, {"until": [s], "max_gen_toks": 16}) for c, s in zip(contexts, stops)]),
                            disable_tqdm=True)
    assert cut == [t[:t.find(s)] for t, s in zip(free, stops)]
    assert all(s not in c for c, s in zip(cut, stops))
    short = lm.generate_until(requests("generate_until", [(c, {"until": ["\u2603"], "max_gen_toks": 3}) for c in contexts]),
                              disable_tqdm=True)
    for s, t in zip(short, free):
        assert len(tok(s, add_special_tokens=False).input_ids) <= 3 and t.startswith(s) and len(s) < len(t)


def test_bad_model_args_are_one_clear_error(tiny, tiny_dir, tmp_path):
    with pytest.raises(SoftPromptError, match="unknown model_args for softprompt: promt"):
        SoftPromptLM(model=str(tiny_dir), promt="x")
    with pytest.raises(SoftPromptError, match="target_eos='maybe'"):
        SoftPromptLM(model=str(tiny_dir), target_eos="maybe")
    prompt = PromptTuning(2, tiny.model.config.hidden_size)
    two = save_artifact(tmp_path / "two", prompt, build_meta(prompt, "[soft:2] {a} and {b}", tiny, format={"chat": True}))
    with pytest.raises(SoftPromptError, match="fields a, b"):
        SoftPromptLM(model=str(tiny_dir), prompt=str(two))


def test_softprompt_lm_eval_command(tiny, tiny_dir, tmp_path, sst2_test):
    """The documented command: ``softprompt lm-eval`` forwards to lm-eval's own command line."""
    path = make_prompt(tiny, tmp_path, "prompt-tuning")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "softprompt", "lm-eval", "--model", "softprompt", "--model_args",
           f"model={tiny_dir},prompt={path},target_eos=true", "--tasks", "softprompt_sst2", "--include_path", str(TASKS),
           "--metadata", json.dumps({"sample": 4, "data_dir": str(SHARED_DATA)}), "--batch_size", "4", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["softprompt_sst2"]["acc,none"]
    art = load_artifact(path, base=tiny)
    exs = load_split(load_recipe("sst2"), SHARED_DATA, "test", limit=4, seed=0)
    assert acc == evaluate(tiny, [soft_contender(tiny, art)], exs, "accuracy", load_recipe("sst2").label_words, resamples=10)[0].score


@pytest.mark.slow
def test_smollm2_prompt_accuracy_equals_softprompt_eval(smollm2, tmp_path):
    """SmolLM2 with a 20-token prompt (initialized from text, as `softprompt train --init text:` does)
    on 50 SST-2 test sentences: lm-eval's accuracy is softprompt eval's."""
    need((SHARED_DATA / "sst2-sentences").exists(), f"public datasets not found at {SHARED_DATA}")
    from softprompt.init import init_vectors, parse_init

    recipe = load_recipe("sst2")
    template = recipe.soft_template_for(20)
    spec = parse_init("text:Classify the sentiment of this movie review as positive or negative.")
    vectors = init_vectors(spec, 20, smollm2.embedding.weight, smollm2.tokenizer, torch.Generator().manual_seed(0))
    prompt = PromptTuning(20, smollm2.model.config.hidden_size, init=vectors)
    fmt = PromptFormat(smollm2.tokenizer, parse_template(template), chat=recipe.chat)
    path = save_artifact(tmp_path / "sst2", prompt, build_meta(prompt, template, smollm2, format=fmt.describe()))
    art = load_artifact(path, base=smollm2)
    exs = load_split(recipe, SHARED_DATA, "test", limit=50, seed=0)
    ev = evaluate(smollm2, [soft_contender(smollm2, art)], exs, "accuracy", recipe.label_words, resamples=10)[0]
    res = run_harness("softprompt", {"model": "smollm2", "prompt": str(path), "target_eos": True, "precision": "fp32"},
                      ["softprompt_sst2"], limit=50, batch_size=16)
    assert res["results"]["softprompt_sst2"]["acc,none"] == pytest.approx(ev.score, abs=1e-12)
    ours = label_logprobs(smollm2.model, art.prompt, art.prompt_format(smollm2), exs, recipe.label_words)
    assert torch.allclose(torch.tensor(choice_scores(res, "softprompt_sst2")), ours, atol=1e-3)
