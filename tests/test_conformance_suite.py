"""The conformance suite itself: it passes the reference and catches wrong backends."""

import pytest
from wrong_backends import _CAPS, WRONG

from attnkit.reference_backend import ReferenceBackend
from attnkit.registry import registry
from attnkit.testing.runner import run_check, suite_files


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
    "wrong-nondeterministic": "*forward out of call 2 differs from call 1*",
    "wrong-writes-dout": "backend backward wrote into its input dout*",
    "wrong-grad-dtype": "backend backward returned dq torch.float32*the contract is q's "
                        "torch.float16*",
    "wrong-gqa-grads": "*dk: max|got - ref64|*",
    "wrong-masked-times-zero": "*key positions no query sees set to nan in k and v: out:*",
    "wrong-band-times-zero": "*win6_-1*key positions no query sees set to nan in k and v: out*",
    "wrong-scratch": "*uninitialised allocations filled with NaN*out: * element(s) differ*",
    "wrong-nan-row-masked": "*the row with a NaN in q*out is [[]0.0*",
    "wrong-no-max-subtraction": "*scores1e4 out: * NaN value(s)*",
    "wrong-later-calls-differ": "*dq of call 3 differs from call 1*",
    "wrong-ignores-dlse": "*dq: max|got - ref64|*",
    "wrong-varlen-one-sequence": "*out: max|got - ref64|*",
    "wrong-varlen-times-zero": "*(one sequence) and its dout set to nan: out of the other "
                               "sequences: * differ bit for bit*",
    "wrong-varlen-lse-layout": "*forward_varlen broke the contract: lse has shape*",
    "wrong-dropout-counter": "*keep decisions differ from attnkit.dropout's mask*",
    "wrong-dropout-constant-seed": "*masks across calls agree on 1.000 of elements*",
    "wrong-dropout-backward": "*dq: max|got - ref64|*",
    "wrong-varlen-dropout-packed-rows": "*keep decisions differ from the dense "
                                        "batch-of-sequences mask*",
    "wrong-recomputes-lse": "*over 2 ranks, headtail, p2p dq: max|got - ref64|*",
}

#: The part of the suite a wrong backend is run against (all of it where not named): the
#: checks each was written for, which keeps the core's tests quick.
SELECT = {
    "wrong-masked-times-zero": "never_read",
    "wrong-band-times-zero": "never_read",
    "wrong-scratch": "never_read",
    "wrong-nan-row-masked": "nan_query_row",
    "wrong-no-max-subtraction": "matches_reference",
    "wrong-later-calls-differ": "repeatable",
    "wrong-ignores-dlse": "lse or merge_of",
    "wrong-varlen-one-sequence": "varlen",
    "wrong-varlen-times-zero": "varlen",
    "wrong-varlen-lse-layout": "varlen",
    "wrong-dropout-counter": "dropout",
    "wrong-dropout-constant-seed": "dropout",
    "wrong-dropout-backward": "dropout",
    "wrong-varlen-dropout-packed-rows": "varlen_dropout",
    "wrong-recomputes-lse": "ring_blocks",
}


@pytest.mark.parametrize("wrong_backend", WRONG, indirect=True, ids=[w.name for w in WRONG])
def test_suite_catches_wrong_backend(pytester, wrong_backend):
    select = ("-k", SELECT[wrong_backend]) if wrong_backend in SELECT else ()
    result = _run_suite(pytester, wrong_backend, *select)
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


def test_reference_orders_are_the_same_math_with_gradients_put_back():
    """`Case.reference_orders` (the rule's other summation orders) computes the same
    function: in float64 every output and gradient equals the plain reference's, so the
    permutation of the head dim is undone in dq and dk."""
    import torch

    from attnkit.testing.cases import Case

    case = Case(2, 4, 2, 9, 13, 24, torch.float64, causal=True)
    gen = torch.Generator().manual_seed(1)
    q, k, v, seqlens_k = case.make_inputs("cpu", gen)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    want = case.reference(q, k, v, seqlens_k, torch.float64, dout)
    orders = case.reference_orders(q, k, v, seqlens_k, torch.float64, dout, grad=True)
    assert len(orders) == 2
    for out, lse, grads in orders:
        torch.testing.assert_close(out, want[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(lse, want[1], rtol=0, atol=1e-12)
        for g, w in zip(grads, want[2]):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert case.reference_orders(q, k, v, seqlens_k, torch.float64)[0][2] is None


class WithOwnCases(ReferenceBackend):
    name = "with-own-cases"
    capabilities = _CAPS

    def conformance_modules(self):
        return ("backend_own_cases",)


class NamesMissingModule(WithOwnCases):
    name = "names-missing-module"

    def conformance_modules(self):
        return ("no_such_module_of_conformance_cases",)


def test_backend_adds_its_own_conformance_modules(pytester):
    """`Backend.conformance_modules`: the named module runs in the suite's session, after
    the core's modules, with its fixtures and options."""
    backend = WithOwnCases()
    registry.register(backend, priority=None, plugin="tests")
    try:
        files = suite_files(backend)
        assert files[:-1] == suite_files() and files[-1].endswith("backend_own_cases.py")
        result = _run_suite(pytester, backend.name, files[-1], "-k", "own_case")
    finally:
        registry.unregister(backend.name)
    assert result.parseoutcomes().get("passed") == 1, result.stdout.str()[-2000:]


def test_a_missing_conformance_module_is_a_usage_error(capsys):
    registry.register(NamesMissingModule(), priority=None, plugin="tests")
    try:
        code = run_check("names-missing-module", quick=True)
    finally:
        registry.unregister("names-missing-module")
    assert code == pytest.ExitCode.USAGE_ERROR
    assert "no_such_module_of_conformance_cases" in capsys.readouterr().err


def test_case_sizes_positional_options_keyword_only():
    """A case's sizes (through dtype; a cache case's batch and heads) may be passed by
    position; past them a positional argument is refused, never taken for another field."""
    import torch

    from attnkit.testing.cases import Case
    from attnkit.testing.decode_cases import DecodeCase, MergeCase
    from attnkit.testing.paged_cases import PagedCase
    from attnkit.testing.varlen_cases import VarlenCase

    case = Case(1, 2, 2, 33, 47, 16, torch.float32, causal=True, softcap=5.0, tag="t")
    assert (case.seqlen_k, case.dtype, case.causal, case.softcap, case.tag) == (
        47, torch.float32, True, 5.0, "t")
    packed = VarlenCase((3, 4), None, 2, 1, 16, torch.float32, window=(2, 0))
    assert (packed.heads_kv, packed.head_dim, packed.window, packed.causal) == (
        1, 16, (2, 0), False)
    assert DecodeCase(2, 4, 1, s_max=9).causal and PagedCase(3).batch == 3
    assert MergeCase(2, 2, 1, 5, 60).seqlen_k == 60
    for build in (lambda: Case(1, 2, 2, 33, 47, 16, torch.float32, True),
                  lambda: VarlenCase((3,), None, 2, 2, 16, torch.float32, True),
                  lambda: DecodeCase(4, 4, 2, 1)):
        with pytest.raises(TypeError):
            build()
