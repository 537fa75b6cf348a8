"""``attnkit bench --model-step`` on CPU: a tiny random Llama through the whole command (the
files, the table's rows, both implementations agreeing), a step that fails recorded in its
row, and the command's refusals (transformers absent, flags it does not read)."""

from __future__ import annotations

import json
import sys

import pytest

from attnkit.cli import main

TINY = ["bench", "--model-step", "--device", "cpu", "--quiet", "--seqlens", "16,32",
        "--tokens", "64", "--cache-lens", "24", "--warmup-ms", "0", "--rep-ms", "2"]


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    rc = main([*TINY, "--out", str(out), *extra])
    return rc, out


def test_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers")
    rc, out = _run(tmp_path)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads((out / "model_step.json").read_text())
    text = (out / "model_step.txt").read_text()
    assert result["kind"] == "model_step" and result["config"]["cache"] == "DynamicCache"
    assert {"device", "versions", "source", "date"} <= set(result["environment"])
    spec = result["config"]["spec"]
    assert spec["train_shapes"] == [[4, 16], [2, 32]] and spec["cache_lens"] == [24]
    rows = result["rows"]
    assert [(r["step"], r["batch"], r["seqlen"], r["mask"]) for r in rows] == [
        ("train", 4, 16, "none"), ("train", 4, 16, "ones"), ("train", 2, 32, "none"),
        ("train", 2, 32, "ones"), ("decode", 1, 24, "none"), ("decode", 1, 24, "ones")]
    for r in rows:
        assert r["status"] == "ok", r
        for impl in ("sdpa", "attnkit"):
            t = r[impl]
            assert not t["error"] and t["ms"] > 0 and len(t["ms_rounds"]) == 2, (impl, r)
            assert t["host_ms"] > 0 and not t["host_error"], (impl, r)  # the CPU never waits
        assert r["ratio"] == pytest.approx(r["sdpa"]["ms"] / r["attnkit"]["ms"])
        assert r["max_abs_diff"] < 1e-4, r  # fp32: the two compute the same step
        assert r["auto_backend"]
    # the table: one line per row under each step's heading, then the summary
    for label in ("4x16 mask=none", "4x16 mask=ones", "2x32 mask=none", "2x32 mask=ones",
                  "B=1 L=24 mask=none", "B=1 L=24 mask=ones"):
        assert sum(line.lstrip().startswith(label) for line in text.splitlines()) == 1, label
    assert text.index("Training step") < text.index("Decode step") < text.index("Summary")
    assert text.count("host ms attnkit") == 2
    assert "Summary: lowest sdpa/attnkit time ratio, training " in text
    assert text.strip() in printed


def test_a_failing_step_is_a_row(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    import attnkit.integrations.transformers as akt

    def refuse(*args, **kwargs):
        raise ValueError("refused for the test")

    monkeypatch.setattr(akt, "attention", refuse)
    rc, out = _run(tmp_path)
    assert rc == 1  # no row ran both
    result = json.loads((out / "model_step.json").read_text())
    for r in result["rows"]:
        assert r["status"] == "error" and r["ratio"] is None
        assert r["attnkit"]["error"] == "ValueError: refused for the test"
        assert r["sdpa"]["ms"] > 0 and not r["sdpa"]["error"]
    text = (out / "model_step.txt").read_text()
    assert "E1: ValueError: refused for the test" in text
    assert "training - (4 of 4 rows failed)" in text


def test_a_failing_prefill_fails_its_rows(tmp_path, capsys, monkeypatch):
    transformers = pytest.importorskip("transformers")

    def no_cache(*args, **kwargs):
        raise MemoryError("no room for the test")

    monkeypatch.setattr(transformers, "DynamicCache", no_cache)
    rc, out = _run(tmp_path)
    assert rc == 0  # the training rows ran
    rows = json.loads((out / "model_step.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"] * 2
    for r in rows[4:]:
        for impl in ("sdpa", "attnkit"):
            assert r[impl]["error"] == "prefill of the cache: MemoryError: no room for the test"


def test_without_transformers(tmp_path, capsys, monkeypatch):
    for name in ("transformers", "attnkit.integrations.transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    rc, out = _run(tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and not (out / "model_step.json").exists()
    assert "--model-step needs Hugging Face transformers" in err
    assert "pip install 'attnkit[transformers]'" in err


@pytest.mark.parametrize("extra, says", [
    (["--backends", "torch-blocked,reference"], "runs one attnkit backend"),
    (["--backends", "sdpa-flash"], "not an available attnkit backend"),
    (["--compare", "x"], "--compare do(es) not apply to --model-step"),
    (["--head-dims", "32"], "--head-dims do(es) not apply"),
])
def test_refused(tmp_path, capsys, extra, says):
    rc, out = _run(tmp_path, *extra)
    err = capsys.readouterr().err
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "model_step.json").exists()
