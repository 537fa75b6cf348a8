"""Results as files: the JSON of a run, the file stem of each kind, and the README's tables
drawn from committed results (``attnkit bench --report DIR...``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .tables import backends_in_order, geomean, num, seq_label, summary, table  # noqa: F401

SCHEMA = "attnkit-bench/1"
#: File stem of each kind of result: ``DIR/bench.json``, ``DIR/decode.json`` ...
STEMS = {"grid": "bench", "decode": "decode", "graphs": "graphs", "host": "host",
         "sustained": "sustained", "varlen": "varlen", "paged": "paged"}


# -- JSON ------------------------------------------------------------------------------------

def _clean(x):
    """JSON has no NaN/inf; write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=1, allow_nan=False) + "\n")
    return path


def read_json(path: str | Path) -> dict:
    """A saved result; anything else (missing, not JSON, another schema) is a ValueError."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read a result from {path}: {type(e).__name__}: {e}") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        schema = result.get("schema") if isinstance(result, dict) else None
        raise ValueError(f"{path} is not an attnkit bench result (schema {schema!r}, "
                         f"expected {SCHEMA!r})")
    return result


# -- the README's tables ---------------------------------------------------------------------

_MODE_NAMES = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward+backward"}
_PEER_NAMES = {"sdpa-flash": "SDPA flash", "sdpa-cudnn": "SDPA cuDNN",
               "sdpa-efficient": "SDPA memory-efficient", "sdpa-math": "SDPA math"}


def _contender(result: dict, name: str) -> str:
    kinds = {c["name"]: c["kind"] for c in result["contenders"]}
    return f"attnkit `{name}`" if kinds.get(name) == "attnkit" else _PEER_NAMES.get(name, name)


def _cudnn(version: int | None) -> str | None:
    """cuDNN's integer version as text: 91900 -> 9.19.0 (from 9 on), 8906 -> 8.9.6."""
    if not version:
        return None
    if version >= 90000:
        return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


def _commit(result: dict) -> str:
    src = result["environment"].get("source") or {}
    if not src.get("commit"):
        return f"commit unknown ({src.get('installed', 'no source record')})"
    return f"commit {src['commit'][:7]}{'-dirty' if src.get('dirty') else ''}"


def _date(result: dict) -> str:
    return result["environment"]["date"][:10]


def _heading(result: dict) -> str:
    v = result["environment"]["versions"]
    parts = [f"torch {v['torch']}"]
    if v.get("cuda"):
        parts.append(f"CUDA {v['cuda']}")
    if v.get("triton"):
        parts.append(f"Triton {v['triton']}")
    if v.get("cupy"):
        parts.append(v["cupy"])
    if _cudnn(v.get("cudnn")):
        parts.append(f"cuDNN {_cudnn(v['cudnn'])}")
    return (f"### {result['environment']['device']['name']}, {_date(result)} "
            f"({', '.join(parts)}; {_commit(result)})")


def _seqlens(values: list[int]) -> str:
    values = sorted(values)
    if len(values) > 2:
        return f"{seq_label(values[0])}..{seq_label(values[-1])}"
    return ", ".join(seq_label(n) for n in values)


def _grid_section(result: dict) -> list[str]:
    g = result["config"]["grid"]
    causal = {(False,): "non-causal", (True,): "causal"}.get(tuple(g["causal"]),
                                                            "causal and not")
    out = [f"Geometric mean of throughput over SDPA flash, per mode, on the grid "
           f"({', '.join(g['dtypes'])}; head dim {', '.join(map(str, g['head_dims']))}; "
           f"{causal}; seqlen {_seqlens(g['seqlens'])}; batch x seqlen = "
           f"{seq_label(g['tokens'])} tokens; model dim {g['model_dim']}):", ""]
    modes = [m for m in _MODE_NAMES if m in g["modes"]]
    out.append("| contender | " + " | ".join(_MODE_NAMES[m] for m in modes) + " |")
    out.append("|---" * (len(modes) + 1) + "|")
    cells = result["cells"]
    for name in backends_in_order(cells):
        if name == "sdpa-flash":
            continue
        row = []
        for m in modes:
            mine = [c for c in cells if c["backend"] == name and c["mode"] == m]
            ratios = [c["ratio_vs_sdpa_flash"] for c in mine if c["ratio_vs_sdpa_flash"]]
            text = f"{geomean(ratios):.2f}x" if ratios else "-"
            if len(ratios) < len(mine):
                text += f" ({len(ratios)} of {len(mine)} cells)"
            row.append(text)
        out.append(f"| {_contender(result, name)} | " + " | ".join(row) + " |")
    return out


def _decode_line(result: dict, grid: dict | None) -> str:
    d = result["config"]["decode"]
    cells = [c for c in result["cells"] if c["mode"] == "decode"]
    lens = sorted({c["seqlen_k"] for c in cells})
    when = ""
    if grid is None or (_date(result), _commit(result)) != (_date(grid), _commit(grid)):
        when = f"; {_date(result)}, {_commit(result)}"
    by = {(c["backend"], c["seqlen_k"]): c for c in cells}
    parts = []
    for name in backends_in_order(cells):
        mine = [by.get((name, n)) for n in lens]
        tbps = " / ".join(num(c["tbps"]) if c and c["status"] == "ok" else "-" for c in mine)
        text = f"{_contender(result, name)} {tbps}"
        if name != "sdpa-flash" and any(c and c["ratio_vs_sdpa_flash"] for c in mine):
            text += " (" + " / ".join(
                f"{c['ratio_vs_sdpa_flash']:.2f}x" if c and c["ratio_vs_sdpa_flash"] else "-"
                for c in mine) + ")"
        parts.append(text)
    return (f"Decode (B={d['batch']}, Hq={d['heads_q']}, Hkv={d['heads_kv']}, "
            f"D={d['head_dim']}, {d['dtype']}, {d['seqlen_q']} query{when}), TB/s of K+V "
            f"read at {' / '.join(seq_label(n) for n in lens)} keys (x SDPA flash): "
            + "; ".join(parts) + ".")


def _results_in(path: Path) -> tuple[dict | None, dict | None]:
    """``(grid, decode)`` results of a results directory (or of one result file)."""
    if path.is_file():
        result = read_json(path)
        if result["kind"] not in ("grid", "decode"):
            raise ValueError(f"{path}: a {result['kind']} result has no README table")
        return (result, None) if result["kind"] == "grid" else (None, result)
    if not path.is_dir():
        raise ValueError(f"{path}: no such results directory")
    found = [read_json(path / f"{STEMS[k]}.json") if (path / f"{STEMS[k]}.json").exists()
             else None for k in ("grid", "decode")]
    if found == [None, None]:
        raise ValueError(f"{path} holds neither bench.json nor decode.json")
    return found[0], found[1]


def readme_tables(paths) -> str:
    """One markdown section per results directory (a GPU): a heading with the GPU, date,
    versions and commit; the geometric mean of each contender's throughput over SDPA flash
    per mode on the grid (``bench.json``); the decode line in TB/s (``decode.json``)."""
    sections = []
    for path in paths:
        grid, decode = _results_in(Path(path))
        lines = [_heading(grid or decode), ""]
        if grid is not None:
            lines += _grid_section(grid) + [""]
        if decode is not None:
            lines += [_decode_line(decode, grid), ""]
        sections.append("\n".join(lines).rstrip())
    return "\n\n".join(sections) + "\n"
