"""attnkit's checks, one session per concern.

``nox`` runs the default sessions (what CI runs): lint, the core's tests, the conformance
suite for each first-party backend on this machine's CPU, and ``attnkit.sdpa`` with the
transformers integration. The ``gpu`` session runs the conformance suite on CUDA and is not a
default: it needs a GPU.

Torch is installed first, pinned (``ATTNKIT_TORCH``, default ``torch==2.13.0``, the CPU build
on the project's machines), so no dependency resolution can pull a multi-GB CUDA build.
The triton backend's CPU conformance runs at both ends of the Triton range its pyproject
declares (``triton-oldest``, ``triton-newest``): once each, on the interpreter's quick grid.
Arguments after ``--`` go to pytest: ``nox -s tests -- -x -k registry``.
"""

import os
import shutil

import nox

nox.options.sessions = ["lint", "tests", "conformance", "transformers"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("ATTNKIT_TORCH", "torch==2.13.0")
PLUGINS = {
    "torch_blocked": "plugins/torch_blocked",
    "triton": "plugins/triton",
    "cupy": "plugins/cupy",
}
BACKEND_NAMES = {"torch_blocked": "torch-blocked", "triton": "triton", "cupy": "cupy"}
#: The oldest and newest Triton of plugins/triton/pyproject.toml's range (keep the two in step),
#: with what each one's interpreter needs: 3.6's turns 1-element arrays into ints, which numpy
#: 2.4 refuses.
TRITON_ENDS = {"triton-oldest": ("triton==3.6.0", "numpy<2.4"),
               "triton-newest": ("triton==3.9.0",)}
#: Conformance sessions: one per backend, the triton backend's at both ends of its range.
CONFORMANCE = ["torch_blocked", *TRITON_ENDS, "cupy"]


def _install(session, *paths, extra=(), pins=()):
    """Torch (pinned) first, then the core and the given plugins, editable, with ``pins``
    resolved beside them (pip refuses a pin outside a plugin's declared range)."""
    session.install("setuptools>=64", TORCH, *extra)
    args = ["--no-build-isolation", "-e", "."]
    for p in paths:
        args += ["-e", p]
    session.install(*args, *pins)


@nox.session
def lint(session):
    """ruff over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def tests(session):
    """The core's own tests: spec, references, registry and plugin loading, API, CLI,
    the conformance suite against deliberately wrong backends, the example plugin, the
    benchmark harness (with matplotlib, so its plots are drawn)."""
    _install(session, extra=("matplotlib",))
    session.run("pytest", "tests", *session.posargs)


@nox.session
def transformers(session):
    """``attnkit.sdpa`` and the Hugging Face transformers integration on CPU, with the
    ``transformers`` extra and the torch-blocked backend (what ``auto`` picks on a CPU): tiny
    random models against transformers' own attention implementations, and ``attnkit bench
    --model-step`` on one."""
    session.install("setuptools>=64", TORCH)
    session.install("--no-build-isolation", "-e", ".[transformers]", "-e",
                    PLUGINS["torch_blocked"])
    session.run("python", "-c", "import transformers; print('transformers', "
                "transformers.__version__)")
    session.run("pytest", "tests/test_transformers_integration.py", "tests/test_sdpa.py",
                "tests/test_model_step_bench.py", *session.posargs)


@nox.session
@nox.parametrize("backend", CONFORMANCE)
def conformance(session, backend):
    """The conformance suite (``attnkit check``) on CPU for one backend, plus its own tests.

    triton runs under TRITON_INTERPRET=1 on a quick grid, once with the oldest Triton its
    plugin declares and once with the newest. cupy cannot launch without a GPU: there every
    CUDA source and template instance is compiled for sm_80 and sm_90 instead, and the suite
    runs in the ``gpu`` session.
    """
    pins = TRITON_ENDS.get(backend, ())
    if pins:
        backend = "triton"
    # CuPy is imported (not launched) by the cupy tests; the Triton interpreter's numpy comes
    # with the plugin's ``interpreter`` extra.
    extra = ("cupy-cuda13x",) if backend == "cupy" else ()
    plugin = PLUGINS[backend] + ("[interpreter]" if pins else "")
    _install(session, plugin, extra=extra, pins=pins)
    name = BACKEND_NAMES[backend]
    session.run("attnkit", "backends")
    if pins:  # pip resolved the pins within the plugin's declared range
        session.run("python", "-c", "import numpy, triton; print('triton', triton.__version__, "
                    "'numpy', numpy.__version__)")
    if backend == "cupy":
        if not shutil.which("nvcc"):
            session.error("the cupy session compiles every kernel with nvcc; nvcc not found")
        # test_compile_all compiles every unit for sm_80 and sm_90 (a sample of head dims;
        # ATTNKIT_CUPY_COMPILE_ALL=1 for every instance).
        session.run("pytest", "plugins/cupy/tests", *session.posargs)
        return
    env = {"TRITON_INTERPRET": "1"} if backend == "triton" else {}
    quick = ["--quick"] if backend == "triton" else []
    session.run("attnkit", "check", name, *quick, "--", *session.posargs, env=env)
    # The offline compile sweeps (every table entry for sm_86/sm_90/sm_120, the Gluon
    # kernels for sm_90) take minutes each: they run once, on the oldest Triton, which is the
    # GPU machines' release.
    offline = (["--ignore", f"{PLUGINS[backend]}/tests/test_tables.py",
                "--ignore", f"{PLUGINS[backend]}/tests/test_dropout_tables.py", "--deselect",
                f"{PLUGINS[backend]}/tests/test_hopper.py::test_gluon_kernels_compile_for_sm90"]
               if pins and pins != TRITON_ENDS["triton-oldest"] else [])
    session.run("pytest", f"{PLUGINS[backend]}/tests", *offline, *session.posargs, env=env)
    if backend == "triton":  # the split-KV decode kernel's tests need triton installed
        session.run("pytest", "tests/test_kvcache.py", *session.posargs)


@nox.session(default=False)
@nox.parametrize("backend", list(PLUGINS))
def gpu(session, backend):
    """The full conformance suite on CUDA (needs an NVIDIA GPU and a CUDA build of torch:
    set ATTNKIT_TORCH, e.g. ATTNKIT_TORCH=torch)."""
    extra = ("cupy-cuda13x",) if backend == "cupy" else ()
    _install(session, PLUGINS[backend], extra=extra)
    has_cuda = session.run("python", "-c", "import torch; print(torch.cuda.is_available())",
                           silent=True).strip()
    if has_cuda != "True":
        session.skip("no CUDA device visible to torch")
    session.run("attnkit", "check", BACKEND_NAMES[backend], "--device", "cuda", "--",
                *session.posargs)
