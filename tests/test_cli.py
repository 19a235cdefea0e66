"""The command line: the documented forms work, and bad input gives one line and a non-zero exit."""
from __future__ import annotations

import json

import pytest

from softprompt.cli import main


def test_train_generate_info(tiny_dir, sentiment_files, tmp_path, capsys):
    train_f, dev_f = sentiment_files
    out = tmp_path / "p"
    rc = main(["train", "--model", str(tiny_dir), "--data", str(train_f), "--dev", str(dev_f), "--input-field", "input",
               "--target-field", "target", "--tokens", "4", "--init", "text:Classify the review:", "--steps", "6",
               "--batch-size", "4", "--lr", "0.03", "--seed", "0", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    assert "saved" in capsys.readouterr().out
    for f in ("prompt.safetensors", "prompt.json", "metrics.jsonl", "loss.png"):
        assert (out / f).exists(), f
    meta = json.loads((out / "prompt.json").read_text())
    assert meta["kind"] == "prompt-tuning" and meta["n_virtual"] == 4 and meta["init"] == "text:Classify the review:"
    assert meta["base_model"]["vocab_size"] == 49152
    assert meta["train_config"]["attention"] == "auto"
    assert main(["generate", str(out), "The soup was cold.", "--max-new-tokens", "4"]) == 0
    assert main(["generate", str(out), "one", "two", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) >= 2
    assert main(["info", str(out)]) == 0
    assert "prompt-tuning" in capsys.readouterr().out
    # refuses to clobber an existing prompt without --resume/--overwrite
    rc = main(["train", "--model", str(tiny_dir), "--data", str(train_f), "--steps", "2", "--out", str(out), "--quiet"])
    assert rc == 2
    assert "already holds a prompt" in capsys.readouterr().err


def test_train_attention_flag(tiny_dir, sentiment_files, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["train", "--model", str(tiny_dir), "--data", str(sentiment_files[0]), "--tokens", "2", "--steps", "1",
                 "--batch-size", "4", "--attention", "eager", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert json.loads((out / "prompt.json").read_text())["train_config"]["attention"] == "eager"
    with pytest.raises(SystemExit):
        main(["train", "--model", str(tiny_dir), "--data", str(sentiment_files[0]), "--attention", "flash", "--out", str(tmp_path / "q")])
    assert "--attention: invalid choice: 'flash'" in capsys.readouterr().err


@pytest.mark.parametrize("content,expect", [
    ('{"input": "a", "target": "b"}\n{"input": \n', "bad.jsonl:2: malformed JSON"),
    ('{"input": "a", "target": "b"}\n"text"\n', "bad.jsonl:2: expected a JSON object"),
    ('{"input": "a", "target": "b"}\n{"input": "a"}\n', "bad.jsonl:2: missing target field 'target'"),
    ('{"inp": "a", "target": "b"}\n', "bad.jsonl:1: missing field 'input'"),
    ("", "bad.jsonl: empty dataset"),
])
def test_bad_data_one_line_errors(tiny_dir, tmp_path, capsys, content, expect):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    rc = main(["train", "--model", str(tiny_dir), "--data", str(bad), "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err and err.count("\n") == 1 and "Traceback" not in err


def test_other_bad_inputs(tiny_dir, sentiment_files, tmp_path, capsys):
    train_f, _ = sentiment_files
    cases = [
        (["train", "--model", str(tiny_dir), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")], "no such file"),
        (["train", "--model", str(tmp_path / "nomodel"), "--data", str(train_f), "--out", str(tmp_path / "o")], "no such directory"),
        (["train", "--model", str(tiny_dir), "--data", str(train_f), "--init", "bogus", "--out", str(tmp_path / "o")], "--init 'bogus'"),
        (["train", "--model", str(tiny_dir), "--data", str(train_f), "--template", "[soft:0] {input}", "--out", str(tmp_path / "o")],
         "template error"),
        (["train", "--model", str(tiny_dir), "--data", str(train_f), "--template", "{input} only", "--out", str(tmp_path / "o")], "no soft span"),
        (["generate", str(tmp_path), "hi"], "not a prompt artifact"),
        (["info", str(tmp_path / "missing")], "does not exist"),
    ]
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\x00\x01\x02PK")
    cases.append((["train", "--model", str(tiny_dir), "--data", str(binary), "--out", str(tmp_path / "o")], "binary"))
    for argv, expect in cases:
        rc = main(argv + (["--quiet"] if argv[0] == "train" else []))
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert expect in err, (argv, err)
        assert "Traceback" not in err


def test_train_from_task_recipe(tiny_dir, tmp_path, capsys):
    from conftest import SHARED_DATA, need

    need((SHARED_DATA / "sst2-sentences").exists(), f"public datasets not found at {SHARED_DATA}")
    out = tmp_path / "sst2"
    rc = main(["train", "--task", "sst2", "--data-dir", str(SHARED_DATA), "--model", str(tiny_dir), "--limit", "16",
               "--tokens", "3", "--steps", "2", "--batch-size", "4", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "prompt.json").read_text())
    assert meta["n_virtual"] == 3 and "{sentence}" in meta["template"]
    assert sorted(meta["labels"]) == ["negative", "positive"]
    assert main(["train", "--task", "sst2", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--data-dir" in capsys.readouterr().err
