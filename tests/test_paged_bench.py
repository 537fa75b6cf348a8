"""``attnkit bench --decode --paged`` on a tiny CPU configuration: every call runs, paged
calls compute what the contiguous ones do, and the table, summary and files come out."""

import json

import pytest
import torch

from attnkit.bench import run_benchmark
from attnkit.bench.paged import shuffled_pools


def test_shuffled_pools_hold_the_caches():
    k, v = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4)
    kp, vp, table = shuffled_pools(k, v, 2, torch.Generator().manual_seed(0))
    assert kp.shape == (8, 3, 2, 4) and table.shape == (2, 4) and table.dtype == torch.int32
    for b in range(2):
        for p in range(8):
            assert torch.equal(kp[table[b, p // 2], :, p % 2], k[b, :, p])
            assert torch.equal(vp[table[b, p // 2], :, p % 2], v[b, :, p])


def test_paged_decode_table(tmp_path):
    result = run_benchmark(device="cpu", decode=True, paged=True, backends=["reference"],
                           cache_lens=[64], page_sizes=[16, 5], warmup_ms=0, rep_ms=1,
                           progress=False, out=tmp_path, plot=False)
    assert result["kind"] == "paged"
    cells = result["cells"]
    # 64 is no multiple of 5: that page size is left out, the others all ran.
    assert sorted((c["call"], c["page_size"]) for c in cells) == [
        ("contiguous", 0), ("contiguous-api", 0), ("contiguous-api-append", 0), ("paged", 16),
        ("paged-api", 16), ("paged-api-append", 16)]
    assert all(c["status"] == "ok" for c in cells), cells
    assert all(c["max_abs_diff_vs_contiguous"] < 1e-5 for c in cells)
    assert all(c["ratio_vs_contiguous"] > 0 for c in cells if c["call"].startswith("paged"))
    assert all(c["host_us"] > 0 for c in cells)  # each call's host time beside its median
    text = (tmp_path / "paged.txt").read_text()
    assert "reference, kernel" in text and "page 16" in text and "Summary" in text
    assert text.count("host us per call / median us per call") == 3  # kernel, api, append
    assert "reference, api appending a token" in text
    assert json.loads((tmp_path / "paged.json").read_text())["kind"] == "paged"


def test_paged_needs_decode():
    with pytest.raises(ValueError, match="--decode --paged"):
        run_benchmark(device="cpu", paged=True, progress=False)


def test_paged_refuses_compare_and_env(capsys):
    from attnkit.cli import main

    for extra in (["--compare", "x"], ["--env", "A=1,2"]):
        assert main(["bench", "--decode", "--paged", "--device", "cpu", *extra]) == 2
        assert "--paged results have their own table" in capsys.readouterr().err
