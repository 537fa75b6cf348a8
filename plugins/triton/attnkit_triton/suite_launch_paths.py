"""The triton backend's own conformance cases: ``attnkit check triton`` runs them after the
core's suite (`TritonBackend.conformance_modules`), with its fixtures and options.

- Kept launch sites: the ``tl`` backward sets its three launch sites up on a route's first
  call and launches them directly on later ones. Three calls give the first call's
  gradients bit for bit and the last is held to the accuracy rule, and some ``tl`` backward
  route holds kept sites: else the direct path never ran.
- Forced paths, each under the accuracy rule: the grid through pointers
  (``ATTNKIT_TRITON_TMA=0``) where the automatic choice takes tensor descriptors (sm_90 and
  newer), and on sm_90 cases through descriptors wherever they apply
  (``ATTNKIT_TRITON_TMA=1``), the Gluon forward (``ATTNKIT_TRITON_GLUON=1``) and the Gluon
  backward (``ATTNKIT_TRITON_GLUON_BWD=1``).

On CPU (the interpreter) every path but pointers is off and nothing is kept: these skip,
saying so.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attnkit.testing import cases as _cases
from attnkit.testing import checks
from attnkit.testing.cases import Case

from . import backend as _backend
from ._launcher import fast_launches

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

#: Dense, equal lengths that are multiples of 128: the Gluon kernels' problems (fp16/bf16,
#: head dims 64 and 128), MHA and GQA, (B, H, S, D) and (B, S, H, D) tensors.
GLUON_CASES = tuple(
    Case(batch=B, heads_q=Hq, heads_kv=Hkv, seqlen_q=S, seqlen_k=S, head_dim=D,
         dtype=F16 if D == 64 else BF16, causal=causal, layout=layout)
    for B, Hq, Hkv, S, layout in ((1, 2, 2, 128, "bhsd"), (2, 4, 1, 384, "bshd"),
                                  (1, 6, 2, 1024, "bshd"))
    for D in (64, 128) for causal in (False, True))

#: Head dims that are powers of two (tensor descriptors' requirement) in every feature.
TMA_CASES = (
    Case(batch=2, heads_q=4, heads_kv=4, seqlen_q=700, seqlen_k=700, head_dim=128,
         dtype=BF16),
    Case(batch=3, heads_q=4, heads_kv=2, seqlen_q=300, seqlen_k=515, head_dim=64, dtype=F16,
         causal=True, seqlens_k="random"),
    Case(batch=2, heads_q=8, heads_kv=2, seqlen_q=600, seqlen_k=600, head_dim=128,
         dtype=BF16, window=(100, 20), layout="bshd"),
    Case(batch=2, heads_q=2, heads_kv=2, seqlen_q=333, seqlen_k=333, head_dim=32, dtype=F16,
         softcap=10.0, magnitude=2.0),
    Case(batch=2, heads_q=4, heads_kv=4, seqlen_q=600, seqlen_k=900, head_dim=128,
         dtype=F32, causal=True),
    Case(batch=2, heads_q=2, heads_kv=2, seqlen_q=257, seqlen_k=257, head_dim=256,
         dtype=BF16, causal=True),
)

FORCED = {  # (environment, cases)
    "tma": ({"ATTNKIT_TRITON_TMA": "1"}, TMA_CASES),
    "gluon-forward": ({"ATTNKIT_TRITON_GLUON": "1", "ATTNKIT_TRITON_GLUON_BWD": "0"},
                      tuple(replace(c, grad=False) for c in GLUON_CASES)),
    "gluon-backward": ({"ATTNKIT_TRITON_GLUON_BWD": "1", "ATTNKIT_TRITON_GLUON": "0"},
                       GLUON_CASES),
}


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = config.getoption("--attnkit-device", default="cpu")
    prefix = f"triton-{device}"
    params = {
        "pointer_case": [(c.id, c) for c in _cases.generate(
            _backend.TritonBackend.capabilities, config.getoption("--attnkit-quick"), device)],
        "forced": [(f"{path}-{c.id}", (path, c)) for path, (_, cs) in FORCED.items()
                   for c in cs],
        "kept_case": [(c.id, c) for c in _cases.LAUNCH_STATE_CASES],
    }
    for fixture, values in params.items():
        if fixture not in metafunc.fixturenames:
            continue
        if not device.startswith("cuda"):  # one skip, not one per case
            skip = pytest.mark.skip(reason=f"CUDA only (device {device!r}): the interpreter "
                                    "runs pointers only and keeps no launch sites")
            metafunc.parametrize(fixture, [pytest.param(None, marks=skip)],
                                 ids=[f"{prefix}-all"])
        else:
            metafunc.parametrize(fixture, [v for _, v in values],
                                 ids=[f"{prefix}-{i}" for i, _ in values])


def _capability(device: str) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def test_pointer_path(pointer_case, backend, device, monkeypatch):
    """The grid through pointers, where the automatic choice may take descriptors."""
    case = pointer_case
    if _capability(device) < (9, 0):
        pytest.skip("below sm_90 every call takes pointers: the core's grid ran them")
    monkeypatch.setenv("ATTNKIT_TRITON_TMA", "0")
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "0")
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON_BWD", "0")
    checks.matches_reference(case, backend, device)


def test_forced_path(forced, backend, device, monkeypatch):
    path, case = forced
    cc = _capability(device)
    if cc != (9, 0) and path.startswith("gluon"):
        pytest.skip(f"the Gluon kernels need sm_90; {device} is sm_{cc[0]}{cc[1]}")
    if cc < (9, 0):
        pytest.skip(f"tensor descriptors need sm_90 or newer; {device} is sm_{cc[0]}{cc[1]}")
    for name, value in FORCED[path][0].items():
        monkeypatch.setenv(name, value)
    checks.matches_reference(case, backend, device)


def test_kept_launch_sites(kept_case, backend, device, monkeypatch):
    """Three calls: bit for bit the first's gradients, the last accurate, and kept sites."""
    _capability(device)
    if not fast_launches():
        pytest.skip("launches go through Triton's own path here (ATTNKIT_TRITON_FAST_LAUNCH=0 "
                    "or Triton internals not read): no launch sites are kept")
    case = kept_case
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON_BWD", "0")  # the tl backward keeps the sites
    gen, seed = checks.seeded(case)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, generator=gen).to(device, case.dtype)
    grads = []
    for _ in range(3):
        out, _ = checks.run(backend.name, case, q, k, v, seqlens_k, False)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    where = f"[seed {seed}] {case.id}"
    for call, later in enumerate(grads[1:], 2):
        for name, a, b in zip("qkv", grads[0], later):
            assert torch.equal(a, b), f"{where}: d{name} of call {call} differs from call 1"
    kept = [key for key, route in _backend._routes.items() if key[0] == "backward"
            and getattr(getattr(route, "kept", None), "sites", None) is not None]
    assert kept, f"{where}: no tl backward route holds kept launch sites after three calls"
    bad = [msg for ok, msg in case.judge(q, k, v, seqlens_k, dout, grads=grads[-1]) if not ok]
    assert not bad, f"{where}: call 3: " + "; ".join(bad)
