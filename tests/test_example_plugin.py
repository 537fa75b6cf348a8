"""The example third-party plugin, installed as a user would and run through the suite."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "attnkit-example-plugin")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), EXAMPLE], check=True)
    return {**os.environ,
            "PYTHONPATH": f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "attnkit.cli", *args], capture_output=True,
                          text=True, env=env)


def test_example_plugin_is_found(installed):
    r = _cli(installed, "backends", "--json")
    assert r.returncode == 0, r.stderr
    names = {b["name"]: b for b in json.loads(r.stdout)["backends"]}
    ex = names["example-sdpa"]
    assert ex["distribution"] == "attnkit-example-plugin 0.1.0"
    assert ex["capabilities"]["lse"] is False


def test_example_plugin_passes_the_suite(installed):
    r = _cli(installed, "check", "example-sdpa")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "backend 'example-sdpa' on cpu: forward ran" in r.stdout
    # It declares no window/seqlens_k/softcap/fp16: the suite checks those are refused.
    assert "failed" not in r.stdout


def test_example_plugin_selected_by_name(installed):
    code = ("import torch, attnkit; q = torch.randn(1, 2, 5, 8);"
            "print(attnkit.explain(q, q, q, causal=True).chosen)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**installed, "ATTNKIT_PLUGINS": "example_sdpa"})
    assert r.stdout.strip() == "example-sdpa", r.stderr
