"""The conformance suite itself: it passes the reference and catches wrong backends."""

import pytest
from wrong_backends import WRONG

from attnkit.registry import registry
from attnkit.testing.runner import suite_files


def _run_suite(pytester, name, *extra):
    return pytester.runpytest_inprocess(
        *suite_files(), "-p", "attnkit.testing.plugin", f"--attnkit-backend={name}",
        "--attnkit-quick", "-p", "no:cacheprovider", *extra)


@pytest.fixture
def wrong_backend(request):
    backend = request.param()
    registry.register(backend, priority=None, plugin="tests")
    yield backend.name
    registry.unregister(backend.name)


EXPECTED_FAILURE = {
    "wrong-no-causal": "max|got - ref64|",
    "wrong-nan-rows": "NaN value(s)",
    "wrong-top-left": "max|got - ref64|",
    "wrong-softcap": "cap5",
    "wrong-nondeterministic": "differs between two identical runs",
    "wrong-writes-dout": "backend backward wrote into its input dout*",
    "wrong-grad-dtype": "backend backward returned dq torch.float32*the contract is q's "
                        "torch.float16*",
    "wrong-gqa-grads": "*dk: max|got - ref64|*",
}


@pytest.mark.parametrize("wrong_backend", WRONG, indirect=True, ids=[w.name for w in WRONG])
def test_suite_catches_wrong_backend(pytester, wrong_backend):
    result = _run_suite(pytester, wrong_backend)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) > 0, f"{wrong_backend} passed the suite: {outcomes}"
    # The failure says what is wrong, in numbers.
    result.stdout.fnmatch_lines([f"*{EXPECTED_FAILURE[wrong_backend]}*"])


def test_suite_passes_reference(pytester):
    result = _run_suite(pytester, "reference")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) > 40 and outcomes.get("failed", 0) == 0, outcomes
    result.stdout.fnmatch_lines(["*backend 'reference' on cpu: forward ran *"])


def test_suite_fails_when_backend_never_runs(pytester):
    # Only the refusal tests: green tests, but the backend's forward never ran.
    result = _run_suite(pytester, "reference", "-k", "refuses")
    assert result.ret != 0


def test_case_judge_applies_the_suite_rule():
    """`Case.judge` (the scripts' verdict): the reference's own result passes; a gradient
    off by more than the rule allows fails, named, with its numbers."""
    import torch

    from attnkit import reference
    from attnkit.testing.cases import Case

    case = Case(1, 2, 2, 33, 47, 16, torch.float32, causal=True)
    gen = torch.Generator().manual_seed(0)
    q, k, v, seqlens_k = case.make_inputs("cpu", gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, generator=gen)
    out, _ = reference.safe(q, k, v, **case.options(seqlens_k))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    verdicts = case.judge(q, k, v, seqlens_k, dout, out=out, grads=grads)
    assert [m.split(":")[0] for _, m in verdicts] == ["out", "dq", "dk", "dv"]
    assert all(ok for ok, _ in verdicts), verdicts
    bad = (grads[0], grads[1] + 1e-2, grads[2])
    verdicts = case.judge(q, k, v, seqlens_k, dout, grads=bad)
    assert [ok for ok, _ in verdicts] == [True, False, True], verdicts
    assert verdicts[1][1].startswith("dk: max|got - ref64| = 1.0"), verdicts[1][1]
