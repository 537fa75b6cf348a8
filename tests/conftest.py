import torch
import torch._inductor  # noqa: F401

import attnkit

# The suite's tests run pytest in-process (pytester), which restores sys.modules after each
# run, and some of torch's modules fail when imported a second time (operator libraries and
# cache artifacts register twice). Import them once, up front: torch._inductor directly
# (torch.use_deterministic_algorithms imports it lazily), and what torch.compile loads by
# compiling a call like the suite's compile case (the custom op, its backward, a cast).


def _compile_once():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    step = torch.compile(lambda q: (attnkit.attention(q, q, q, backend="reference").float()
                                    * 2).sum(), backend="aot_eager", fullgraph=True)
    step(q).backward()


_compile_once()

pytest_plugins = ["pytester"]
