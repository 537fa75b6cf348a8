"""torch-blocked's packed variable-length path: how sequences become blocked calls (the
numbers are the conformance suite's, suite_varlen)."""

import torch
from attnkit_torch_blocked import backend as tb

import attnkit


def test_runs_merge_consecutive_equal_sequences_and_drop_empty_ones():
    seqs = [(0, 4, 0, 6), (4, 8, 6, 12), (8, 8, 12, 15), (8, 11, 15, 15), (11, 15, 15, 21),
            (15, 19, 21, 27), (19, 22, 27, 30)]
    # (8, 8): no query; (8, 11): no key; the run of three 4x6 sequences resumes after them
    # only where the rows are adjacent, so (11, 15) starts a new run.
    # Each run ends with its first sequence's index (dropout's batch index).
    assert tb._runs(seqs) == [(0, 8, 0, 12, 2, 0), (11, 19, 15, 27, 2, 4),
                              (19, 22, 27, 30, 1, 6)]


def test_runs_do_not_merge_across_an_empty_sequence():
    # Rows adjacent, but a run's sequences must be consecutive: the second 4x6 sequence is
    # sequence 2, and dropout draws it at batch index 2, not 1.
    seqs = [(0, 4, 0, 6), (4, 4, 6, 6), (4, 8, 6, 12)]
    assert tb._runs(seqs) == [(0, 4, 0, 6, 1, 0), (4, 8, 6, 12, 1, 2)]


def test_an_equal_length_packing_is_one_blocked_call(monkeypatch):
    calls = []
    forward, backward = tb.blocked_forward, tb.blocked_backward

    def counting(fn, name):
        def wrapped(q, *args, **kwargs):
            calls.append((name, tuple(q.shape)))
            return fn(q, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(tb, "blocked_forward", counting(forward, "fwd"))
    monkeypatch.setattr(tb, "blocked_backward", counting(backward, "bwd"))
    q = torch.randn(4 * 24, 6, 16, requires_grad=True)
    kv = torch.randn(4 * 24, 2, 16)
    cu = torch.arange(0, 4 * 24 + 1, 24, dtype=torch.int32)
    out = attnkit.attention_varlen(q, kv, kv, cu, cu, causal=True, backend="torch-blocked")
    out.sum().backward()
    assert calls == [("fwd", (4, 6, 24, 16)), ("bwd", (4, 6, 24, 16))]
