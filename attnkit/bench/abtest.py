"""``--env NAME=a,b``: the same run once per value of environment switches, each in a fresh
process (backends read some switches at import), the results labelled by the values.

Several ``--env`` options run every combination. The value ``unset`` removes the variable
from the child's environment (the backend's default). The parent only starts children and
reads back what they wrote; ``python -m attnkit.bench.abtest PAYLOAD.json`` is the child.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

UNSET = "unset"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(text: str) -> tuple[str, list[str]]:
    """``"NAME=a,b"`` -> ``("NAME", ["a", "b"])``."""
    name, eq, values = text.partition("=")
    if not eq or not _NAME.fullmatch(name):
        raise ValueError(f"--env takes NAME=VALUE[,VALUE...], got {text!r}")
    parts = [v.strip() for v in values.split(",")]
    if not parts or any(not v for v in parts) or len(set(parts)) < len(parts):
        raise ValueError(f"--env {name}: give distinct, non-empty values separated by commas "
                         f"(or {UNSET!r} for the variable removed), got {values!r}")
    return name, parts


def assignments(specs: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the values, in the order given (the first is the base)."""
    names = [n for n, _ in specs]
    if len(set(names)) < len(names):
        raise ValueError(f"--env names a variable twice: {names}")
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in specs))]


def tag(assignment: dict[str, str]) -> str:
    """A run's label: ``NAME=VALUE`` pairs joined by commas."""
    return ",".join(f"{k}={v}" for k, v in assignment.items())


def child_env(assignment: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in assignment.items():
        if v == UNSET:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_all(kwargs: dict, assigns: list[dict[str, str]]) -> tuple[dict[str, dict], list[str]]:
    """``run_benchmark(**kwargs)`` once per assignment, each in a child process; returns the
    results by tag and, for children that failed, one line each."""
    from .report import read_json

    results, failures = {}, []
    with tempfile.TemporaryDirectory(prefix="attnkit-bench-ab-") as tmp:
        for n, assignment in enumerate(assigns):
            out = Path(tmp) / str(n)
            payload = Path(tmp) / f"{n}.json"
            payload.write_text(json.dumps({"kwargs": kwargs, "out": str(out)}))
            print(f"== {tag(assignment)}", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, "-m", "attnkit.bench.abtest", str(payload)],
                                  env=child_env(assignment))
            found = list(out.glob("*.json"))
            if proc.returncode != 0 or len(found) != 1:
                failures.append(f"the run with {tag(assignment)} failed (exit code "
                                f"{proc.returncode}; its messages are above)")
                continue
            result = read_json(found[0])
            result["config"]["env"] = assignment
            results[tag(assignment)] = result
    return results, failures


def main(argv: list[str] | None = None) -> int:
    """The child: run what the payload says and write the result (no plot) to its ``out``."""
    argv = sys.argv[1:] if argv is None else argv
    from . import run_benchmark, save

    payload = json.loads(Path(argv[0]).read_text())
    try:
        result = run_benchmark(**payload["kwargs"])
    except ValueError as e:
        print(f"attnkit bench: {e}", file=sys.stderr)
        return 2
    save(result, payload["out"], plot=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
