from attnkit.testing import markers

# cuda/sm90: kernels compiled for a GPU, which the interpreter rules out; interpreter: kernels
# on CPU tensors (nox runs this directory with TRITON_INTERPRET=1).
pytest_configure, pytest_runtest_setup = markers.hooks(
    cuda=markers.compiled(markers.cuda), sm90=markers.compiled(markers.sm90),
    interpreter=markers.interpreter)
