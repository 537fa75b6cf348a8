import _pytest.pytester

# The suite's tests run pytest in-process (pytester), which puts sys.modules back as it was
# after each run. Torch's modules cannot be imported twice (operator libraries, compiler
# backends and cache artifacts register once per process; triton's extension leaks), and a
# run that compiles or asks for deterministic algorithms imports more of them: keep torch's,
# functorch's and triton's modules across runs, as pytester itself keeps zope's.
_Snapshot = _pytest.pytester.SysModulesSnapshot


class _KeepTorch(_Snapshot):
    def __init__(self, preserve=None):
        def keep(name):
            return (name.partition(".")[0] in ("torch", "functorch", "triton")
                    or (preserve is not None and preserve(name)))

        super().__init__(preserve=keep)


_pytest.pytester.SysModulesSnapshot = _KeepTorch

pytest_plugins = ["pytester"]
