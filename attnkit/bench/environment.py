"""Where a benchmark ran: device, clocks, library and plugin versions, the source commit,
the environment switches set, date."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from .. import __version__, api
from ..registry import registry


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cupy_version() -> str | None:
    # cupy ships as cupy-cudaXXx wheels; read the metadata instead of importing (slow, and it
    # may need a driver).
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "cupy" or name.startswith("cupy-cuda"):
            return f"{dist.metadata['Name']} {dist.version}"
    return None


#: What `device_info` records of a GPU: SM clocks (current, max, application), power limit.
DEVICE_FIELDS = ("clocks.sm", "clocks.max.sm", "clocks.applications.graphics", "clocks.mem",
                 "power.limit", "driver_version", "temperature.gpu")


def nvidia_smi(index: int, fields=DEVICE_FIELDS) -> dict:
    """``fields`` of GPU ``index`` as nvidia-smi reports them (strings, no units), or
    ``{"error": ...}``; also polled while ``--sustained`` runs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    try:
        res = subprocess.run([exe, f"--query-gpu={','.join(fields)}",
                              "--format=csv,noheader,nounits", "-i", str(index)],
                             capture_output=True, text=True, timeout=15)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if res.returncode != 0:
        return {"error": (res.stderr or res.stdout).strip()[:300]}
    values = [v.strip() for v in res.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "clocks": nvidia_smi(index),
        }
    return {
        "type": device.type,
        "name": _cpu_name(),
        "threads": torch.get_num_threads(),
    }


def versions() -> dict:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _dist_version("triton"),
        "cupy": _cupy_version(),
        "attnkit": __version__,
    }
    plugins = {}
    for name, reg in api.backends().items():
        ok, why = reg.availability
        plugins[name] = {"plugin": reg.plugin, "distribution": reg.distribution,
                         "version": reg.version, "available": ok, "reason": why}
    out["backends"] = plugins
    out["failed_plugins"] = [{"plugin": f.plugin, "distribution": f.distribution,
                              "error": f.error} for f in registry.failures]
    return out


#: Read when the attnkit source is not a git checkout (a copy on a GPU machine): the commit
#: it was copied from.
COMMIT_ENV = "ATTNKIT_BENCH_COMMIT"


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def source_revision() -> dict:
    """The git commit of the attnkit source this process imported, and whether the checkout
    has uncommitted changes to tracked files (``dirty``). ``$ATTNKIT_BENCH_COMMIT``, where
    set, names the commit instead (a tree copied onto a GPU machine whose ``.git`` is older
    than the files), with what git says kept beside it. Outside a checkout (an installed
    wheel, a copied tree without ``.git``) and without that variable ``commit`` is None and
    ``dirty`` None: the installed version stands in."""
    package = Path(__file__).resolve().parents[1]
    top = _git(package, "rev-parse", "--show-toplevel")
    found = None
    # Only a checkout whose attnkit/ is this package counts (not a repository that merely
    # contains site-packages).
    if top and (Path(top) / "attnkit").resolve() == package:
        commit = _git(package, "rev-parse", "HEAD")
        status = _git(package, "status", "--porcelain", "--untracked-files=no")
        if commit:
            found = {"commit": commit, "dirty": None if status is None else bool(status)}
    given = os.environ.get(COMMIT_ENV) or None
    if given:
        out = {"commit": given, "dirty": None, "note": f"commit from ${COMMIT_ENV}"}
        if found:
            out["git"] = found
        return out
    return found or {"commit": None, "dirty": None, "installed": f"attnkit {__version__}"}


#: Environment variables recorded with every run (kernel switches are read from these).
SWITCH_PREFIXES = ("ATTNKIT_", "TRITON_", "CUDA_", "CUPY_", "TORCH_", "PYTORCH_")


def switches() -> dict:
    """The environment variables set that can change what a backend runs."""
    own = (COMMIT_ENV, "ATTNKIT_BENCH_CACHE")  # the harness's settings, not the backends'
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(SWITCH_PREFIXES) and k not in own}


def environment(device: torch.device) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.platform(),
        "device": device_info(device),
        "versions": versions(),
        "source": source_revision(),
        "switches": switches(),
    }
