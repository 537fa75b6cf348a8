import torch._inductor  # noqa: F401

# The suite's tests run pytest in-process (pytester), which restores sys.modules after each
# run. torch.use_deterministic_algorithms imports torch._inductor lazily, and a second import
# fails (its test operators' TORCH_LIBRARY registered twice): import it once, up front.
pytest_plugins = ["pytester"]
