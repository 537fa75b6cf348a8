"""`attnkit backends` and `attnkit check`, as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

from attnkit.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "attnkit.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd)


def test_backends_json(capsys):
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ref = next(b for b in data["backends"] if b["name"] == "reference")
    assert ref["available"] is True and ref["priority"] is None
    assert ref["capabilities"]["dtypes"] == ["bfloat16", "float16", "float32", "float64"]
    assert ref["distribution"] == "attnkit 0.1.0 (built in)" and ref["version"] == "0.1.0"
    assert isinstance(data["failed_plugins"], list)


def test_backends_text_shows_failed_plugin(tmp_path):
    # A real broken distribution on the path: entry point to a module that does not import.
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[attnkit]\nbroken = broken_plugin_mod\n")
    (tmp_path / "broken_plugin_mod.py").write_text("raise ImportError('missing libcuda')\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = _cli("backends", env=env)
    assert r.returncode == 0, r.stderr
    assert "reference" in r.stdout
    assert "FAILED plugin broken (broken-plugin 1.0): ImportError: missing libcuda" in r.stdout
    r = _cli("backends", env={**env, "ATTNKIT_STRICT_PLUGINS": "1"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "attnkit backends: error: attnkit plugins failed to load (ATTNKIT_STRICT_PLUGINS=1): "
        "plugin 'broken' (distribution broken-plugin 1.0): ImportError: missing libcuda"]
    r = _cli("backends", env={**env, "ATTNKIT_PLUGINS": ""})
    assert "FAILED" not in r.stdout and "reference" in r.stdout


def test_check_reference_quick():
    r = _cli("check", "reference", "--quick", cwd="/")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "backend 'reference' on cpu: forward ran" in r.stdout
    assert " passed" in r.stdout


def test_check_unknown_backend():
    r = _cli("check", "no-such-backend")
    assert r.returncode != 0
    assert "unknown backend 'no-such-backend'" in r.stdout + r.stderr


def test_check_passes_pytest_args():
    r = _cli("check", "reference", "--quick", "--", "-k", "fp32 and causal", "--co")
    assert r.returncode == 0, r.stdout[-2000:]
    assert "fp32" in r.stdout and "fp16" not in r.stdout


def _collected(*args) -> list[str]:
    r = _cli("check", "reference", "--quick", *args, "--", "--co", "-q")
    assert r.returncode == 0, r.stdout[-2000:]
    return [line for line in r.stdout.splitlines() if "::" in line]


def test_check_parts_run_every_test_once():
    whole = _collected()
    parts = [_collected("--part", f"{k}/3") for k in (1, 2, 3)]
    assert sum(parts, []) == whole  # consecutive slices, in order, none twice
    assert all(len(whole) // 3 <= len(p) <= len(whole) // 3 + 1 for p in parts)
    r = _cli("check", "reference", "--quick", "--part", "4/3")
    assert r.returncode == 2 and "expected K/N with 1 <= K <= N" in r.stderr


@pytest.mark.parametrize("device", ["cuda"])
def test_check_refuses_missing_device(device):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = _cli("check", "reference", "--device", device)
    assert r.returncode != 0 and "sees no CUDA device" in r.stdout + r.stderr


@pytest.mark.parametrize("args, message", [
    (["demo", "--backend", "no-such", "--seqlen", "8"], "unknown backend 'no-such'"),
    (["demo", "--seqlen", "0"], "--seqlen must be at least 1, got 0"),
    (["demo", "--device", "cuda:99"], "--device cuda:99: "),
    (["demo", "--device", "nowhere"], "--device 'nowhere' is not a device torch knows"),
])
def test_demo_user_errors_are_one_line(args, message, capsys):
    """No traceback: one line on stderr naming the problem, exit status 2."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("attnkit demo: error: ")
    assert message in err


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--dtype", "float8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["attnkit demo: error: argument --dtype: invalid choice: "
                                "'float8' (choose from 'float16', 'bfloat16', 'float32') "
                                "(see attnkit demo --help)"]
