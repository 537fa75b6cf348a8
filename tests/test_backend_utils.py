"""`attnkit.backend_utils`: what the kernel backends share (CPU only; CUDA queries faked)."""

import math
import types

import pytest
import torch

from attnkit import backend_utils as bu
from attnkit.spec import AttentionProblem


def _problem(B=2, Hq=4, Hkv=2, Sq=3, Sk=1000, D=64, **kw):
    return AttentionProblem(B, Hq, Hkv, Sq, Sk, D, torch.float16, torch.device("cpu"), **kw)


def test_constants():
    assert bu.LOG2E == math.log2(math.e) == 1 / math.log(2.0)
    assert bu.LN2 == math.log(2.0)


# -- device ---------------------------------------------------------------------------------

def test_current_stream_uses_the_raw_getter_where_torch_has_one(monkeypatch):
    raw = lambda index: 1000 + index  # noqa: E731
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", raw, raising=False)
    assert bu._stream_getter() is raw


def test_current_stream_falls_back_to_torch_streams(monkeypatch):
    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream", raising=False)
    asked = []

    def current_stream(index):
        asked.append(index)
        return types.SimpleNamespace(cuda_stream=4242)

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    assert bu._stream_getter()(3) == 4242 and asked == [3]


def test_sm_count_is_cached_per_device(monkeypatch):
    calls = []

    def props(index):
        calls.append(index)
        return types.SimpleNamespace(multi_processor_count={0: 132, 1: 78}[index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    bu._sm_count_of.cache_clear()
    try:
        assert bu.sm_count(torch.device("cuda", 0)) == 132
        assert bu.sm_count(torch.device("cuda", 0)) == 132
        assert bu.sm_count(torch.device("cuda")) == 78  # the current device
        assert calls == [0, 1]
    finally:
        bu._sm_count_of.cache_clear()
    with pytest.raises(ValueError, match="needs a CUDA device; got cpu"):
        bu.sm_count(torch.device("cpu"))


def test_launch_cache_is_emptied_when_full():
    cache = bu.LaunchCache(3)
    for i in range(3):
        assert cache.put(i, str(i)) == str(i)
    assert cache.get(2) == "2" and len(cache) == 3
    cache.put(3, "3")  # full: emptied first
    assert dict(cache) == {3: "3"} and cache.max_size == 3
    cache.put(3, "again")  # a key already there still counts against the size
    assert dict(cache) == {3: "again"}
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        bu.LaunchCache(0)


# -- split-KV -------------------------------------------------------------------------------

def test_visible_span():
    assert bu.visible_span(_problem(Sk=1000)) == 1000
    assert bu.visible_span(_problem(Sk=1000, causal=True)) == 1000
    assert bu.visible_span(_problem(Sq=3, Sk=1000, window=(100, -1))) == 103
    assert bu.visible_span(_problem(Sq=3, Sk=50, window=(100, 0))) == 50


def _waves_full(programs, s, sms):
    waves = programs * s / sms
    return waves / math.ceil(waves)


@pytest.mark.parametrize("programs", [1, 3, 8, 20, 64, 100, 131])
@pytest.mark.parametrize("keys", [300, 4096, 65536, 10**6])
def test_choose_splits_is_the_fewest_that_fill_the_waves(programs, keys):
    sms = 132
    s = bu.choose_splits(programs, keys, sms)
    most = min(math.ceil(keys / bu.MIN_KEYS_PER_SPLIT), bu.MAX_SPLITS)
    assert 1 <= s <= most
    fewest = math.ceil(sms / programs)
    if fewest >= most:
        assert s == most
        return
    good = [c for c in range(fewest, most + 1)
            if _waves_full(programs, c, sms) >= bu.WAVE_EFFICIENCY]
    if good:
        assert s == good[0]
    else:  # none good enough: the best of them
        assert _waves_full(programs, s, sms) == max(
            _waves_full(programs, c, sms) for c in range(fewest, most + 1))


def test_choose_splits_fill_and_long_caches():
    # 128 programs on 132 SMs: the default fills every SM with two splits ...
    assert bu.choose_splits(128, 1024, 132) == 2
    # ... one split once 90% busy is enough (cupy's rule) ...
    assert bu.choose_splits(128, 1024, 132, fill=0.9) == 1
    # ... or once 90% busy on a long cache only (triton's).
    assert bu.choose_splits(128, 4096, 132, long_keys=4096) == 1
    assert bu.choose_splits(128, 4095, 132, long_keys=4096) == 2
    assert bu.choose_splits(128, 4096, 132, long_keys=4096, long_fill=1.0) == 2
    assert bu.choose_splits(100, 65536, 132, long_keys=4096) > 1  # 76% busy: splits
    # Enough programs, or too few keys for two splits of MIN_KEYS_PER_SPLIT.
    assert bu.choose_splits(132, 65536, 132) == 1
    assert bu.choose_splits(1, bu.MIN_KEYS_PER_SPLIT, 132) == 1
    assert bu.choose_splits(1, bu.MIN_KEYS_PER_SPLIT + 1, 132) == 2
    assert bu.choose_splits(0, 65536, 132) == bu.MAX_SPLITS  # no programs counts as one
    assert bu.choose_splits(1, 10**7, 132) == bu.MAX_SPLITS  # capped
    assert bu.choose_splits(1, 10**7, 64) == 64


def test_split_workspace_layout():
    p = _problem(B=2, Hq=4, Sq=3, D=64)
    ws = bu.SplitWorkspace.of(p, 5)
    parts = 2 * 4 * 3 * 5
    assert ws == (parts, 64, (2, 4, 3), parts * 65, parts * 65 + 24)
    work, lse = ws.allocate(torch.device("cpu"))
    assert work.dtype == torch.float32 and work.numel() == ws.numel
    assert lse.shape == (2, 4, 3) and lse.is_contiguous() and lse._base is work
    assert lse.data_ptr() == work.data_ptr() + 4 * parts * 65
    part_out, part_lse = ws.part_views(work)
    assert part_out.numel() == parts * 64 and part_lse.numel() == parts
    assert ws.part_pointers(work) == (part_out.data_ptr(), part_lse.data_ptr())
    # The three parts tile the buffer without overlap.
    work.zero_()
    part_out.fill_(1)
    part_lse.fill_(2)
    lse.fill_(3)
    assert torch.bincount(work.long()).tolist() == [0, parts * 64, parts, 24]


# -- kernel arguments -----------------------------------------------------------------------

def test_band_args():
    assert bu.band_args(_problem()) == (0, 0, False, False)
    assert not bu.band_args(_problem()).bounded
    causal = bu.band_args(_problem(causal=True))
    assert causal == (0, 0, False, True) and causal.bounded
    assert bu.band_args(_problem(window=(7, 3))) == (7, 3, True, True)
    assert bu.band_args(_problem(window=(7, -1), causal=True)) == (7, 0, True, True)
    # A bound that never masks: unbounded sides take it, bounded ones are clamped to it.
    never = 3 + 1000
    assert bu.band_args(_problem(), unbounded=never) == (never, never, False, False)
    assert bu.band_args(_problem(window=(5000, 2)), unbounded=never) == (never, 2, True, True)


def test_score_args():
    plain = _problem(scale=0.125)
    assert bu.score_args(plain) == (0.125 * bu.LOG2E, 1.0, 1.0)
    assert bu.score_args(plain, log2=False) == (0.125, 1.0, 1.0)
    capped = _problem(scale=0.125, softcap=20.0)
    assert bu.score_args(capped) == (0.125 * bu.LOG2E, 0.125 / 20.0, 20.0 * bu.LOG2E)
    assert bu.score_args(capped, log2=False) == (0.125, 0.125 / 20.0, 20.0)
