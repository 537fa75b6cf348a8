"""``attnkit bench --context-parallel`` on CPU: one process (measured at world size 1 and
predicted), and two processes under torch.distributed.run (measured), tiny shapes."""

import json
import os
import subprocess
import sys

from test_distributed import fast_backend

ARGS = ["--context-parallel", "--device", "cpu", "--seqlens", "32", "--model-dim", "32",
        "--head-dims", "16", "--dtypes", "fp64", "--warmup-ms", "0", "--rep-ms", "1",
        "--backends", fast_backend()]


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((tmp_path / "out" / "context_parallel.json").read_text()), done.stdout


def _check_rows(rows, worlds):
    assert {(r["method"], r["layout"]) for r in rows} == {
        ("p2p", "headtail"), ("p2p", "contiguous"), ("allgather", "headtail"),
        ("allgather", "contiguous"), ("ulysses", "headtail")}
    assert {r["world"] for r in rows} == set(worlds)
    for r in rows:
        for key in ("fwd_ms", "fwd_bwd_ms", "t1_fwd_ms", "fraction_fwd", "fraction_fwd_bwd"):
            assert r[key] > 0, (key, r)


def test_one_process_measures_and_predicts(tmp_path):
    result, stdout = _run([sys.executable, "-m", "attnkit.cli", "bench", *ARGS,
                           "--cp-worlds", "2,4", "--out", "out"], tmp_path)
    assert result["kind"] == "context_parallel" and result["world_size"] == 1
    _check_rows(result["measured"], [1])
    _check_rows(result["predicted"], [2, 4])
    p2p = [r for r in result["predicted"] if r["method"] == "p2p"]
    assert all(len(r["step_compute_fwd_ms"]) == r["world"] for r in p2p)
    assert "predicted (link 450 GB/s)" in stdout


def test_two_processes_measure(tmp_path):
    result, _ = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                      "--standalone", "-m", "attnkit.cli", "bench", *ARGS, "--out", "out"],
                     tmp_path)
    assert result["world_size"] == 2 and not result["predicted"]
    _check_rows(result["measured"], [2])
