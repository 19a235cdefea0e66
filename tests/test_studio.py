"""The web studio (docs/studio.md): its JSON endpoints and their key scoping, the static page, the
CLI switch, and end to end in headless Chromium (marked ``browser``) against a live server with two
tiny-model prompts and two keys. The browser tests take a screenshot of each page; with
SOFTPROMPT_SCREENSHOTS=1 they go to docs/studio/ (the ones the docs show), else to a temporary directory."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from serve_helpers import LiveServer, http

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "studio"
CHROMIUM = "/usr/bin/chromium"
KEY_A, KEY_B = "sk-studio-a", "sk-studio-b"
TRAINED, RANDOM = "sentiment", "random-pt"  # names that appear nowhere else on the page


@pytest.fixture(scope="module")
def studio_dir(base, prompts_dir, tmp_path_factory) -> Path:
    """Two prompts (one trained, with its training log, an eval report and an inspection with
    projection fidelity), copied so that the tests may append to the log."""
    from softprompt.artifact import load_artifact
    from softprompt.data.examples import Example
    from softprompt.evaluate import evaluate, hard_contender, save_report, soft_contender
    from softprompt.interpret.fidelity import input_vectors, projection_fidelity
    from softprompt.interpret.report import nearest_report, write_report

    root = tmp_path_factory.mktemp("studio")
    shutil.copytree(prompts_dir / "trained", root / TRAINED)
    shutil.copytree(prompts_dir / "pt", root / RANDOM)
    art = load_artifact(root / TRAINED, base=base)
    dev = [Example({"input": t}, y) for t, y in [("good movie", "positive"), ("bad film", "negative"),
                                                 ("a fine film", "positive"), ("dull", "negative")]]
    labels = art.meta.get("labels")
    res = evaluate(base, [soft_contender(base, art), hard_contender(base, "hand-written", "Review: {input} Sentiment:")],
                   dev, "accuracy", labels, resamples=50)
    save_report(res, root / TRAINED, title="dev set")
    report = {"prompt": TRAINED, "kind": art.kind, "n_virtual": art.prompt.n_virtual, "base": art.base_id,
              "template": art.meta["template"],
              "nearest": nearest_report(input_vectors(art.prompt), base.embedding.weight, base.tokenizer, 5),
              "fidelity": projection_fidelity(base, art.prompt, art.prompt_format(base), dev, labels)}
    write_report(report, root / TRAINED / "inspect", heat=False)
    return root


@pytest.fixture(scope="module")
def studio(base, studio_dir, tmp_path_factory):
    import yaml

    from softprompt.serve.auth import Auth, hash_key
    from softprompt.serve.registry import Registry
    from softprompt.serve.schemas import Limits
    from softprompt.serve.server import Server

    keys = tmp_path_factory.mktemp("studio-keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "a", "sha256": hash_key(KEY_A), "prompts": [TRAINED, RANDOM, "base"]},
        {"name": "b", "sha256": hash_key(KEY_B), "prompts": [RANDOM]}]}))
    server = Server(base, Registry(base, studio_dir), Auth.from_file(keys), Limits(max_tokens=64), max_batch=8)
    with LiveServer(server, studio=True) as s:
        yield s


def _get(s, path, key=None):
    return http.get(s.url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


# -- without a browser ---------------------------------------------------------------------------------
def test_prompt_views_are_scoped_to_the_key(studio):
    rows = _get(studio, "/v1/prompts", KEY_A).json()["data"]
    assert [r["name"] for r in rows] == [RANDOM, TRAINED]
    t = next(r for r in rows if r["name"] == TRAINED)
    assert t["kind"] == "prompt-tuning" and t["n_virtual"] == 4 and t["params"] == 4 * 32 and t["bytes"] > 0
    assert t["steps"] == 8 and t["best_dev"]["name"] in ("dev_accuracy", "dev_loss")
    assert [r["name"] for r in _get(studio, "/v1/prompts", KEY_B).json()["data"]] == [RANDOM]
    d = _get(studio, f"/v1/prompts/{TRAINED}/details", KEY_A).json()
    assert len(d["metrics"]) == len((studio_dir_of(studio) / TRAINED / "metrics.jsonl").read_text().splitlines())
    assert d["eval"]["results"][0]["metric"] == "accuracy" and d["inspect"]["fidelity"]["projected_tokens"]
    assert len(d["nearest"]["tokens"]) == 4
    nearest = _get(studio, f"/v1/prompts/{RANDOM}/details", KEY_B).json()["nearest"]  # no inspect/: computed
    assert len(nearest["tokens"]) == 4 and len(nearest["tokens"][0]["cosine"]) == 5
    sim = _get(studio, f"/v1/prompts/{TRAINED}/similarity/{RANDOM}", KEY_A).json()
    assert len(sim["cosine_matrix"]) == 4 and len(sim["positionwise_cosine"]) == 4
    # Another tenant's prompt answers exactly like a missing one, on every view; no key: 401.
    for path in ("/v1/prompts/{}/details", "/v1/prompts/{}/metrics", f"/v1/prompts/{RANDOM}/similarity/{{}}"):
        theirs, missing = _get(studio, path.format(TRAINED), KEY_B), _get(studio, path.format("nope"), KEY_B)
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["error"]["message"].replace(TRAINED, "X") == missing.json()["error"]["message"].replace("nope", "X")
    assert _get(studio, "/v1/prompts").status_code == 401
    assert _get(studio, f"/v1/prompts/{TRAINED}/details").status_code == 401


def studio_dir_of(s) -> Path:
    return s.server.registry.dir


def test_studio_is_shipped_offline(studio):
    """Every asset comes from the package: no URL to another host in the page or its modules."""
    from softprompt.serve.studio import STATIC

    r = http.get(studio.url + "/studio", follow_redirects=True, timeout=10)
    assert r.status_code == 200 and "<title>softprompt studio</title>" in r.text
    for f in sorted(STATIC.iterdir()):
        assert _get(studio, f"/studio/{f.name}").status_code == 200
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", f.read_text()), f"{f.name} loads from another host"
    from fastapi.testclient import TestClient

    from softprompt.serve.app import create_app

    assert TestClient(create_app(studio.server)).get("/studio/").status_code == 404  # only with --studio


def test_cli_switches():
    from softprompt.cli import build_parser

    p = build_parser()
    assert p.parse_args(["studio", "--prompts", "d"]).studio is True
    assert p.parse_args(["serve", "--prompts", "d", "--studio"]).studio is True
    assert p.parse_args(["serve", "--prompts", "d"]).studio is False


# -- in a real browser -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (scripts/bootstrap.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing (pip install -e '.[test]')")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                "--disable-component-update", "--no-first-run"])
        yield b
        b.close()


ERRORS: list[str] = []  # uncaught errors in any page the tests open


def _page(browser, studio, key=None, hash_="#/prompts", query=""):
    page = browser.new_page(viewport={"width": 1360, "height": 860})
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda e: ERRORS.append(str(e)))
    page.goto(f"{studio.url}/studio/{query}{hash_}")
    if key:
        page.fill("#login-key", key)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#nav:not([hidden])")
    return page


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return SHOTS if os.environ.get("SOFTPROMPT_SCREENSHOTS") == "1" else tmp_path_factory.mktemp("shots")


def _shot(page, shots: Path, name: str) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    assert (shots / f"{name}.png").stat().st_size > 5000


@pytest.mark.browser
def test_no_key_shows_the_login_field_and_no_prompt_names(browser, studio, shots):
    page = browser.new_page()
    page.on("pageerror", lambda e: ERRORS.append(str(e)))
    asked = []
    page.on("request", lambda r: asked.append(r.url))
    page.goto(f"{studio.url}/studio/")
    page.wait_for_selector("#login-key")
    html = page.content()
    assert TRAINED not in html and RANDOM not in html
    assert not [u for u in asked if "/v1/" in u and not u.endswith("/v1/models")]
    page.fill("#login-key", "sk-wrong")
    page.click("#login button[type=submit]")
    page.wait_for_selector("#login-error")
    assert TRAINED not in page.content()
    _shot(page, shots, "login")
    page.close()


@pytest.mark.browser
def test_prompts_table_lists_exactly_the_keys_prompts(browser, studio, shots):
    for key, want in ((KEY_B, [RANDOM]), (KEY_A, [RANDOM, TRAINED])):
        page = _page(browser, studio, key)
        page.wait_for_selector("#prompts-table tbody tr")
        assert page.eval_on_selector_all("#prompts-table tbody tr", "rs => rs.map(r => r.dataset.prompt)") == want
        if key == KEY_B:
            assert TRAINED not in page.content()
        else:
            page.fill("#filter", "senti")
            assert page.eval_on_selector_all("#prompts-table tbody tr", "rs => rs.map(r => r.dataset.prompt)") == [TRAINED]
            page.fill("#filter", "")
            _shot(page, shots, "prompts")
        page.close()


@pytest.mark.browser
def test_playground_streams_the_apis_greedy_outputs(browser, studio, shots):
    text, n = "a dull film", 10
    client = studio.client(KEY_A)
    want = {m: client.completions.create(model=m, prompt=text, max_tokens=n, temperature=0).choices[0].text
            for m in (TRAINED, RANDOM)}
    page = _page(browser, studio, KEY_A, "#/playground")
    page.wait_for_selector("#pg-form")
    page.select_option("#pick-0", TRAINED)
    page.select_option("#pick-1", RANDOM)
    page.uncheck("#use-base")
    page.fill("#pg-input", text)
    page.fill("#max-tokens", str(n))
    page.click("#run")
    page.wait_for_function("[...document.querySelectorAll('.column')].every(c => c.dataset.state === 'done')")
    cols = page.eval_on_selector_all(".column", "cs => cs.map(c => [c.dataset.model, c.querySelector('.out').textContent, "
                                                 "Number(c.dataset.chunks), c.querySelector('.stats').textContent])")
    assert {m: out for m, out, _, _ in cols} == want
    for _, _, chunks, stats in cols:
        assert chunks > 1 and f"{n} tokens" in stats and "TTFT" in stats  # streamed, token by token
    # A chat through every column: the same conversation the API gets, the template on the last turn.
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "a gorgeous, witty film"}]
    want = {m: client.chat.completions.create(model=m, messages=chat, max_tokens=n, temperature=0).choices[0].message.content
            for m in (TRAINED, RANDOM, "base")}
    page.check("#use-base")
    page.check("#use-hand")
    page.select_option("#mode", "chat")
    page.fill("#pg-input", "\n".join(f"{m['role']}: {m['content']}" for m in chat))
    page.click("#run")
    page.wait_for_function("[...document.querySelectorAll('.column')].length === 4 && "
                           "[...document.querySelectorAll('.column')].every(c => c.dataset.state === 'done')")
    cols = dict(page.eval_on_selector_all(".column", "cs => cs.map(c => [c.dataset.model, c.querySelector('.out').textContent])"))
    assert {m: cols[m] for m in want} == want and cols["hand-written"]
    _shot(page, shots, "playground")
    page.close()


@pytest.mark.browser
def test_live_curve_gains_a_point_when_the_log_grows(browser, studio, shots):
    page = _page(browser, studio, KEY_A, f"#/prompt/{TRAINED}", query="?poll=250")
    page.wait_for_selector("#loss-chart")
    before = int(page.get_attribute("#loss-chart", "data-points"))
    assert before == len((studio_dir_of(studio) / TRAINED / "metrics.jsonl").read_text().splitlines())
    page.wait_for_selector("#eval-table")
    page.wait_for_selector("#nearest-table")
    page.select_option("#nearest-metric", "l2")
    page.wait_for_selector("#nearest-table[data-metric=l2]")
    page.select_option("#nearest-metric", "cosine")
    _shot(page, shots, "prompt")
    with open(studio_dir_of(studio) / TRAINED / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "train", "step": 9, "loss": 0.1, "lr": 0.01}) + "\n")
    page.wait_for_function(f"document.querySelector('#loss-chart').dataset.points == {before + 1}")
    page.close()


@pytest.mark.browser
def test_compare_puts_disagreements_first(browser, studio, shots, tmp_path):
    dev = tmp_path / "dev.jsonl"
    texts = ["good movie", "bad film", "a fine film", "dull", "x"]
    dev.write_text("".join(json.dumps({"input": t, "target": "?"}) + "\n" for t in texts))
    client = studio.client(KEY_A)
    out = {m: [client.completions.create(model=m, prompt=t, max_tokens=4, temperature=0).choices[0].text.strip() for t in texts]
           for m in (TRAINED, RANDOM)}
    page = _page(browser, studio, KEY_A, "#/compare")
    page.wait_for_selector("#cosine-matrix")
    page.select_option("#cmp-a", TRAINED)
    page.select_option("#cmp-b", RANDOM)
    page.set_input_files("#dev-file", str(dev))
    page.fill("#dev-max-tokens", "4")
    page.click("#run-dev")
    page.wait_for_selector("#dev-table")
    rows = page.eval_on_selector_all("#dev-table tbody tr", "rs => rs.map(r => [r.className, r.cells[1].textContent, "
                                                            "r.cells[3].textContent.trim(), r.cells[4].textContent.trim()])")
    order = sorted(range(len(texts)), key=lambda i: (out[TRAINED][i] == out[RANDOM][i], i))  # disagreements first
    assert rows == [["same" if out[TRAINED][i] == out[RANDOM][i] else "differ", texts[i], out[TRAINED][i], out[RANDOM][i]]
                    for i in order]
    _shot(page, shots, "compare")
    page.close()


@pytest.mark.browser
def test_prompt_page_shows_compression_and_hardening_reports(browser, studio):
    """The reports other commands write into a prompt directory (shapes as softprompt compress and
    softprompt harden write them) appear on its page; and no page the tests opened threw."""
    d = studio_dir_of(studio) / RANDOM
    (d / "compression_report.json").write_text(json.dumps({"context_tokens": 120, "soft_tokens": 4, "compression_ratio": 30.0,
                                                            "n_heldout": 3}))
    (d / "compression_report.md").write_text("# Compression report\n\ncontext 120 tokens -> 4 soft tokens.\n\n"
                                             "| variant | KL/token |\n|---|---|\n| soft prompt | 0.412 |\n")
    (d / "harden").mkdir(exist_ok=True)
    (d / "harden" / "harden.json").write_text(json.dumps({"objective": "kl", "steps": 5, "n_search": 4, "n_report": 4, "rows": [
        {"name": "projection", "text": "foo bar", "kl": 0.5, "top1_agreement": 0.25, "value": 2.0, "metric": "loss"}]}))
    page = _page(browser, studio, KEY_A, f"#/prompt/{RANDOM}")
    page.wait_for_selector("#harden-table")
    text = page.inner_text("main")
    assert "compression report" in text.lower() and "30.0×" in text and "0.412" in text and "foo bar" in text
    assert "context compression" in text
    page.close()
    assert not ERRORS, ERRORS
