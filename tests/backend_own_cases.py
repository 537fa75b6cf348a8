"""A backend's own conformance module (`Backend.conformance_modules`), for the suite's tests:
it runs with the suite's fixtures and options."""

import torch

import attnkit


def test_own_case_runs_with_the_suite_fixtures(backend, backend_name, device, quick):
    assert backend.name == backend_name == "with-own-cases" and device == "cpu" and quick
    q = torch.randn(1, 2, 8, 16)
    out = attnkit.attention(q, q, q, backend=backend_name)
    assert out.shape == q.shape
