"""`attnkit bench` on a CPU: formulas, the JSON it writes, failing cells kept as data, the
modes, labelled runs and comparisons, the environment A/B, the README's tables, and the
committed results."""

from __future__ import annotations

import copy
import importlib
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from attnkit import Backend, Capabilities, reference
from attnkit.bench import attention_flops, kv_bytes, run_benchmark, standard_shape
from attnkit.bench import cache as bench_cache
from attnkit.bench.compare import compare_table, ratios
from attnkit.bench.grid import STANDARD_MODEL_DIM, STANDARD_TOKENS, default_decode, default_grid
from attnkit.bench.progress import Progress
from attnkit.bench.report import SCHEMA, read_json, readme_tables
from attnkit.bench.tables import table
from attnkit.bench.timing import measure
from attnkit.cli import main
from attnkit.registry import registry

# The module, not the function of the same name that attnkit.bench exports.
bench_env = importlib.import_module("attnkit.bench.environment")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

TINY = ["--device", "cpu", "--seqlens", "32,64", "--head-dims", "16", "--tokens", "128",
        "--model-dim", "32", "--warmup-ms", "0", "--rep-ms", "2", "--quiet"]

CELL_KEYS = {"backend", "kind", "mode", "dtype", "batch", "heads_q", "heads_kv", "seqlen_q",
             "seqlen_k", "head_dim", "causal", "status", "error", "ms", "ms_min", "reps",
             "flops", "tflops", "bytes", "tbps", "ratio_vs_sdpa_flash", "mem_peak_bytes",
             "mem_extra_bytes", "max_abs_diff_vs_sdpa", "notes"}


class _RefForward(Backend):
    """Computes with the reference: a correct backend for the harness to time."""

    capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))

    def forward(self, problem, q, k, v, seqlens_k):
        out, lse = reference.safe(q, k, v, causal=problem.causal, scale=problem.scale,
                                  seqlens_k=seqlens_k)
        return out, lse.float()

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k):
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            o, _ = reference.safe(qq, kk, vv, causal=problem.causal, scale=problem.scale,
                                  seqlens_k=seqlens_k)
            return torch.autograd.grad(o, (qq, kk, vv), dout)


class _Boom(_RefForward):
    name = "bench-boom"

    def forward(self, problem, q, k, v, seqlens_k):
        if problem.seqlen_q >= 64:
            raise RuntimeError("boom at 64")
        return super().forward(problem, q, k, v, seqlens_k)


class _NoCausal(_RefForward):
    name = "bench-nocausal"
    capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                                causal=False, seqlens_k=False)


class _Oom(_RefForward):
    name = "bench-oom"

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")


@pytest.fixture
def test_backends():
    names = []
    for b in (_Boom(), _NoCausal(), _Oom()):
        registry.register(b, priority=None, plugin="test_bench")
        names.append(b.name)
    yield names
    for n in names:
        registry.unregister(n)


# -- formulas and grids ----------------------------------------------------------------------

def test_flop_formulas():
    base = 4 * 2 * 16 * 512 * 1024 * 64
    assert attention_flops(2, 16, 512, 1024, 64, False, "fwd") == base
    assert attention_flops(2, 16, 512, 1024, 64, True, "fwd") == base / 2
    assert attention_flops(2, 16, 512, 1024, 64, False, "bwd") == 2.5 * base
    assert attention_flops(2, 16, 512, 1024, 64, True, "fwd_bwd") == 3.5 * base / 2
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, False, "backward")
    # K and V of a bf16 cache: 2 tensors * B * Hkv * S * D * 2 bytes.
    assert kv_bytes(16, 8, 1024, 128, torch.bfloat16) == 2 * 16 * 8 * 1024 * 128 * 2
    assert kv_bytes(1, 1, 10, 4, torch.float32) == 2 * 10 * 4 * 4


def test_standard_grid_is_flashattention_s():
    spec = default_grid("cuda")
    assert spec.seqlens == (512, 1024, 2048, 4096, 8192, 16384)
    assert spec.head_dims == (64, 128, 256) and spec.causal == (False, True)
    assert spec.dtypes == ("fp16", "bf16") and spec.modes == ("fwd", "bwd", "fwd_bwd")
    shapes = spec.shapes()
    assert len(shapes) == 6 * 3 * 2 * 2
    for s in shapes:
        assert s.batch * s.seqlen == 16384 and s.heads * s.head_dim == 2048
    d = default_decode("cuda")
    assert (d.batch, d.heads_q, d.heads_kv, d.head_dim, d.dtype, d.seqlen_q) == (
        16, 32, 8, 128, "bf16", 1)
    assert d.cache_lens == (1024, 4096, 16384, 65536)
    cpu = default_grid("cpu")
    assert cpu.dtypes == ("fp32",) and min(cpu.seqlens) == 256 and max(cpu.seqlens) == 2048
    assert (STANDARD_TOKENS, STANDARD_MODEL_DIM) == (16384, 2048)
    assert standard_shape(512, 64) == (32, 32) and standard_shape(16384, 128) == (1, 16)
    assert standard_shape(32768, 128) == (1, 16)  # at least one sequence
    with pytest.raises(ValueError, match="not a multiple of head dim 96"):
        standard_shape(512, 96)


def test_the_standard_grid_is_written_down_once():
    # Every other place asks grid.py (standard_shape, STANDARD_*) instead of re-deriving it.
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    found = [f"{f}:{n}" for f in files if f != "attnkit/bench/grid.py"
             and (ROOT / f).is_file()
             for n, line in enumerate((ROOT / f).read_text().splitlines(), 1)
             if re.search(r"\b(16384|2048) ?//", line)]
    assert not found, found


def test_the_harness_uses_plugins_through_the_public_api_only():
    for path in (ROOT / "attnkit" / "bench").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) attnkit_\w+", text, re.M), path.name


def test_measure_counts_reps_and_times_slow_calls_once():
    calls = []
    t = measure(lambda: calls.append(1), "cpu", warmup_ms=0, rep_ms=5, min_reps=3,
                max_reps=7)
    assert 3 <= t.reps <= 7 and 0 <= t.min_ms <= t.median_ms
    assert len(calls) == 2 + t.reps  # first call, the estimate, the timed reps

    import time

    slow = []
    t = measure(lambda: (slow.append(1), time.sleep(0.03)), "cpu", rep_ms=10)
    assert t.reps == 1 and t.median_ms >= 30 and len(slow) == 2


def test_progress_prints_lines_when_not_a_terminal():
    stream = io.StringIO()
    p = Progress(stream=stream)
    p.start(20)
    for i in range(20):
        p.step(f"cell {i}")
    p.finish()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert 5 <= len(lines) <= 12 and lines[-1].startswith("[100%] 20 cells")


# -- end to end through the CLI --------------------------------------------------------------

def _check_schema(result: dict, kind: str):
    assert result["schema"] == SCHEMA and result["kind"] == kind
    env = result["environment"]
    assert env["date"] and env["device"]["type"] == "cpu" and env["device"]["name"]
    v = env["versions"]
    assert v["torch"] == torch.__version__ and v["attnkit"]
    assert "reference" in v["backends"] and "version" in v["backends"]["reference"]
    assert "cupy" in v and "triton" in v
    assert result["formulas"]["flops"].startswith("4*B*H*Sq*Sk*D")
    for c in result["cells"]:
        assert set(c) == CELL_KEYS, set(c) ^ CELL_KEYS
        assert c["status"] in ("ok", "error", "oom", "unsupported", "skipped")
        if c["status"] == "ok":
            assert c["error"] is None and c["ms"] > 0 and c["reps"] >= 1
        else:
            assert c["ms"] is None and c["error"]


def test_grid_end_to_end(tmp_path, test_backends, capsys):
    out = tmp_path / "res"
    rc = main(["bench", *TINY, "--out", str(out), "--backends",
               "reference,sdpa-flash,sdpa-math,bench-boom,bench-nocausal,bench-oom"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fp32 D=16 causal fwd_bwd" in printed and "boom at 64" in printed
    result = read_json(out / "bench.json")
    _check_schema(result, "grid")
    cells = result["cells"]
    assert len(cells) == 6 * 2 * 2 * 3  # backends * seqlens * causal * modes
    # The baseline runs first; ratios are against it, and its own ratio is 1.
    assert cells[0]["backend"] == "sdpa-flash"
    by = {(c["backend"], c["mode"], c["seqlen_q"], c["causal"]): c for c in cells}
    for c in cells:
        if c["status"] == "ok":
            assert c["tflops"] == pytest.approx(c["flops"] / (c["ms"] * 1e-3) / 1e12)
            flash = by[("sdpa-flash", c["mode"], c["seqlen_q"], c["causal"])]
            assert c["ratio_vs_sdpa_flash"] == pytest.approx(c["tflops"] / flash["tflops"])
    assert by[("sdpa-flash", "fwd", 64, True)]["ratio_vs_sdpa_flash"] == pytest.approx(1.0)
    # The grid: batch * seqlen = tokens, heads * D = model dim, FLOPs by the formula.
    c = by[("reference", "fwd_bwd", 64, True)]
    assert (c["batch"], c["heads_q"], c["head_dim"]) == (2, 2, 16)
    assert c["flops"] == attention_flops(2, 2, 64, 64, 16, True, "fwd_bwd")
    # Every contender's output is checked against SDPA's in the forward cells.
    for name in ("reference", "sdpa-math"):
        assert by[(name, "fwd", 64, False)]["max_abs_diff_vs_sdpa"] < 1e-4
    # A raising backend: its cells hold the error, the run went on past it.
    assert by[("bench-boom", "fwd", 32, False)]["status"] == "ok"
    boom = by[("bench-boom", "fwd", 64, False)]
    assert boom["status"] == "error" and "RuntimeError: boom at 64" in boom["error"]
    assert by[("bench-boom", "fwd_bwd", 64, True)]["status"] == "error"
    # A backend that declares no causal support: unsupported with its reason, not run.
    nc = by[("bench-nocausal", "bwd", 32, True)]
    assert nc["status"] == "unsupported" and "causal=True not supported" in nc["error"]
    assert by[("bench-nocausal", "bwd", 32, False)]["status"] == "ok"
    # Out of memory is its own status.
    assert by[("bench-oom", "fwd", 32, False)]["status"] == "ok"
    oom = by[("bench-oom", "fwd_bwd", 32, False)]
    assert oom["status"] == "oom" and "out of memory" in oom["error"]
    assert by[("sdpa-math", "fwd_bwd", 64, True)]["status"] == "ok"  # ran after them all
    # Memory is CUDA-only: recorded as absent on a CPU.
    assert all(c["mem_peak_bytes"] is None for c in cells)
    assert result["files"]["json"].endswith("bench.json")
    table = (out / "bench.txt").read_text()
    assert "fp32 D=16 non-causal bwd" in table and "Summary" in table
    assert "bench-boom" in printed.split("Summary")[1]  # the summary closes the output
    pytest.importorskip("matplotlib")
    png = out / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_backends_skip_reference_and_record_why(tmp_path):
    result = run_benchmark(device="cpu", seqlens=[32], head_dims=[16], tokens=32, model_dim=16,
                           modes=["fwd"], causal=[False], warmup_ms=0, rep_ms=1,
                           progress=False)
    names = {c["name"] for c in result["contenders"]}
    assert "reference" not in names and "sdpa-flash" in names
    assert "reference" in result["left_out"]
    # SDPA kernels that do not run on a CPU are left out with SDPA's reason.
    assert "sdpa-cudnn" in result["left_out"] and "sdpa-cudnn" not in names
    assert all(c["status"] in ("ok", "unsupported") for c in result["cells"])


def test_decode_end_to_end(tmp_path, test_backends):
    rc = main(["bench", "--decode", "--device", "cpu", "--cache-lens", "64,256", "--quiet",
               "--warmup-ms", "0", "--rep-ms", "2", "--out", str(tmp_path),
               "--backends", "reference,sdpa-flash,bench-nocausal"])
    assert rc == 0
    result = json.loads((tmp_path / "decode.json").read_text())
    _check_schema(result, "decode")
    by = {(c["backend"], c["seqlen_k"]): c for c in result["cells"]}
    spec = result["config"]["decode"]
    for name in ("reference", "sdpa-flash"):
        c = by[(name, 256)]
        assert c["status"] == "ok" and c["mode"] == "decode" and c["seqlen_q"] == 1
        assert c["bytes"] == kv_bytes(spec["batch"], spec["heads_kv"], 256, spec["head_dim"],
                                      torch.float32)
        assert c["tbps"] == pytest.approx(c["bytes"] / (c["ms"] * 1e-3) / 1e12)
        # Same logical problem: GQA, every cached key visible to the one new query.
        assert c["max_abs_diff_vs_sdpa"] < 1e-4
    assert by[("reference", 64)]["ratio_vs_sdpa_flash"] is not None
    nc = by[("bench-nocausal", 64)]
    assert nc["status"] == "unsupported" and "seqlens_k not supported" in nc["error"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "decode.png").stat().st_size > 1000


def test_plot_from_saved_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["bench", *TINY, "--backends", "sdpa-math", "--modes", "fwd", "--no-plot",
                 "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "bench.png").exists()
    capsys.readouterr()
    assert main(["bench", "--plot-from", str(tmp_path / "bench.json")]) == 0
    assert "sdpa-math" in capsys.readouterr().out
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bad_options_are_clear_errors(tmp_path, capsys):
    rc = main(["bench", *TINY, "--backends", "no-such-backend", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown backend(s) ['no-such-backend']" in err and "sdpa-flash" in err
    with pytest.raises(SystemExit):
        main(["bench", "--seqlens", "1x,2"])
    with pytest.raises(ValueError, match="dtype"):
        run_benchmark(device="cpu", dtypes=["fp8"], progress=False)


def test_slow_calls_and_time_limit_skip_with_reasons():
    kw = dict(device="cpu", seqlens=[16, 32], head_dims=[16], tokens=32, model_dim=16,
              modes=["fwd"], causal=[False], backends=["sdpa-math"], warmup_ms=0, rep_ms=1,
              progress=False)
    cells = run_benchmark(slow_call_s=0.0, **kw)["cells"]
    assert [c["status"] for c in cells] == ["ok", "skipped"]
    assert "a call at seqlen 16 already took" in cells[1]["error"]
    cells = run_benchmark(time_limit_s=0.0, **kw)["cells"]
    assert all(c["status"] == "skipped" and "time limit" in c["error"] for c in cells)


def test_a_corrupted_cuda_context_skips_the_rest():
    from attnkit.bench.grid import Cell
    from attnkit.bench.runner import _Session

    session = _Session(torch.device("cuda"), Progress(enabled=False))

    def crash(cell):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    first = session.run(Cell("bad", "attnkit", "fwd", "fp16", 1, 1, 1, 8, 8, 8, False), crash)
    assert first.status == "error" and "illegal memory access" in first.error
    after = session.run(Cell("good", "sdpa", "fwd", "fp16", 1, 1, 1, 8, 8, 8, False),
                        lambda cell: None)
    assert after.status == "skipped" and "left unusable by bad" in after.error


def test_grid_is_shape_major():
    # Peers take turns on each shape, so they are timed in the same state of the GPU
    # (backend-major runs read triton's long fwd+bwd cells 3-17% slow: docs/tuning.md).
    cells = run_benchmark(device="cpu", seqlens=[16, 32], head_dims=[16], tokens=32,
                          model_dim=16, modes=["fwd"], causal=[False],
                          backends=["sdpa-math", "reference"], warmup_ms=0, rep_ms=1,
                          progress=False)["cells"]
    assert [c["seqlen_q"] for c in cells] == [16, 16, 32, 32]
    assert {c["backend"] for c in cells[:2]} == {"sdpa-math", "reference"}


# -- provenance ------------------------------------------------------------------------------

def test_a_run_records_its_source_commit_and_switches(monkeypatch):
    monkeypatch.setenv("ATTNKIT_BENCH_TEST_SWITCH", "on")
    env = run_benchmark(device="cpu", seqlens=[16], head_dims=[16], tokens=16, model_dim=16,
                        modes=["fwd"], causal=[False], backends=["sdpa-math"], warmup_ms=0,
                        rep_ms=1, progress=False)["environment"]
    assert env["switches"]["ATTNKIT_BENCH_TEST_SWITCH"] == "on"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert env["source"]["commit"] == head and isinstance(env["source"]["dirty"], bool)


def test_outside_a_checkout_the_installed_version_stands_in(monkeypatch):
    monkeypatch.setattr(bench_env, "_git", lambda *a: None)
    monkeypatch.delenv(bench_env.COMMIT_ENV, raising=False)
    src = bench_env.source_revision()
    assert src["commit"] is None and src["dirty"] is None and src["installed"].startswith(
        "attnkit ")
    monkeypatch.setenv(bench_env.COMMIT_ENV, "abc1234")
    assert bench_env.source_revision()["commit"] == "abc1234"
    assert bench_env.COMMIT_ENV not in bench_env.switches()


def test_a_given_commit_names_a_copied_tree_whose_git_is_older(monkeypatch):
    answers = {"rev-parse": "0ld", "status": " M attnkit/api.py"}
    monkeypatch.setattr(bench_env, "_git", lambda root, cmd, *a: (
        str(bench_env.Path(bench_env.__file__).resolve().parents[2]) if "--show-toplevel" in a
        else answers[cmd]))
    monkeypatch.delenv(bench_env.COMMIT_ENV, raising=False)
    assert bench_env.source_revision() == {"commit": "0ld", "dirty": True}
    monkeypatch.setenv(bench_env.COMMIT_ENV, "n3w")
    src = bench_env.source_revision()
    assert src["commit"] == "n3w" and src["dirty"] is None
    assert src["git"] == {"commit": "0ld", "dirty": True}


def test_committed_results_are_one_set_per_gpu_with_their_provenance():
    dirs = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    assert {"h100", "h200"} <= {p.name for p in dirs}
    # Every GPU has the grid and the decoding table; the other modes' results where run.
    required = {f"{s}.{e}" for s in ("bench", "decode") for e in ("json", "txt", "png")}
    optional = {f"{s}.{e}" for s in ("varlen", "paged", "context_parallel", "model_step")
                for e in ("json", "txt")} | {"dropout.txt"}
    kinds = {"bench": "grid", "decode": "decode", "varlen": "varlen", "paged": "paged",
             "context_parallel": "context_parallel", "model_step": "model_step"}
    for d in dirs:
        names = {p.name for p in d.iterdir()}
        assert required <= names and names - required <= optional, d
        for stem, kind in kinds.items():
            if not (d / f"{stem}.json").exists():
                continue
            result = json.loads((d / f"{stem}.json").read_text())
            env = result["environment"]
            assert result["kind"] == kind and env["device"]["type"] == "cuda"
            assert d.name in env["device"]["name"].lower()
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*", env["date"])
            assert env["versions"]["torch"] and env["versions"]["triton"]
            assert re.fullmatch(r"[0-9a-f]{40}", env["source"]["commit"])
            # unknown only where the commit was given ($ATTNKIT_BENCH_COMMIT), which says so
            assert isinstance(env["source"]["dirty"], bool) or "note" in env["source"]
            assert "files" not in result  # where a machine once wrote it is no provenance


# -- comparisons, labels, A/B ----------------------------------------------------------------

def _result(kind: str, values: dict[tuple[str, int], float], status=None) -> dict:
    """A minimal result: cells of backend/seqlen with the given throughput (or host time)."""
    field = {"grid": "tflops", "decode": "tbps", "host": "host_us"}[kind]
    cells = []
    for (backend, s), x in values.items():
        cells.append({"backend": backend, "kind": "sdpa" if backend.startswith("sdpa")
                      else "attnkit", "mode": "decode" if kind == "decode" else "fwd",
                      "dtype": "bf16", "batch": standard_shape(s, 128)[0], "heads_q": 16,
                      "heads_kv": 16,
                      "seqlen_q": s, "seqlen_k": s, "head_dim": 128, "causal": False,
                      "status": (status or {}).get((backend, s), "ok"), "error": None,
                      field: x, "notes": []})
    return {"schema": SCHEMA, "kind": kind, "cells": cells}


def test_ratios_are_speedups_over_the_base_in_every_unit():
    base = _result("grid", {("triton", 512): 100.0, ("triton", 1024): 200.0,
                            ("sdpa-flash", 512): 50.0})
    run = _result("grid", {("triton", 512): 110.0, ("triton", 1024): 100.0,
                           ("sdpa-flash", 512): 50.0, ("cupy", 512): 9.0})
    r = ratios(run, base)
    assert sorted(r.values()) == pytest.approx([0.5, 1.0, 1.1])  # cupy has no base cell
    # Host time: lower is faster, so the ratio is the base's time over the run's.
    h = ratios(_result("host", {("triton", 512): 20.0}), _result("host", {("triton", 512): 30.0}))
    assert list(h.values()) == pytest.approx([1.5])
    failed = _result("grid", {("triton", 512): 1.0}, status={("triton", 512): "error"})
    assert ratios(failed, base) == {}
    with pytest.raises(ValueError, match="cannot compare a grid result with a host one"):
        ratios(run, _result("host", {}))
    text = compare_table({"old": base, "new": run}, "old")
    assert "fwd bf16 D=128 H=16" in text and "1.10" in text and "0.50" in text
    gm = re.search(r"triton\s+([\d.]+) \(2\)", text)
    assert gm and float(gm.group(1)) == pytest.approx((1.1 * 0.5) ** 0.5, abs=1e-3)


def test_compare_reads_a_backend_against_a_peers_own_change():
    # The whole GPU 10% slower in the new run, and triton's 1k cell 5% slower still.
    base = _result("grid", {("triton", 512): 100.0, ("triton", 1024): 200.0,
                            ("sdpa-flash", 512): 50.0, ("sdpa-flash", 1024): 80.0})
    run = _result("grid", {("triton", 512): 90.0, ("triton", 1024): 200.0 * 0.9 * 0.95,
                           ("sdpa-flash", 512): 45.0, ("sdpa-flash", 1024): 72.0})
    text = compare_table({"old": base, "new": run}, "old")
    line = re.search(r"triton / sdpa-flash\s+([\d.]+)\s+(\d+)%", text)
    assert line, text
    assert float(line.group(1)) == pytest.approx(0.95 ** 0.5, abs=1e-3)
    assert line.group(2) == "50"  # 512 within 3%, 1k not
    assert "sdpa-flash / sdpa-flash" not in text and "sdpa-cudnn" not in text  # no such peer


def test_label_then_compare(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(bench_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = [*TINY, "--backends", "sdpa-math,reference", "--modes", "fwd", "--causal", "false",
            "--no-plot"]
    assert main(["bench", *args, "--label", "before"]) == 0
    saved = tmp_path / "cache" / "before" / "bench.json"
    assert read_json(saved)["kind"] == "grid"
    assert not (tmp_path / "attnkit-bench").exists()  # a labelled run needs no --out
    capsys.readouterr()
    # The same label compared and rewritten: the comparison is against the earlier run.
    assert main(["bench", *args, "--label", "before", "--compare", "before",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    after = out.split("Against label before: TFLOP/s of this run over it")[1]
    assert "fwd fp32 D=16 H=2" in after and "Geometric mean over label before" in after
    cells = re.findall(r"^\s+(32|64)\s+([\d.]+)\s+([\d.]+)$", after, re.M)
    assert len(cells) == 2  # one row per seqlen, a ratio per backend
    # A results directory and a file are compared the same way.
    assert main(["bench", *args, "--compare", str(tmp_path / "out"), "--out",
                 str(tmp_path / "o2")]) == 0
    assert f"Against {tmp_path / 'out' / 'bench.json'}" in capsys.readouterr().out
    assert bench_cache.labels() == ["before"]


def test_env_ab_runs_each_value_in_a_fresh_process(tmp_path, capsys):
    rc = main(["bench", *TINY, "--backends", "sdpa-math", "--modes", "fwd", "--causal",
               "false", "--seqlens", "32", "--no-plot", "--out", str(tmp_path),
               "--env", "ATTNKIT_BENCH_TEST_AB=one,unset"])
    assert rc == 0
    out = capsys.readouterr().out
    one = read_json(tmp_path / "ATTNKIT_BENCH_TEST_AB=one" / "bench.json")
    unset = read_json(tmp_path / "ATTNKIT_BENCH_TEST_AB=unset" / "bench.json")
    # Each child saw its own value; the parent's environment never had it.
    assert one["environment"]["switches"]["ATTNKIT_BENCH_TEST_AB"] == "one"
    assert "ATTNKIT_BENCH_TEST_AB" not in unset["environment"]["switches"]
    assert one["config"]["env"] == {"ATTNKIT_BENCH_TEST_AB": "one"}
    assert "Against ATTNKIT_BENCH_TEST_AB=one: TFLOP/s of each run over it" in out
    assert re.search(r"^\s+32\s+[\d.]+$", out, re.M)  # the ratio of the other run


# -- modes -----------------------------------------------------------------------------------

def test_host_overhead_on_a_cpu(tmp_path, capsys):
    rc = main(["bench", "--host-overhead", "--device", "cpu", "--seqlens", "32", "--head-dims",
               "16", "--tokens", "64", "--model-dim", "32", "--cache-lens", "64", "--quiet",
               "--backends", "sdpa-flash,sdpa-math", "--out", str(tmp_path)])
    assert rc == 0
    result = read_json(tmp_path / "host.json")
    by = {(c["backend"], c["mode"]): c for c in result["cells"]}
    assert {m for _, m in by} == {"fwd", "fwd_bwd", "decode"}
    for mode in ("fwd", "fwd_bwd", "decode"):
        flash, math_ = by[("sdpa-flash", mode)], by[("sdpa-math", mode)]
        assert flash["status"] == "ok" and 0 < flash["host_us_min"] <= flash["host_us"]
        assert math_["host_vs_sdpa_flash"] == pytest.approx(math_["host_us"] / flash["host_us"])
        assert flash["gpu_us"] is None  # a CPU has no separate device time
    assert by[("sdpa-math", "decode")]["heads_kv"] < by[("sdpa-math", "decode")]["heads_q"]
    assert by[("sdpa-math", "fwd")]["causal"] is True  # the grid's host-bound case
    assert result["config"]["host"] == {"calls": 10, "batches": 3}
    text = capsys.readouterr().out
    assert "host us per call" in text and "decode fp32 B=4 Hq=8 Hkv=2 D=64 cache=64" in text
    assert not (tmp_path / "host.png").exists()


@pytest.fixture
def nocausal():
    b = _NoCausal()
    registry.register(b, priority=None, plugin="test_bench")
    yield b.name
    registry.unregister(b.name)


def test_host_overhead_records_unsupported_rows(tmp_path, nocausal):
    result = run_benchmark(device="cpu", host_overhead=True, seqlens=[32], head_dims=[16],
                           tokens=64, model_dim=32, cache_lens=[64],
                           backends=["sdpa-math", nocausal], progress=False)
    rows = {c["mode"]: c for c in result["cells"] if c["backend"] == nocausal}
    assert rows["fwd"]["status"] == "unsupported" and "causal" in rows["fwd"]["error"]
    assert rows["decode"]["status"] == "unsupported"


def test_sustained_on_a_cpu(tmp_path):
    assert main(["bench", "--sustained", "0.05", "--device", "cpu", "--seqlens", "32",
                 "--head-dims", "16", "--tokens", "64", "--model-dim", "32", "--quiet",
                 "--backends", "sdpa-flash,sdpa-math", "--out", str(tmp_path)]) == 0
    result = read_json(tmp_path / "sustained.json")
    assert result["config"]["sustained_s"] == 0.05
    assert len(result["cells"]) == 2
    for c in result["cells"]:
        assert c["status"] == "ok" and [p["pass"] for p in c["passes"]] == [0, 1]
        assert c["ms"] == pytest.approx(sum(p["ms"] for p in c["passes"]) / 2)
        assert c["tflops"] == pytest.approx(c["flops"] / (c["ms"] * 1e-3) / 1e12)
        # No nvidia-smi on a CPU run: no samples, nothing made up.
        assert all(p["samples"] == 0 and p["sm_mhz"] is None for p in c["passes"])
    assert "pass" in (tmp_path / "sustained.txt").read_text()


def test_graph_table_shows_eager_and_replay():
    cells = []
    for mode, tbps in (("decode", 1.0), ("decode_graph", 2.0)):
        for b in ("sdpa-flash", "triton"):
            cells.append({"backend": b, "mode": mode, "seqlen_k": 1024, "status": "ok",
                          "tbps": tbps, "ratio_vs_sdpa_flash": 1.0, "notes": []})
    result = {"kind": "graphs", "cells": cells, "elapsed_s": 1.0, "left_out": {},
              "environment": {"device": {"name": "GPU"}},
              "config": {"decode": {"batch": 16, "heads_q": 32, "heads_kv": 8,
                                    "head_dim": 128, "dtype": "bf16", "seqlen_q": 1}}}
    text = table(result)
    assert "eager calls" in text and "replays of a CUDA graph" in text
    assert text.index("1.00") < text.index("replays") < text.index("2.00")


# -- user errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--out", "{file}/sub"], "cannot write results to"),
    (["--env", "NOEQUALS"], "--env takes NAME=VALUE"),
    (["--env", "A=x,x"], "distinct, non-empty values"),
    (["--graphs"], "needs a CUDA device"),
    (["--compare", "no-such-label"], "no such label"),
    (["--label", "bad label"], "label 'bad label'"),
    (["--sustained", "0"], "positive number of seconds"),
    (["--seqlens", "1x"], "expected integers"),
    (["--report", "{file}"], "cannot read a result from"),
])
def test_user_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv(bench_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not json")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    try:
        rc = main(["bench", "--device", "cpu", "--quiet", *argv])
    except SystemExit as e:  # argparse's errors exit
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


# -- the README's tables ---------------------------------------------------------------------

def test_readme_tables_from_results(tmp_path):
    h200 = read_json(RESULTS / "h200" / "bench.json")
    grid = copy.deepcopy(h200)
    grid["environment"]["source"] = {"commit": "0123456789" * 4, "dirty": False}
    for c in grid["cells"]:  # every triton cell twice sdpa-flash's, one cupy cell missing
        if c["backend"] == "triton" and c["ratio_vs_sdpa_flash"]:
            c["ratio_vs_sdpa_flash"] = 2.0
    cupy = [c for c in grid["cells"] if c["backend"] == "cupy" and c["mode"] == "bwd"]
    cupy[0]["status"], cupy[0]["ratio_vs_sdpa_flash"] = "error", None
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "bench.json").write_text(json.dumps(grid))
    text = readme_tables([tmp_path / "g"])
    heading = text.splitlines()[0]
    assert heading.startswith("### NVIDIA H200, 2026-12-04 (torch 2.11.0+cu130")
    assert "Triton 3.6.0" in heading and "cuDNN 9.19.0" in heading
    assert heading.endswith("; commit 0123456)")
    assert "| attnkit `triton` | 2.00x | 2.00x | 2.00x |" in text
    assert "(47 of 48 cells)" in text and "Decode" not in text
    both = readme_tables([RESULTS / "h200", RESULTS / "h100"])
    assert both.count("### ") == 2 and "H100 80GB HBM3, 2026-12-07" in both
    assert "TB/s of K+V read at 1k / 4k / 16k / 64k keys" in both


def test_readme_holds_what_the_report_generates():
    # The README's block is `attnkit bench --report benchmarks/results/*`, pasted as printed.
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("<!-- bench-tables:start -->")
    end = lines.index("<!-- bench-tables:end -->", start)
    block = "\n".join(lines[start + 1:end]).strip()
    dirs = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    assert block == readme_tables(dirs).strip(), (
        "README out of date: paste the output of attnkit bench --report benchmarks/results/* "
        "between its bench-tables markers")


# -- varlen ----------------------------------------------------------------------------------

def test_varlen_mixes_and_flops():
    from attnkit.bench.varlen import mix_lengths, varlen_flops

    assert mix_lengths("equal", 16384, 2048) == [2048] * 8
    tail = mix_lengths("long-tailed", 65536, 2048)
    assert sum(tail) == 65536 and tail[:2] == [16384, 16384] and len(tail) > 20
    assert max(tail[2:]) < 16384 and min(tail) >= 1
    small = mix_lengths("long-tailed", 512, 128)
    assert sum(small) == 512 and len(small) > 10
    # Summed per document: two documents of 100 are half the work of one of 200, squared.
    one = attention_flops(1, 4, 100, 100, 16, True)
    assert varlen_flops([100, 0, 100], 4, 16, True, "fwd") == 2 * one
    assert varlen_flops([100], 4, 16, False, "fwd_bwd") == 3.5 * 2 * one
    with pytest.raises(ValueError, match="unknown length mix 'zipf'"):
        mix_lengths("zipf", 100, 10)


def test_varlen_padded_peer_left_out_past_32_bit_offsets():
    from attnkit.bench.varlen import _padded_skip, mix_lengths

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    tail = mix_lengths("long-tailed", 65536, 2048)  # 81 documents, the longest 16k
    reason = _padded_skip(tail, 32, 64, cuda)
    assert reason and "2^31" in reason and "elements" in reason
    assert _padded_skip(mix_lengths("equal", 65536, 2048), 32, 64, cuda) is None
    assert _padded_skip(tail, 32, 64, cpu) is None  # the limit is the CUDA kernel's


def test_varlen_end_to_end_on_a_cpu(tmp_path, capsys):
    rc = main(["bench", "--varlen", "--device", "cpu", "--quiet", "--tokens", "256",
               "--head-dims", "16", "--model-dim", "32", "--warmup-ms", "0", "--rep-ms", "1",
               "--backends", "reference,sdpa-nested,sdpa-flash-padded",
               "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "attnkit bench --varlen" in printed and "Summary: geometric mean of varlen" in printed
    result = json.loads((tmp_path / "varlen.json").read_text())
    assert result["kind"] == "varlen" and (tmp_path / "varlen.txt").exists()
    cells = result["cells"]
    calls = {(c["backend"], c["call"]) for c in cells}
    # The reference is always installed (the core's tests run without plugins).
    assert {("reference", "varlen"), ("reference", "dense"), ("sdpa-nested", "sdpa-nested"),
            ("sdpa-flash-padded", "sdpa-flash-padded")} <= calls
    assert not any(c["call"] == "dense" and c["mix"] != "equal" for c in cells)
    for c in cells:
        if c["backend"] == "reference":
            assert c["status"] == "ok", c
            assert c["flops"] > 0 and c["tflops"] > 0
        if c["call"] != "sdpa-flash-padded" and c["mode"] == "fwd" and c["status"] == "ok":
            assert c["max_abs_diff_vs_sdpa"] is None or c["max_abs_diff_vs_sdpa"] < 1e-4, c
    tb = [c for c in cells if c["backend"] == "reference" and c["call"] == "varlen"]
    assert all(c["ratio_vs_dense"] for c in tb if c["mix"] == "equal")
    assert all(c["ratio_vs_sdpa_flash_padded"] for c in tb)
    # The same run compares with itself cell for cell.
    assert set(ratios(result, result).values()) == {1.0}


def test_varlen_with_dropout(tmp_path, capsys):
    """--varlen --dropout P: every packed and dense call drops (so does SDPA); no output
    check against SDPA, whose masks differ."""
    rc = main(["bench", "--varlen", "--device", "cpu", "--quiet", "--tokens", "256",
               "--head-dims", "16", "--model-dim", "32", "--warmup-ms", "0", "--rep-ms", "1",
               "--modes", "fwd", "--backends", "reference,sdpa-nested", "--dropout", "0.2",
               "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    assert "every call with dropout_p=0.2" in capsys.readouterr().out
    result = json.loads((tmp_path / "varlen.json").read_text())
    assert result["config"]["varlen"]["dropout_p"] == 0.2
    ours = [c for c in result["cells"] if c["backend"] == "reference"]
    assert ours and all(c["status"] == "ok" and c["max_abs_diff_vs_sdpa"] is None
                        for c in ours)


def test_grid_with_dropout(tmp_path, test_backends, capsys):
    """--dropout P: attnkit backends that declare dropout and SDPA run every call with it;
    a backend without dropout is recorded as unsupported, saying why."""
    out = tmp_path / "drop"
    rc = main(["bench", *TINY, "--out", str(out), "--dropout", "0.1",
               "--backends", "reference,sdpa-math,bench-nocausal"])
    assert rc == 0
    assert "every call with dropout_p=0.1" in capsys.readouterr().out
    result = read_json(out / "bench.json")
    assert result["config"]["grid"]["dropout_p"] == 0.1
    by_backend = {c["backend"]: c for c in result["cells"]}
    assert by_backend["reference"]["status"] == "ok"
    assert by_backend["sdpa-math"]["status"] == "ok"
    assert all(c["max_abs_diff_vs_sdpa"] is None for c in result["cells"])
