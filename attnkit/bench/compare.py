"""Per-cell ratios between runs of the same kind: a run against a cached or committed one
(``--compare``), or the runs of an A/B of environment switches (``--env``).

Cells are matched on the problem they measured (`grid.IDENTITY`); a ratio is the speed of a
run over the base run's, so above 1 means faster than the base, whatever the unit (for
host-overhead results, the base's host time over the run's).
"""

from __future__ import annotations

from collections import defaultdict

from .grid import IDENTITY
from .peers import PEERS
from .tables import backends_in_order, fmt_table, geomean, seq_label

#: Kind -> (field compared, its name, whether larger is faster).
METRICS = {"grid": ("tflops", "TFLOP/s", True), "sustained": ("tflops", "TFLOP/s", True),
           "decode": ("tbps", "TB/s", True), "graphs": ("tbps", "TB/s", True),
           "host": ("host_us", "host us per call", False),
           "varlen": ("tflops", "TFLOP/s", True)}


#: What else names a varlen cell: its packing and what was called.
VARLEN_IDENTITY = ("tokens", "mix", "call")


def _key(c: dict) -> tuple:
    key = tuple(c[f] for f in IDENTITY)
    return key + tuple(c[f] for f in VARLEN_IDENTITY) if "call" in c else key


def _speedup(c: dict, base: dict, field: str, larger_is_faster: bool) -> float | None:
    if c["status"] != "ok" or base["status"] != "ok" or not c.get(field) or not base.get(field):
        return None
    return c[field] / base[field] if larger_is_faster else base[field] / c[field]


def ratios(result: dict, base: dict) -> dict[tuple, float]:
    """Cell identity -> speed of ``result`` over ``base``, where both ran."""
    if result["kind"] != base["kind"]:
        raise ValueError(f"cannot compare a {result['kind']} result with a {base['kind']} one")
    field, _, larger = METRICS[result["kind"]]
    theirs = {_key(c): c for c in base["cells"]}
    out = {}
    for c in result["cells"]:
        b = theirs.get(_key(c))
        r = None if b is None else _speedup(c, b, field, larger)
        if r is not None:
            out[_key(c)] = r
    return out


def compare_table(results: dict[str, dict], base: str, title: str | None = None) -> str:
    """One table per (mode, dtype, head dim, causal): rows are seqlens (cache lengths),
    columns each backend's ratio for every run but ``base``; then the geometric mean per
    backend and mode."""
    if base not in results or len(results) < 2:
        raise ValueError("a comparison needs the base run and at least one other")
    kind = results[base]["kind"]
    field, unit, _ = METRICS[kind]
    others = [name for name in results if name != base]
    per = {name: ratios(results[name], results[base]) for name in others}
    if kind == "varlen":
        return _varlen_compare(per, base, others, unit, title)
    cells = [c for name in [base, *others] for c in results[name]["cells"]]
    backends = backends_in_order(cells)

    def column(backend: str, name: str) -> str:
        return backend if len(others) == 1 else f"{backend} {name}"

    columns = [column(b, n) for b in backends for n in others]
    groups: dict[tuple, dict] = defaultdict(dict)
    for c in cells:
        group = (c["mode"], c["dtype"], c["head_dim"], c["causal"], c["heads_q"],
                 c["heads_kv"])
        groups[group].setdefault((c["seqlen_q"], c["seqlen_k"], c["batch"]), None)
    if title is None:
        title = f"{unit}: each run over {base} per cell (above 1: faster than {base})"
    lines = [title] if title else []
    compared = 0
    for group, shapes in groups.items():
        mode, dtype, d, causal, hq, hkv = group
        labels = {s: seq_label(s[1]) for s in shapes}
        if len(set(labels.values())) < len(labels):  # same length at two batch sizes
            labels = {s: f"{seq_label(s[1])} B={s[2]}" for s in shapes}
        values = {}
        for (sq, sk, b), label in labels.items():
            for backend in backends:
                for name in others:
                    key = (backend, mode, dtype, b, hq, hkv, sq, sk, d, causal)
                    if key in per[name]:
                        values[(label, column(backend, name))] = f"{per[name][key]:.2f}"
                        compared += 1
        if not values:
            continue
        heads = f"H={hq}" if hq == hkv else f"Hq={hq} Hkv={hkv}"
        name = (f"\n{mode} {dtype} D={d} {heads}"
                f"{'' if kind in ('decode', 'graphs') else ' causal' if causal else ''}")
        row = "cache" if kind in ("decode", "graphs") else "seqlen"
        shown = [c for c in columns if any((r, c) in values for r in labels.values())]
        lines += fmt_table(name, row, list(labels.values()), shown, values)
    if not compared:
        return "\n".join([*lines, f"(no cell ran in both {base} and {', '.join(others)})"])
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    summary = {}
    for backend in backends:
        for name in others:
            for m in modes:
                rs = [r for k, r in per[name].items() if k[0] == backend and k[1] == m]
                if rs:
                    summary[(column(backend, name), m)] = f"{geomean(rs):.3f} ({len(rs)})"
    lines += fmt_table(f"\nGeometric mean over {base} (cells compared)", "backend",
                       [c for c in columns if any((c, m) in summary for m in modes)], modes,
                       summary)
    return "\n".join(lines + _against_peers(per, backends, others, modes, column))


#: The peers a backend's change is also read against, where both runs timed them.
REFERENCE_PEERS = ("sdpa-flash", "sdpa-cudnn")
#: The band `_against_peers` counts cells in (the "within noise" of a restructure).
NOISE = 0.03


def _against_peers(per, backends, others, modes, column) -> list[str]:
    """Each attnkit backend's ratio divided by a peer's ratio in the same cell: the GPU's
    clocks, power state and host move both alike between processes, so this reads a kernel's
    own change where the plain ratio moves 5-15% per cell. Geometric mean and the share of
    cells within +-NOISE, per mode."""
    rows, values = [], {}
    for backend in backends:
        if backend in PEERS:
            continue
        for peer in REFERENCE_PEERS:
            for name in others:
                row = f"{column(backend, name)} / {peer}"
                for m in modes:
                    rs = [r / per[name][(peer, *k[1:])] for k, r in per[name].items()
                          if k[0] == backend and k[1] == m and (peer, *k[1:]) in per[name]]
                    if rs:
                        near = sum(abs(x - 1) <= NOISE for x in rs) / len(rs)
                        values[(row, m)] = f"{geomean(rs):.3f} {near:4.0%}"
                        rows.append(row)
    if not values:
        return []
    return fmt_table(f"\nOver a peer's own change (geometric mean, share within "
                     f"+-{NOISE:.0%})", "backend", list(dict.fromkeys(rows)), modes, values)


def _varlen_compare(per: dict, base: str, others: list[str], unit: str, title) -> str:
    """One row per varlen cell (contender, call, mix, tokens, D, causal, mode), one column
    per run compared with ``base``."""
    if title is None:
        title = f"{unit}: each run over {base} per cell (above 1: faster than {base})"
    values, rows = {}, []
    for name in others:
        for key, r in per[name].items():
            c = dict(zip(IDENTITY + VARLEN_IDENTITY, key))
            row = (f"{c['backend']} {c['call']} {c['mix']} {seq_label(c['tokens'])} "
                   f"D={c['head_dim']}{' causal' if c['causal'] else ''} {c['mode']}")
            rows.append(row)
            values[(row, name)] = f"{r:.2f}"
    if not values:
        return f"{title}\n(no cell ran in both {base} and {', '.join(others)})"
    return "\n".join(fmt_table(title, "cell", list(dict.fromkeys(rows)), others, values))
