"""`attnkit bench` on a CPU: formulas, the JSON it writes, and failing cells kept as data."""

from __future__ import annotations

import io
import json

import pytest
import torch

from attnkit import Backend, Capabilities, reference
from attnkit.bench import attention_flops, kv_bytes, run_benchmark
from attnkit.bench.grid import default_decode, default_grid
from attnkit.bench.progress import Progress
from attnkit.bench.report import SCHEMA, read_json
from attnkit.bench.timing import measure
from attnkit.cli import main
from attnkit.registry import registry

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
    assert spec.head_dims == (64, 128) and spec.causal == (False, True)
    assert spec.dtypes == ("fp16", "bf16") and spec.modes == ("fwd", "bwd", "fwd_bwd")
    shapes = spec.shapes()
    assert len(shapes) == 6 * 2 * 2 * 2
    for s in shapes:
        assert s.batch * s.seqlen == 16384 and s.heads * s.head_dim == 2048
    d = default_decode("cuda")
    assert (d.batch, d.heads_q, d.heads_kv, d.head_dim, d.dtype, d.seqlen_q) == (
        16, 32, 8, 128, "bf16", 1)
    assert d.cache_lens == (1024, 4096, 16384, 65536)
    cpu = default_grid("cpu")
    assert cpu.dtypes == ("fp32",) and min(cpu.seqlens) == 256 and max(cpu.seqlens) == 2048


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
    # (backend-major runs read triton's long fwd+bwd cells 3-17% slow: NOTES.md).
    cells = run_benchmark(device="cpu", seqlens=[16, 32], head_dims=[16], tokens=32,
                          model_dim=16, modes=["fwd"], causal=[False],
                          backends=["sdpa-math", "reference"], warmup_ms=0, rep_ms=1,
                          progress=False)["cells"]
    assert [c["seqlen_q"] for c in cells] == [16, 16, 32, 32]
    assert {c["backend"] for c in cells[:2]} == {"sdpa-math", "reference"}
