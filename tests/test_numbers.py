"""scripts/check_numbers.py: every benchmark figure in README.md and docs/*.md is in the results file
its paragraph cites, and a wrong or unsourced figure fails the check with file:line."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import check_numbers  # noqa: E402


def test_readme_and_docs_agree_with_the_results_files(capsys):
    assert check_numbers.main([]) == 0, capsys.readouterr().out


@pytest.fixture()
def repo(tmp_path):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "run.md").write_text("| ours | 0.88512 | 2.19 | 0.364 | 61 s |\n")
    (tmp_path / "bench" / "results" / "run.json").write_text('{"speedup": 3.98, "tokens_per_s": 1,078.5}\n')
    (tmp_path / "docs").mkdir()
    return tmp_path


def check(repo, text: str) -> list[str]:
    doc = repo / "docs" / "x.md"
    doc.write_text(text)
    return [str(p) for p in check_numbers.check_file(doc, repo)]


def test_cited_figures_match_up_to_their_rounding(repo):
    assert check(repo, "Intro, 20 tokens and 42 steps.\n\nOurs: 0.885 accuracy, 2.19x and 2.2x, 36% less, 61 s, "
                       "3.98x and 1,078.5 tokens/s. <!-- results: bench/results/run.md bench/results/run.json -->\n") == []


def test_a_wrong_figure_fails_with_file_line_and_number(repo):
    problems = check(repo, "Title\n\n<!-- results: bench/results/run.md -->\nOurs: 0.885 accuracy,\nand 2.21x faster.\n")
    assert problems == ["docs/x.md:5: 2.21x is not in bench/results/run.md"]


def test_a_measured_figure_without_a_citation_fails(repo):
    (problem,) = check(repo, "Ours reached 0.885 accuracy.\n\nA setting of 2 s. <!-- not-a-result: a setting -->\n")
    assert problem.startswith("docs/x.md:1: 0.885 looks measured but cites no results file")


def test_the_citation_covers_only_its_block(repo):
    problems = check(repo, "<!-- results: bench/results/run.md -->\nOurs: 0.885.\n\nPEFT: 0.845 accuracy.\n\n- item 2.19x "
                           "<!-- results: bench/results/run.md -->\n- next item 1.5 s/step\n")
    assert [p.split(": ", 1)[0] for p in problems] == ["docs/x.md:4", "docs/x.md:7"]


def test_a_missing_or_foreign_results_file_fails(repo):
    (repo / "notes.md").write_text("0.885\n")
    problems = check(repo, "0.885 <!-- results: bench/results/nope.md -->\n\n0.885 <!-- results: notes.md -->\n")
    assert problems == ["docs/x.md:1: cited results file bench/results/nope.md does not exist",
                        "docs/x.md:3: cited file notes.md is not under bench/results/"]


def test_code_is_not_checked(repo):
    assert check(repo, "Run `--lr 0.031` like this:\n\n```\nloss 0.123 s/step 9.99\n```\n") == []


def test_command_line_exit_status(repo):
    (repo / "README.md").write_text("0.886 accuracy <!-- results: bench/results/run.md -->\n")
    script = REPO / "scripts" / "check_numbers.py"
    proc = subprocess.run([sys.executable, str(script), "--repo", str(repo)], capture_output=True, text=True)
    assert proc.returncode == 1 and "README.md:1: 0.886 is not in bench/results/run.md" in proc.stdout
    (repo / "README.md").write_text("0.885 accuracy <!-- results: bench/results/run.md -->\n")
    assert subprocess.run([sys.executable, str(script), "--repo", str(repo)], capture_output=True).returncode == 0
