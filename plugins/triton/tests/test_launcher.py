"""The direct launcher's bookkeeping, without a GPU: a fake kernel stands in for Triton's."""

from types import SimpleNamespace

from attnkit_triton import _launcher


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


def test_direct_launch_probes_before_its_first_launch(monkeypatch):
    """The one-time probe (a kernel compile on a fresh machine) belongs to a site's first
    call, which compiles anyway, not to the second: a benchmark's first timed call read
    250 ms when it ran there."""
    log = []

    def probe():
        log.append("probe")
        monkeypatch.setattr(_launcher, "_probe_state", False)  # direct launches refused

    monkeypatch.setattr(_launcher, "interpreting", lambda: False)
    monkeypatch.setattr(_launcher, "_hooks_set", lambda: False)
    monkeypatch.setattr(_launcher, "_probe_state", None)
    monkeypatch.setattr(_launcher, "_probe", probe)
    site = _launcher.FastKernel(_FakeKernel(log)).direct((2,), (7,), {"C": 3}, fixed=(5,))
    assert log == ["probe", ("launch", (2,), (7, 5), {"C": 3})]
    site(8)  # the probe refused direct launches: Triton's path, fixed arguments appended
    assert log[2:] == [("launch", (2,), (8, 5), {"C": 3})]
    assert site.tail == (5, 3)
