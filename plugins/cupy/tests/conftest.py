from attnkit.testing import markers

pytest_configure, pytest_runtest_setup = markers.hooks(
    cuda=markers.backend_usable("cupy"), nvcc=markers.nvcc)
