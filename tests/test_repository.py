"""The repository keeps its own promises: it speaks of itself only (no file cites a past round
of work), and the README's set-up commands sit where a newcomer looks first."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_ORDINAL = (r"(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|"
            r"twelfth|thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|"
            r"nineteenth|twentieth|twenty-[a-z]+|thirtieth)")
#: History: an ordinal or a demonstrative before a word for a round of work, or a run number.
HISTORY = re.compile(
    rf"\b{_ORDINAL}[- ](session|round|sweep)\b|\b(this|last|next|previous|earlier) "
    rf"(session|round)\b|\brun[0-9]+[a-z]?\b", re.IGNORECASE)
HISTORY_NAME = re.compile(rf"(^|[-_/.]){_ORDINAL}([-_/.]|$)|run[0-9]+[a-z]?\.", re.IGNORECASE)


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [p for p in out.splitlines() if (ROOT / p).is_file()]


def test_no_file_cites_a_past_round_of_work():
    found = []
    for path in _tracked():
        if path == "tests/test_repository.py":
            continue
        if HISTORY_NAME.search(path):
            found.append(f"{path}: file name")
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path}:{n}: {line.strip()[:100]}")
    assert not found, "history in the project:\n" + "\n".join(found[:50])


def test_history_pattern_catches_what_it_is_for():
    session = "sess" + "ion"  # spelled apart so this file does not match the hook's own grep
    for text in (f"the tenth {session}'s grid", f"fifth-{session} A/B", f"this {session}",
                 "decode-run7b.json", "the first sweep's 2 stages"):
        assert HISTORY.search(text), text
    for text in ("the first call compiles", "a nox session per concern", "rerun the grid"):
        assert not HISTORY.search(text), text
    assert HISTORY_NAME.search("benchmarks/h200/bench-fourteenth.json")
    assert not HISTORY_NAME.search("benchmarks/results/h200/bench.json")


def test_readme_commands_come_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    for marker in ("<!-- readme-command: setup -->", "<!-- readme-command: check -->"):
        assert marker in lines, marker
        at = lines.index(marker)
        assert lines[at + 1].startswith("```") and at + 2 < 30, (marker, at + 1)
