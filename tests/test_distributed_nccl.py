"""attnkit.distributed over NCCL: every method and layout on every GPU backend, against one
process computing the whole sequence. World size 1 (one GPU: the whole path through NCCL,
with no peer) and, where the machine has several GPUs, all of them."""

import pytest
import torch
from test_distributed import LAYOUTS, METHODS, _spawn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_OPTIONS = ("causal", "causal-window", "softcap-scale", "gqa", "mqa-window", "lse-loss",
               "long-causal")


def _cases():
    cases = [(m, lay, o, "bfloat16", "triton") for m in METHODS for lay in LAYOUTS
             for o in GPU_OPTIONS]
    cases += [(m, lay, o, "float32", "triton") for m in METHODS for lay in LAYOUTS
              for o in ("causal", "long-causal")]
    cases += [(m, lay, o, "bfloat16", "cupy") for m in METHODS for lay in LAYOUTS
              for o in ("causal", "long-causal")]
    cases += [(m, lay, o, "float64", "torch-blocked") for m in METHODS for lay in LAYOUTS
              for o in ("causal", "long-causal")]
    return cases


WORLDS = sorted({1, torch.cuda.device_count()} - {0}) if torch.cuda.is_available() else [1]


@pytest.mark.parametrize("world", WORLDS)
def test_every_method_on_nccl(world, tmp_path):
    per_rank = _spawn("run_cases", world, tmp_path, _cases(), "cuda", pg_backend="nccl",
                      deadline_s=540)
    failures = [f for r in per_rank for f in r["failures"]]
    assert not failures, "\n".join(failures)
