#!/usr/bin/env python3
"""Check that the benchmark figures quoted in README.md and docs/*.md come from committed results files.

A citation is an HTML comment (invisible when rendered) naming one or more results files, paths from
the repository root under bench/results/:

    <!-- results: bench/results/precision.md bench/results/precision.json -->

It covers the block it is in: the run of lines between blank lines (a paragraph, a table), where a
list item at the left margin starts a new block. In a covered block every figure (a number with a
decimal point, or with a unit: ``x`` attached, ``%``, ``s``, ``ms``, ``s/step``, ``GFLOP/s``,
``tokens/s``) must occur in one of the cited files, up to the rounding it is quoted with: ``0.885``
matches ``0.88512``, ``2.2x`` matches ``2.19``, ``36%`` matches ``36.4`` or ``0.364``. Outside
covered blocks, a figure that looks measured (a number with a unit other than %, a decimal
percentage, or a bare decimal with three or more digits after the point, such as an accuracy) is an
error: unsourced. Code (fenced blocks and `inline code`) is not checked. A line holding
``<!-- not-a-result: WHY -->`` is exempt (a setting, a figure from elsewhere, one not benchmarked).

Exit status 0 when everything agrees; else 1, with one ``file:line: ...`` line per problem.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITE = re.compile(r"<!--\s*results:\s*(.+?)\s*-->")
EXEMPT = re.compile(r"<!--\s*not-a-result\b[^>]*-->")
UNITS = r"x|\s?(?:%|ms|s/step|s|GFLOP/s|tokens/s|tok/s)"  # x only attached: "2.19x", not "30 x 2"
# a number (thousands commas allowed) not part of a word, a version (1.2.3) or a path, with an optional unit
FIGURE = re.compile(r"(?<![\w./])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(" + UNITS + r")?(?![\w]|\.\d)")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass
class Figure:
    text: str
    value: float
    decimals: int
    unit: str | None
    line: int


@dataclass
class Problem:
    path: Path
    line: int
    message: str
    root: Path = REPO

    def __str__(self) -> str:
        try:
            where = self.path.relative_to(self.root)
        except ValueError:
            where = self.path
        return f"{where}:{self.line}: {self.message}"


def prose(line: str) -> str:
    """The line without inline code spans, links' targets and HTML comments."""
    line = re.sub(r"`[^`]*`", " ", line)
    line = re.sub(r"<!--.*?-->", " ", line)
    line = re.sub(r"\]\([^)]*\)", "]", line)
    return line


def figures(line: str, number: int) -> list[Figure]:
    out = []
    for m in FIGURE.finditer(prose(line)):
        whole, frac, unit = m.group(1), m.group(2) or "", (m.group(3) or "").strip() or None
        if not frac and not unit:
            continue
        out.append(Figure(m.group(0).strip(), float(whole.replace(",", "") + frac), max(len(frac) - 1, 0), unit, number))
    return out


def looks_measured(f: Figure) -> bool:
    return f.unit is not None and f.unit != "%" or f.decimals >= 3 or f.decimals >= 1 and f.unit == "%"


def values_in(path: Path) -> list[float]:
    """The numbers in a results file, as magnitudes: a figure is read without its sign (``-16.1 %`` in a
    list of per-round changes is the figure 16.1)."""
    return [abs(float(t)) for t in NUMBER.findall(path.read_text(errors="replace").replace(",", ""))]


def matches(f: Figure, values: list[float]) -> bool:
    tol = 0.5 * 10 ** -f.decimals + 1e-9
    targets = [f.value] + ([f.value / 100] if f.unit == "%" else [])
    for target in targets:
        t_tol = tol / 100 if target != f.value else tol
        for v in values:
            if math.isclose(v, target, abs_tol=t_tol) or abs(v - target) <= t_tol:
                return True
    return False


ITEM = re.compile(r"^(?:[-*+]|\d+\.)\s")


def blocks(lines: list[str]):
    """The document's blocks, each a list of (line number, text): runs of lines between blank lines,
    a list item at the left margin starting a new one; fenced code is left out."""
    fenced, block = False, []
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if not line.strip() or ITEM.match(line):
            if block:
                yield block
            block = [(i, line)] if line.strip() else []
            continue
        block.append((i, line))
    if block:
        yield block


def citations(block) -> list[tuple[int, str]]:
    return [(n, name) for n, text in block for m in CITE.finditer(text) for name in m.group(1).split()]


def check_file(path: Path, repo: Path = REPO) -> list[Problem]:
    problems: list[Problem] = []
    results = (repo / "bench" / "results").resolve()
    for block in blocks(path.read_text().splitlines()):
        cited = citations(block)
        values: list[float] = []
        for line, name in cited:
            p = (repo / name).resolve()
            if not p.is_file():
                problems.append(Problem(path, line, f"cited results file {name} does not exist", repo))
            elif results not in p.parents:
                problems.append(Problem(path, line, f"cited file {name} is not under bench/results/", repo))
            else:
                values += values_in(p)
        if cited and not values:
            continue
        names = ", ".join(name for _, name in cited)
        for number, text in block:
            if EXEMPT.search(text):
                continue
            for f in figures(text, number):
                if cited and not matches(f, values):
                    problems.append(Problem(path, number, f"{f.text} is not in {names}", repo))
                elif not cited and looks_measured(f):
                    problems.append(Problem(path, number, f"{f.text} looks measured but cites no results file "
                                                          "(add <!-- results: bench/results/FILE --> to its paragraph)", repo))
    return problems


def documents(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    ap.add_argument("--repo", type=Path, default=REPO, help="the repository root the citations are relative to")
    args = ap.parse_args(argv)
    paths = args.files or documents(args.repo)
    problems = [p for path in paths for p in check_file(path.resolve(), args.repo.resolve())]
    for p in problems:
        print(p)
    n = sum(1 for path in paths for b in blocks(path.read_text().splitlines()) if citations(b))
    print(f"check_numbers: {len(paths)} documents, {n} cited blocks, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
