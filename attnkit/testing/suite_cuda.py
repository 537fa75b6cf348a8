"""Conformance on a CUDA device only (skipped, saying so, on others): kernels queued on the
caller's current stream, and element offsets past 2^31 (`attnkit.testing.cuda_checks`)."""

from __future__ import annotations

import pytest

from attnkit.testing import cuda_checks


@pytest.fixture
def cuda_device(device) -> str:
    if not device.startswith("cuda"):
        pytest.skip(f"CUDA only (device {device!r}): run with --device cuda")
    return device


def test_side_stream(backend_name, cuda_device):
    cuda_checks.side_stream(backend_name, cuda_device)


def test_offsets_past_2_31_inputs(backend_name, cuda_device):
    cuda_checks.offsets_past_2_31_inputs(backend_name, cuda_device)


def test_offsets_past_2_31_outputs(backend_name, cuda_device):
    cuda_checks.offsets_past_2_31_outputs(backend_name, cuda_device)
