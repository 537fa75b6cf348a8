"""attnkit-cupy: an attnkit backend of CUDA C++ kernels compiled at run time by CuPy (NVRTC).

The kernels live in ``attnkit_cupy/kernels/*.cu``; `attnkit_cupy.backend.CupyBackend` is
registered under the name ``cupy`` through the ``attnkit`` entry point group.
"""

__version__ = "0.1.0"
