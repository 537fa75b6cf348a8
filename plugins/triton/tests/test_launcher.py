"""The direct launcher's bookkeeping and the gate on Triton's internals, without a GPU: a
fake kernel stands in for Triton's."""

import functools
import os
import threading
from types import SimpleNamespace

import pytest
import triton
from attnkit_triton import _launcher, _triton_internals


@pytest.fixture
def tested(monkeypatch):
    """Triton's internals read as on a tested release, whatever Triton runs the tests."""
    monkeypatch.setattr(_triton_internals, "_REASON", "")


@pytest.fixture
def untested(monkeypatch):
    """Triton's internals left alone, as on an untested release."""
    monkeypatch.setattr(_triton_internals, "_REASON", "Triton 9.9.0 is not a tested release")


class _FakeKernel:
    """Records its launches; ``x`` runtime, ``n`` fixed, ``C`` constexpr."""

    __name__ = "fake"
    params = [SimpleNamespace(name="x", is_constexpr=False),
              SimpleNamespace(name="n", is_constexpr=False),
              SimpleNamespace(name="C", is_constexpr=True)]

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.log.append(("launch", grid, args, constexprs))


def test_direct_launch_probes_before_its_first_launch(monkeypatch, tested):
    """The one-time probe (a kernel compile on a fresh machine) belongs to a site's first
    call, which compiles anyway, not to the second: a benchmark's first timed call read
    250 ms when it ran there."""
    log = []

    def probe():
        log.append("probe")
        monkeypatch.setattr(_launcher, "_probe_state", False)  # direct launches refused

    monkeypatch.setattr(_launcher, "interpreting", lambda: False)
    monkeypatch.setattr(_launcher, "hooks_set", lambda: False)
    monkeypatch.setattr(_launcher, "_probe_state", None)
    monkeypatch.setattr(_launcher, "_probe", probe)
    site = _launcher.FastKernel(_FakeKernel(log)).direct((2,), (7,), {"C": 3}, fixed=(5,))
    assert log == ["probe", ("launch", (2,), (7, 5), {"C": 3})]
    site(8)  # the probe refused direct launches: Triton's path, fixed arguments appended
    assert log[2:] == [("launch", (2,), (8, 5), {"C": 3})]
    assert site.tail == (5, 3)


def test_tma_launch_passes_what_tritons_launcher_passes(monkeypatch, tested):
    """`TmaLaunch` hands Triton's C launcher the arguments Triton's own launcher would (the
    installed Triton's ``CudaLauncher`` and descriptor wrapper, a recording function in place
    of the C launcher and of the CUtensorMap encoding), and encodes each address once. A
    Triton whose launcher is laid out differently gets no `TmaLaunch` (the plan then keeps
    Triton's wrapper)."""
    import inspect

    import torch
    from triton.backends.nvidia import driver

    encoded, launched = [], []

    def encode(desc, meta, *_):
        encoded.append(desc.base.data_ptr())
        return [("map", desc.base.data_ptr(), meta["swizzle"]), *desc.shape, 1]

    monkeypatch.setattr(driver, "make_tensordesc_arg", encode)
    signature = {"A": "tensordesc<fp16[8, 8]>", "X": "*fp32", "B": "tensordesc<fp16[8, 8]>",
                 "n": "i32", "C": "constexpr"}
    metas = [{"swizzle": 128}, {"swizzle": 64}]
    run = object.__new__(driver.CudaLauncher)
    run.__dict__.update(
        launch=driver.wrap_handle_tensordesc(lambda *a: launched.append(a), signature, metas),
        num_ctas=1, global_scratch_size=0, global_scratch_align=1, profile_scratch_size=0,
        profile_scratch_align=1, launch_cooperative_grid=False, launch_pdl=False,
        gsan_enabled=False)
    compiled = SimpleNamespace(run=run, function=77, packed_metadata="packed")
    kernel = _launcher.FastKernel(SimpleNamespace(
        __name__="k", params=[SimpleNamespace(name=n, is_constexpr=n == "C") for n in signature]))
    site = _launcher.DirectLaunch(kernel, (4, 2), {"C": 3}, compiled, fixed=(9,))

    def maker(t):
        return SimpleNamespace(base=t, shape=list(t.shape))

    makers = [maker, None, maker]
    tma = _launcher.TmaLaunch.wrap(site, makers)
    if "tensordesc_indices" not in inspect.getclosurevars(run.launch).nonlocals:
        assert tma is None  # not Triton 3.6's wrapper: the plan keeps Triton's
        return
    assert tma is not None
    monkeypatch.setattr(_launcher, "current_stream", lambda index: 1234)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    a, x, b = torch.zeros(8, 8), torch.zeros(4), torch.zeros(8, 8)
    site.run(1234, maker(a), x, maker(b))
    tma((a, x, b))
    assert len(launched) == 2 and launched[1] == launched[0]
    assert launched[0][:3] == (4, 2, 1) and launched[0][-2:] == (9, 3)
    tma((a, x, b))  # same addresses: nothing encoded again
    assert encoded == [a.data_ptr(), b.data_ptr()] * 2 and launched[2] == launched[0]
    c = torch.zeros(8, 8)
    tma((c, x, b))
    assert encoded[-1] == c.data_ptr() and launched[3][13][1] == c.data_ptr()


def test_raw_launch_only_where_probed_and_laid_out_as_triton_36(monkeypatch, tested):
    """`DirectLaunch.run` calls the C launcher itself only after the probe found that
    equivalent (`_raw_state`) and only for Triton 3.6's launcher layout, without descriptors
    or scratch memory; it passes what Triton 3.6's ``CudaLauncher.__call__`` would."""
    from triton.backends.nvidia import driver

    calls = []
    # a C launcher stands here as a partial (not a Python function, as a compiled one is not)
    record = functools.partial(lambda *a: calls.append(a))
    run = object.__new__(driver.CudaLauncher)
    run.__dict__.update(launch=record, num_ctas=1, global_scratch_size=0, global_scratch_align=1,
                        profile_scratch_size=0, profile_scratch_align=1,
                        launch_cooperative_grid=False, launch_pdl=True, gsan_enabled=False)
    compiled = SimpleNamespace(run=run, function=77, packed_metadata="packed")
    monkeypatch.setattr(_launcher, "_raw_state", False)
    assert _launcher._raw_launcher(compiled) is None  # not probed (or the probe failed)
    monkeypatch.setattr(_launcher, "_raw_state", True)
    raw = _launcher._raw_launcher(compiled)
    if getattr(driver, "_BASE_ARGS_FORMAT", None) != _triton_internals._BASE_ARGS_FORMAT:
        assert raw is None  # another Triton: its wrapper stays
        return
    site = _launcher.DirectLaunch(_launcher.FastKernel(_FakeKernel([])), (4,), {"C": 3}, compiled,
                                  fixed=(9,))
    assert site.raw is not None
    site.run(1234, "x")  # the C launcher directly
    driver.CudaLauncher.__call__(run, 4, 1, 1, 1234, 77, "packed", None, None, None, "x", 9, 3)
    assert raw[1] == (77, False, True, None, None, "packed", None, None, None)
    assert len(calls) == 2 and calls[0] == calls[1]
    run.global_scratch_size = 16
    assert _launcher._raw_launcher(compiled) is None


def test_tl_backward_keeps_its_launch_sites(monkeypatch):
    """The ``tl`` backward's first call of a route goes through the keyed prep, dK/dV and dQ
    sites; later calls launch the kept sites on one stream with the same arguments (delta
    and lse2 as stats' two rows, by address), unless out is laid out unlike q (then the
    keyed path again). Bookkeeping only: fakes stand in for the launches (no GPU)."""
    import torch
    from attnkit_triton import _backward

    log = []

    def site(name):
        return SimpleNamespace(compiled=True, run=lambda stream, *a: log.append((name, stream, a)))

    def keyed(name, *picked):
        def launch(*args):
            log.append((name, None, tuple(args[i] for i in picked)))
            return site(name)
        return launch

    monkeypatch.setattr(_backward, "launch_prep", keyed("prep", 1, 3, 2, 4, 4))
    # (problem, q, k, v, dout, delta, lse2, seqlens_k, grads..., cfg, tma, layout)
    monkeypatch.setattr(_backward, "launch_dkdv", keyed("dkdv", 1, 2, 3, 4, 6, 5, 8, 9, 7))
    monkeypatch.setattr(_backward, "launch_dq", keyed("dq", 1, 2, 3, 4, 6, 5, 8, 7))
    monkeypatch.setattr(_backward, "fast_launches", lambda: True)
    monkeypatch.setattr(_backward, "current_stream", lambda index: 7)
    cfg = SimpleNamespace(block_m=64, tma=False)
    q, k, v, dout = (torch.randn(2, 100, 3, 16).transpose(1, 2) for _ in range(4))
    out, lse = torch.empty_like(q), torch.empty(2, 3, 100)
    kept = _backward.BackwardSites()
    for call in range(3):
        log.clear()
        dq, dk, dv = _backward.launch_backward(None, q, k, v, out, lse, dout, None, cfg, cfg,
                                               False, "layout", kept)
        assert [(n, s) for n, s, _ in log] == (
            [("prep", None), ("dkdv", None), ("dq", None)] if call == 0
            else [("prep", 7), ("dkdv", 7), ("dq", 7)])
        (_, _, prep), (_, _, dkdv), (_, _, dq_args) = log
        stats = prep[3]
        assert stats.shape == (2, 6, 128) and prep[4] is stats
        assert all(a is b for a, b in zip(prep[:3], (out, dout, lse)))
        rows = (stats[1], stats[0]) if call == 0 else (stats[1].data_ptr(), stats.data_ptr())
        for args, grads in ((dkdv, (dk, dv)), (dq_args, (dq,))):
            assert all(a is b for a, b in zip(args[:4] + args[6:-1], (q, k, v, dout) + grads))
            if call == 0:
                assert all(a.shape == b.shape and a.data_ptr() == b.data_ptr()
                           for a, b in zip(args[4:6], rows))  # (empty: may hold NaN)
                assert args[-1] is None
            else:
                assert args[4:6] == rows and args[-1] == stats.data_ptr()
        assert dq.stride() == q.stride() and dk.stride() == k.stride()
    log.clear()
    _backward.launch_backward(None, q, k, v, out.contiguous(), lse, dout, None, cfg, cfg,
                              False, "layout", kept)
    assert [s for _, s, _ in log] == [None, None, None]  # out not laid out as q: keyed path


def test_gate_reads_internals_only_on_tested_releases():
    assert _triton_internals.TESTED_TRITON == ("3.6",)
    assert _triton_internals.release("3.6.0+git4a2c") == "3.6"
    assert _triton_internals.release("3.10.1") == "3.10"
    for version in ("3.6.0", "3.6.2", "3.6.0+gitabc"):
        assert _triton_internals.gate_reason(version) == ""
    for version in ("3.5.1", "3.9.0", "3.60.0", "4.6.0"):
        reason = _triton_internals.gate_reason(version)
        assert f"Triton {version} is not a tested release (3.6;" in reason
        assert _triton_internals.gate_reason(version, "1") == ""  # asked to try it
    assert _triton_internals.gate_reason("3.6.0", "0") == "ATTNKIT_TRITON_INTERNALS=0"
    # this process's answer is the installed Triton's, and `attnkit backends` shows it
    expected = _triton_internals.gate_reason(triton.__version__)
    if _triton_internals._ENV not in os.environ:
        assert _triton_internals.internals_reason() == expected
    from attnkit_triton.backend import TritonBackend

    assert _triton_internals.launch_path() in TritonBackend.description


def test_untested_triton_launches_through_tritons_path(monkeypatch, untested, recwarn):
    """Off the tested releases nothing private is read: no probe (so no warning), no
    constexpr tail, no launcher layout; every call of a site goes through ``fn[grid]``."""
    monkeypatch.setattr(_launcher, "interpreting", lambda: False)
    monkeypatch.setattr(_launcher, "hooks_set", lambda: False)
    monkeypatch.setattr(_launcher, "_probe_state", None)
    assert not _launcher.fast_launches()  # the real `_probe`: returns before touching CUDA
    assert _launcher._probe_state is False and not recwarn.list
    assert "public path: Triton 9.9.0 is not a tested release" in (
        _triton_internals.launch_path())
    log = []
    compiled = SimpleNamespace(run=SimpleNamespace(launch=functools.partial(print)),
                               function=77, packed_metadata="packed")
    monkeypatch.setattr(_launcher, "_raw_state", True)
    site = _launcher.DirectLaunch(_launcher.FastKernel(_FakeKernel(log)), (2,), {"C": 3},
                                  compiled, fixed=(5,))
    assert site.tail == (5,) and site.raw is None and site.prefix is None
    site(8)
    assert log == [("launch", (2,), (8, 5), {"C": 3})]
    assert _triton_internals.tensordesc_launcher(compiled, {0}) is None
    assert _triton_internals.descriptor_fields(SimpleNamespace(base=1, shape=[2])) is None


def _on_a_fresh_thread(fn):
    """Run ``fn`` where Triton's allocator ContextVar holds its default, as on a thread the
    autograd engine starts."""
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def test_allocator_set_only_where_none_is(monkeypatch, tested):
    """On a tested Triton ours is set where the context holds Triton's null allocator, and a
    caller's own is left alone."""
    from triton.runtime import _allocation

    calls = []
    monkeypatch.setattr(triton, "set_allocator", calls.append)

    def fresh():
        _triton_internals.ensure_allocator()
        _triton_internals.ensure_allocator()  # still Triton's null allocator: set again
        own = object()
        _allocation.set_allocator(own)  # the caller's, through Triton's own setter
        _triton_internals.ensure_allocator()

    _on_a_fresh_thread(fresh)
    assert calls == [_triton_internals._alloc] * 2


def test_allocator_set_once_per_context_through_the_public_api(monkeypatch, untested):
    calls = []
    monkeypatch.setattr(triton, "set_allocator", calls.append)

    def fresh():
        for _ in range(3):
            _triton_internals.ensure_allocator()

    _on_a_fresh_thread(fresh)
    _on_a_fresh_thread(fresh)  # a new thread has a new context: set there too
    assert calls == [_triton_internals._alloc] * 2


@pytest.mark.parametrize("gate", ["tested", "untested"])
def test_gluon_reduce_add_is_the_public_op_or_the_gated_builder_call(request, gate):
    request.getfixturevalue(gate)
    public = object()
    assert _triton_internals.gluon_tma_reduce_add(SimpleNamespace(async_atomic_add=public)) \
        is public
    made = _triton_internals.gluon_tma_reduce_add(SimpleNamespace())  # Triton 3.6's Gluon
    if gate == "untested":
        assert made is None
    else:
        assert getattr(made, "__triton_builtin__", False)
