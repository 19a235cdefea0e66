"""Task recipes, dataset readers, and the shipped demo task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from strict import need

from softprompt.data.datasets import READERS, clean_agnews
from softprompt.data.recipes import TaskRecipe, list_recipes, load_recipe, recipe_from_dict, template_fields
from softprompt.data.splits import load_split
from softprompt.errors import DataError, SoftPromptError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TOPIC = REPO / "examples" / "topic"
TOPIC_LABELS = {"food", "sports", "weather", "technology"}

EXPECTED_RECIPES = {"sst2", "trec", "agnews", "emotion", "boolq", "e2e"}


# ------------------------------------------------------------------ shipped recipes


def test_list_recipes_has_the_shipped_tasks():
    assert EXPECTED_RECIPES <= set(list_recipes())


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads_and_validates(name):
    r = load_recipe(name)
    assert isinstance(r, TaskRecipe)
    assert r.name == name
    assert r.description
    assert r.path and r.path.endswith(f"{name}.yaml")
    assert r.reader in READERS
    assert {"train", "dev", "test"} == set(r.splits)
    soft = r.soft_template_for()
    assert f"[soft:{r.soft_tokens}" in soft and "[soft:N" not in soft
    assert "[soft:8" in r.soft_template_for(8)
    assert set(template_fields(soft)) <= set(r.fields)
    assert set(template_fields(r.hard_prompt)) <= set(r.fields)
    assert "[soft" not in r.hard_prompt
    assert r.few_shot_k >= 0 and isinstance(r.chat, bool)
    if r.is_classification:
        assert r.metric in ("accuracy", "macro_f1")
        words = r.label_words
        assert len(words) == len(set(words)) == len(r.labels)
        # label words are single common words
        assert all(w.isalpha() and w.islower() for w in words), words
    else:
        assert r.metric in ("rouge_l", "bleu", "exact_match")


def test_label_words_chosen():
    assert load_recipe("sst2").labels == {"0": "negative", "1": "positive"}
    assert load_recipe("trec").labels == {"ABBR": "abbreviation", "ENTY": "entity", "DESC": "description",
                                          "HUM": "human", "LOC": "location", "NUM": "number"}
    assert load_recipe("agnews").labels == {"World": "world", "Sports": "sports", "Business": "business",
                                            "Sci/Tech": "technology"}
    assert load_recipe("emotion").label_words == ["anger", "joy", "optimism", "sadness"]
    assert load_recipe("boolq").labels == {"true": "yes", "false": "no"}
    e2e = load_recipe("e2e")
    assert e2e.labels is None and e2e.metric == "rouge_l" and e2e.label_words == []


def test_load_recipe_by_path_and_unknown_name(tmp_path):
    src = Path(load_recipe("sst2").path)
    p = tmp_path / "mine.yaml"
    p.write_text(src.read_text())
    assert load_recipe(str(p)).name == "sst2"
    with pytest.raises(SoftPromptError, match="unknown task recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(SoftPromptError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------ bad recipes

BASE = {
    "name": "toy",
    "description": "a toy",
    "reader": "stsa",
    "splits": {"train": "toy/train.txt", "dev": "toy/dev.txt"},
    "fields": ["sentence"],
    "soft_template": "[soft:N] Review: {sentence}\nSentiment:",
    "hard_prompt": "Positive or negative?\nReview: {sentence}\nSentiment:",
    "labels": {"0": "negative", "1": "positive"},
    "metric": "accuracy",
}


def _write(tmp_path: Path, data: dict, name: str = "bad.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _bad(tmp_path, field: str, **changes):
    data = {k: v for k, v in BASE.items() if k not in changes or changes[k] is not _DROP}
    data.update({k: v for k, v in changes.items() if v is not _DROP})
    p = _write(tmp_path, data)
    with pytest.raises(SoftPromptError) as ei:
        load_recipe(str(p))
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(p) in msg and field in msg, msg
    return msg


_DROP = object()


def test_good_base_recipe_loads(tmp_path):
    r = load_recipe(str(_write(tmp_path, BASE)))
    assert r.soft_tokens == 20 and r.few_shot_k == 4 and r.chat is True
    assert r.soft_template_for() == "[soft:20] Review: {sentence}\nSentiment:"


@pytest.mark.parametrize("missing", ["name", "reader", "splits", "fields", "soft_template", "hard_prompt", "metric"])
def test_missing_field(tmp_path, missing):
    msg = _bad(tmp_path, missing, **{missing: _DROP})
    assert "missing required field" in msg


def test_missing_labels_for_classification(tmp_path):
    _bad(tmp_path, "labels", labels=_DROP)


def test_unknown_reader(tmp_path):
    assert "unknown reader 'csvish'" in _bad(tmp_path, "reader", reader="csvish")


def test_unknown_metric(tmp_path):
    assert "unknown metric 'f2'" in _bad(tmp_path, "metric", metric="f2")


def test_metric_must_fit_task(tmp_path):
    _bad(tmp_path, "metric", metric="rouge_l")


def test_unknown_top_level_field(tmp_path):
    _bad(tmp_path, "labelz", labelz={"0": "bad"})


def test_template_field_not_in_fields(tmp_path):
    assert "{review}" in _bad(tmp_path, "soft_template", soft_template="[soft:N] {review}")
    _bad(tmp_path, "hard_prompt", hard_prompt="Say: {text}")


def test_hard_prompt_has_no_soft_spans(tmp_path):
    _bad(tmp_path, "hard_prompt", hard_prompt="[soft:4] {sentence}")


def test_soft_template_needs_a_soft_span(tmp_path):
    _bad(tmp_path, "soft_template", soft_template="Review: {sentence}")


def test_field_unknown_to_reader(tmp_path):
    assert "has no field 'text'" in _bad(tmp_path, "fields", fields=["text"], soft_template="[soft:N] {text}",
                                         hard_prompt="{text}")


def test_bad_splits(tmp_path):
    _bad(tmp_path, "splits.valid", splits={"valid": "x.txt"})
    _bad(tmp_path, "splits.train.path", splits={"train": "/abs/x.txt"})
    _bad(tmp_path, "splits.dev.portion", splits={"dev": {"path": "x", "portion": [0.5, 0.2]}})
    _bad(tmp_path, "splits.dev", splits={"train": {"path": "x", "portion": [0, 0.6]},
                                        "dev": {"path": "x", "portion": [0.5, 1]}})


def test_bad_values(tmp_path):
    _bad(tmp_path, "few_shot_k", few_shot_k=-1)
    _bad(tmp_path, "soft_tokens", soft_tokens=0)
    _bad(tmp_path, "chat", chat="maybe")
    # an unquoted YAML yes/no becomes a boolean, not a label word
    assert "quote yes/no" in _bad(tmp_path, "labels.1", labels={"0": "negative", "1": True})


def test_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SoftPromptError, match=r"broken\.yaml.*invalid YAML"):
        load_recipe(str(p))


def test_label_map_missing_a_raw_label_seen_in_data(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "train.txt").write_text("0 bad film .\n1 good film .\n2 a neutral film .\n")
    r = load_recipe(str(_write(tmp_path, BASE, "toy.yaml")))
    with pytest.raises(SoftPromptError) as ei:
        load_split(r, tmp_path, "train")
    msg = str(ei.value)
    assert str(tmp_path / "toy.yaml") in msg and "labels" in msg and "'2'" in msg and "train.txt:3" in msg


def test_missing_data_names_path_and_data_dir(tmp_path):
    r = load_recipe(str(_write(tmp_path, BASE, "toy.yaml")))
    with pytest.raises(DataError) as ei:
        load_split(r, tmp_path, "train")
    msg = str(ei.value)
    assert str(tmp_path / "toy" / "train.txt") in msg and "--data-dir" in msg and "\n" not in msg
    with pytest.raises(DataError, match="data directory not found.*--data-dir"):
        load_split(r, tmp_path / "nowhere", "train")
    with pytest.raises(SoftPromptError, match="no 'test' split"):
        load_split(r, tmp_path, "test")


def test_split_mapping_limit_and_carving(tmp_path):
    (tmp_path / "toy").mkdir()
    lines = [f"{i % 2} sentence number {i} ." for i in range(50)]
    (tmp_path / "toy" / "all.txt").write_text("\n".join(lines) + "\n")
    data = dict(BASE, splits={"train": {"path": "toy/all.txt", "portion": [0, 0.8]},
                              "dev": {"path": "toy/all.txt", "portion": [0.8, 1.0]}})
    r = load_recipe(str(_write(tmp_path, data)))
    train, dev = load_split(r, tmp_path, "train"), load_split(r, tmp_path, "dev")
    assert (len(train), len(dev)) == (40, 10)
    assert not {e.line for e in train} & {e.line for e in dev}
    assert [e.line for e in dev] == sorted(e.line for e in dev)  # file order
    assert load_split(r, tmp_path, "dev") == dev  # deterministic
    ex = train[0]
    assert ex.target == {"0": "negative", "1": "positive"}[ex.meta["label"]]
    assert ex.source == str(tmp_path / "toy" / "all.txt") and ex.line is not None
    few = load_split(r, tmp_path, "train", limit=5, seed=3)
    assert len(few) == 5 and few == load_split(r, tmp_path, "train", limit=5, seed=3)
    assert {e.line for e in few} <= {e.line for e in train}
    assert load_split(r, tmp_path, "train", limit=500) == train


# ------------------------------------------------------------------ readers (synthetic files in each real format)


def test_read_stsa(tmp_path):
    p = tmp_path / "stsa.binary.dev"
    p.write_text("0 one long string of cliches .\n1 it 's a charming journey .\n")
    exs = READERS["stsa"].read(p)
    assert [(e.fields, e.meta["label"], e.line) for e in exs] == [
        ({"sentence": "one long string of cliches ."}, "0", 1),
        ({"sentence": "it 's a charming journey ."}, "1", 2),
    ]
    assert exs[0].source == str(p) and exs[0].target is None


def test_read_trec_latin1(tmp_path):
    p = tmp_path / "TREC.train"
    p.write_bytes(b"NUM:dist How far is it from Denver to Aspen ?\n"
                  b"LOC:city Which city has the oldest sister\xf0city ?\n")
    exs = READERS["trec"].read(p)
    assert [(e.fields["question"], e.meta["label"], e.meta["fine"]) for e in exs] == [
        ("How far is it from Denver to Aspen ?", "NUM", "dist"),
        ("Which city has the oldest sister\u00f0city ?", "LOC", "city"),
    ]
    bad = tmp_path / "bad"
    bad.write_text("How far ?\n")
    with pytest.raises(DataError, match=r"bad:1: expected 'COARSE:fine question'"):
        READERS["trec"].read(bad)


def test_read_agnews(tmp_path):
    p = tmp_path / "dev.tsv"
    p.write_text(
        "It #39;s over. I #39;m leaving you for another browser.\tSci/Tech\n"
        '"Kimberly-Clark &lt;A HREF=""http://x.com/q""&gt;KMB.N&lt;/A&gt; said it is targeting \\$400 million."\tBusiness\n'
        "Cisco announced  quot;the industry #39;s first quot; IP phone for about  #36;41.1 million.\tSci/Tech\n"
        "Johnson  amp; Johnson said on\\Wednesday it would buy Guidant.\tBusiness\n",
        encoding="utf-8",
    )
    exs = READERS["agnews"].read(p)
    assert [e.fields["text"] for e in exs] == [
        "It's over. I'm leaving you for another browser.",
        "Kimberly-Clark KMB.N said it is targeting $400 million.",
        'Cisco announced "the industry\'s first" IP phone for about $41.1 million.',
        "Johnson & Johnson said on Wednesday it would buy Guidant.",
    ]
    assert [e.meta["label"] for e in exs] == ["Sci/Tech", "Business", "Sci/Tech", "Business"]
    assert [e.line for e in exs] == [1, 2, 3, 4]
    assert clean_agnews("up #151;dung beetles") == "up\u2014dung beetles"


def test_read_tweeteval(tmp_path):
    d = tmp_path / "emotion"
    d.mkdir()
    (d / "mapping.txt").write_text("0\tanger\n1\tjoy\n2\toptimism\n3\tsadness")  # no final newline, as shipped
    (d / "val_text.txt").write_text("So #grateful &amp; happy \nline one\\nline two \n")
    (d / "val_labels.txt").write_text("1\n3\n")
    exs = READERS["tweeteval"].read(d / "val")
    assert [(e.fields["text"], e.meta["label"], e.meta["label_id"], e.line) for e in exs] == [
        ("So #grateful & happy", "joy", "1", 1),
        ("line one\nline two", "sadness", "3", 2),
    ]
    assert exs[0].source == str(d / "val_text.txt")
    (d / "val_labels.txt").write_text("1\n")
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        READERS["tweeteval"].read(d / "val")
    (d / "val_labels.txt").write_text("1\n7\n")
    with pytest.raises(DataError, match=r"val_labels.txt:2: label '7' is not in"):
        READERS["tweeteval"].read(d / "val")


def test_read_boolq(tmp_path):
    p = tmp_path / "dev.jsonl"
    rows = [
        {"question": "is house tax and property tax are same", "title": "Property tax", "answer": True,
         "passage": "Property tax or 'house tax' is a local tax on buildings."},
        {"question": "does ethanol take more energy make that produces", "title": "Ethanol fuel", "answer": False,
         "passage": "All biomass goes through at least some of these steps."},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs = READERS["boolq"].read(p)
    assert exs[0].fields == {"passage": "Property tax or 'house tax' is a local tax on buildings.",
                             "question": "is house tax and property tax are same"}
    assert [e.meta["label"] for e in exs] == ["true", "false"]
    assert exs[1].meta["title"] == "Ethanol fuel" and exs[1].line == 2
    p.write_text(json.dumps({"question": "q", "passage": "p", "answer": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"dev.jsonl:1: field 'answer' must be true or false"):
        READERS["boolq"].read(p)
    p.write_text(json.dumps({"question": "q", "answer": True}) + "\n")
    with pytest.raises(DataError, match=r"dev.jsonl:1: missing field 'passage'"):
        READERS["boolq"].read(p)


def test_read_e2e_and_unique_inputs(tmp_path):
    d = tmp_path / "e2e-nlg"
    d.mkdir()
    (d / "devset.csv").write_bytes(
        'mr,ref\r\n'
        '"name[Alimentum], area[city centre], familyFriendly[no]","There is a place in the city centre, Alimentum, that is not family-friendly."\r\n'
        '"name[Alimentum], area[city centre], familyFriendly[no]",Alimentum is in the city centre.\r\n'
        '"name[The Vaults], eatType[pub], priceRange[more than \u00a330]",The Vaults pub costs more than \u00a330.\r\n'.encode()
    )
    exs = READERS["e2e"].read(d / "devset.csv")
    assert [(e.fields["mr"], e.target, e.line) for e in exs] == [
        ("name[Alimentum], area[city centre], familyFriendly[no]",
         "There is a place in the city centre, Alimentum, that is not family-friendly.", 2),
        ("name[Alimentum], area[city centre], familyFriendly[no]", "Alimentum is in the city centre.", 3),
        ("name[The Vaults], eatType[pub], priceRange[more than \u00a330]", "The Vaults pub costs more than \u00a330.", 4),
    ]
    recipe = recipe_from_dict({
        "name": "e2e-toy", "reader": "e2e", "fields": ["mr"], "metric": "rouge_l",
        "splits": {"dev": {"path": "e2e-nlg/devset.csv", "unique_inputs": True}},
        "soft_template": "[soft:N] {mr}", "hard_prompt": "Describe: {mr}",
    }, "toy.yaml")
    dev = load_split(recipe, tmp_path, "dev")
    assert len(dev) == 2
    assert dev[0].target == exs[0].target
    assert dev[0].meta["references"] == [exs[0].target, exs[1].target]
    assert dev[1].meta["references"] == [exs[2].target]


def test_read_glue(tmp_path):
    p = tmp_path / "dev.tsv"
    p.write_text('sentence\tlabel\r\nit \'s a "charming" journey . \t1\r\nunflinchingly bleak \t0\r\n')
    exs = READERS["glue"].read(p)
    assert [(e.fields, e.meta["label"], e.line) for e in exs] == [
        ({"sentence": 'it \'s a "charming" journey .'}, "1", 2),
        ({"sentence": "unflinchingly bleak"}, "0", 3),
    ]


def test_read_squad(tmp_path):
    p = tmp_path / "dev-v1.1.json"
    doc = {"version": "1.1", "data": [{"title": "Denver_Broncos", "paragraphs": [{
        "context": "The Broncos won Super Bowl 50 in Santa Clara.",
        "qas": [{"id": "q1", "question": "Who won Super Bowl 50?",
                 "answers": [{"answer_start": 4, "text": "Broncos"}, {"answer_start": 0, "text": "The Broncos"},
                             {"answer_start": 4, "text": "Broncos"}]}]}]}]}
    p.write_text(json.dumps(doc))
    (ex,) = READERS["squad"].read(p)
    assert ex.fields == {"context": "The Broncos won Super Bowl 50 in Santa Clara.", "question": "Who won Super Bowl 50?"}
    assert ex.target == "Broncos"
    assert ex.meta["references"] == ["Broncos", "The Broncos"]
    assert ex.meta["id"] == "q1" and ex.meta["group"] == "Denver_Broncos"


# ------------------------------------------------------------------ the real datasets, when present


@pytest.mark.parametrize("name", list_recipes())
def test_real_dev_split_loads(name):
    need(SHARED_DATA.is_dir(), f"public datasets not found at {SHARED_DATA} (../shared/data from the repo root)")
    r = load_recipe(name)
    exs = load_split(r, SHARED_DATA, "dev", limit=8, seed=0)
    assert 0 < len(exs) <= 8
    for e in exs:
        assert all(e.fields.get(f, "").strip() for f in r.fields)
        assert e.target and e.source and Path(e.source).exists()
        if r.is_classification:
            assert e.target in r.label_words
            assert r.labels[e.meta["label"]] == e.target


# ------------------------------------------------------------------ the shipped demo task


def _topic(split: str) -> list[dict]:
    rows = []
    for i, line in enumerate((TOPIC / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        obj = json.loads(line)
        assert set(obj) == {"input", "target"}, f"{split}.jsonl:{i}"
        assert isinstance(obj["input"], str) and obj["input"].strip() == obj["input"] and obj["input"]
        assert obj["target"] in TOPIC_LABELS, f"{split}.jsonl:{i}"
        rows.append(obj)
    return rows


def test_demo_topic_data():
    sizes = {"train": 96, "dev": 24, "test": 48}
    seen: dict[str, str] = {}
    for split, n in sizes.items():
        rows = _topic(split)
        assert len(rows) == n
        counts = {lab: sum(r["target"] == lab for r in rows) for lab in TOPIC_LABELS}
        assert set(counts.values()) == {n // 4}, counts  # balanced
        for r in rows:
            key = r["input"].lower()
            assert key not in seen, f"duplicate input in {split} and {seen.get(key)}: {r['input']}"
            seen[key] = split
    # the label word itself rarely appears in the text
    rows = [r for s in sizes for r in _topic(s)]
    assert sum(r["target"] in r["input"].lower() for r in rows) <= len(rows) // 10


def test_demo_topic_readable_by_records_and_hard_prompt():
    from softprompt.data.readers import read_examples

    exs = read_examples(TOPIC / "dev.jsonl", ["input"], "target")
    assert len(exs) == 24 and {e.target for e in exs} == TOPIC_LABELS
    hard = (TOPIC / "hard_prompt.txt").read_text(encoding="utf-8")
    assert template_fields(hard) == ["input"] and "[soft" not in hard
    assert all(lab in hard for lab in TOPIC_LABELS)
    assert (TOPIC / "README.md").read_text().count("CC0") >= 1
