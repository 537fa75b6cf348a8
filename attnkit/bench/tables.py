"""The terminal tables of a result, one function per kind, and the summary under them."""

from __future__ import annotations

import math
from collections import defaultdict

_STATUS_TEXT = {"oom": "OOM", "unsupported": "n/a", "skipped": "skip"}


class _Notes:
    """Numbers the error texts a table shows as ``E1``, ``E2`` ... below it."""

    def __init__(self):
        self.texts: dict[str, int] = {}

    def mark(self, cell: dict) -> str:
        text = f"{cell['backend']}: {cell.get('error') or cell['status']}"
        n = self.texts.setdefault(text, len(self.texts) + 1)
        if cell["status"] == "error":
            return f"E{n}"
        return f"{_STATUS_TEXT.get(cell['status'], cell['status'])}[{n}]"

    def lines(self) -> list[str]:
        return [f"  [{n}] {text}" for text, n in self.texts.items()]


def fmt_table(title: str, row_name: str, rows: list, columns: list[str],
              values: dict) -> list[str]:
    """Right-aligned columns under ``title``; ``values[(row, column)]`` is a cell's text."""
    head = [row_name] + columns
    body = [[str(r)] + [values.get((r, c), "") for c in columns] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    out = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in body]
    return out


def backends_in_order(cells: list[dict]) -> list[str]:
    return list(dict.fromkeys(c["backend"] for c in cells))


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def _ratio(c: dict) -> str:
    r = c.get("ratio_vs_sdpa_flash")
    return "" if r is None or c["backend"] == "sdpa-flash" else f" {r:.2f}x"


def num(x: float) -> str:
    """Three significant digits or so, without exponents for the usual ranges."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def seq_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _device(result: dict) -> str:
    return result["environment"]["device"]["name"]


def grid_table(result: dict) -> str:
    cells = result["cells"]
    backends = backends_in_order(cells)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["dtype"], c["head_dim"], c["causal"], c["mode"])].append(c)
    notes = _Notes()
    out = [f"attnkit bench on {_device(result)} (TFLOP/s, median; Nx = throughput over "
           "sdpa-flash)"]
    dropout = result.get("config", {}).get("grid", {}).get("dropout_p")
    if dropout:
        out[0] += f", every call with dropout_p={dropout:g}"
    for (dtype, d, causal, mode), group in groups.items():
        values = {}
        for c in group:
            text = (f"{num(c['tflops'])}{_ratio(c)}" if c["status"] == "ok"
                    else notes.mark(c))
            values[(seq_label(c["seqlen_q"]), c["backend"])] = text
        rows = list(dict.fromkeys(seq_label(c["seqlen_q"]) for c in group))
        title = f"\n{dtype} D={d} {'causal' if causal else 'non-causal'} {mode}"
        out += fmt_table(title, "seqlen", rows, backends, values)
    mem = [c for c in cells if c["mode"] == "fwd_bwd"]
    if any(c.get("mem_peak_bytes") is not None for c in mem):
        out.append("\nPeak memory of forward+backward, MiB (inputs + what the call needs)")
        mgroups: dict[tuple, list[dict]] = defaultdict(list)
        for c in mem:
            mgroups[(c["dtype"], c["head_dim"], c["causal"])].append(c)
        for (dtype, d, causal), group in mgroups.items():
            values = {}
            for c in group:
                if c.get("mem_peak_bytes") is not None:
                    text = f"{c['mem_peak_bytes'] / 2**20:.0f}"
                else:
                    text = "OOM" if c["status"] == "oom" else notes.mark(c)
                values[(seq_label(c["seqlen_q"]), c["backend"])] = text
            rows = list(dict.fromkeys(seq_label(c["seqlen_q"]) for c in group))
            title = f"\n{dtype} D={d} {'causal' if causal else 'non-causal'} fwd+bwd memory"
            out += fmt_table(title, "seqlen", rows, backends, values)
    elif mem:
        out.append("\n(peak memory is measured on CUDA devices only)")
    out += _footer(result, notes)
    return "\n".join(out)


def decode_table(result: dict) -> str:
    """The decoding table; with CUDA graphs (kind ``graphs``) one table per mode."""
    cells = result["cells"]
    spec = result["config"]["decode"]
    backends = backends_in_order(cells)
    notes = _Notes()
    out = [f"attnkit bench --decode on {_device(result)}: B={spec['batch']} "
           f"Hq={spec['heads_q']} Hkv={spec['heads_kv']} D={spec['head_dim']} {spec['dtype']} "
           f"Sq={spec['seqlen_q']}", "TB/s of K+V read (median; Nx = over sdpa-flash)"]
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    for mode in modes:
        values = {}
        for c in cells:
            if c["mode"] == mode:
                text = f"{num(c['tbps'])}{_ratio(c)}" if c["status"] == "ok" else notes.mark(c)
                values[(seq_label(c["seqlen_k"]), c["backend"])] = text
        rows = list(dict.fromkeys(seq_label(c["seqlen_k"]) for c in cells if c["mode"] == mode))
        title = {"decode": "eager calls", "decode_graph": "replays of a CUDA graph"}[mode]
        lines = fmt_table(f"\n{title}", "cache", rows, backends, values)
        out += lines if len(modes) > 1 else lines[1:]
    out += _footer(result, notes)
    return "\n".join(out)


def _case(c: dict) -> str:
    """A host-overhead row's problem in a few words."""
    if c["mode"] == "decode":
        return (f"decode {c['dtype']} B={c['batch']} Hq={c['heads_q']} Hkv={c['heads_kv']} "
                f"D={c['head_dim']} cache={seq_label(c['seqlen_k'])}")
    return (f"{c['mode']} {c['dtype']} B={c['batch']} H={c['heads_q']} D={c['head_dim']} "
            f"S={seq_label(c['seqlen_q'])}{' causal' if c['causal'] else ''}")


def host_table(result: dict) -> str:
    cells = result["cells"]
    backends = backends_in_order(cells)
    notes = _Notes()
    rows = list(dict.fromkeys(_case(c) for c in cells))
    host, gpu = {}, {}
    for c in cells:
        key = (_case(c), c["backend"])
        if c["status"] != "ok":
            host[key] = gpu[key] = notes.mark(c)
            continue
        r = c.get("host_vs_sdpa_flash")
        host[key] = f"{num(c['host_us'])}" + (
            "" if r is None or c["backend"] == "sdpa-flash" else f" {r:.2f}x")
        gpu[key] = "" if c["gpu_us"] is None else num(c["gpu_us"])
    calls = result["config"]["host"]["calls"]
    out = fmt_table(f"attnkit bench --host-overhead on {_device(result)}: host us per call "
                    f"(median of batches of {calls} calls, the GPU kept busy; Nx = over "
                    "sdpa-flash's)", "case", rows, backends, host)
    if any(c.get("gpu_us") is not None for c in cells):
        out += fmt_table("\nGPU us per call (median, L2 flushed): a row whose host time "
                         "exceeds it is host-bound", "case", rows, backends, gpu)
    out += _footer(result, notes)
    return "\n".join(out)


def sustained_table(result: dict) -> str:
    cells = result["cells"]
    notes = _Notes()
    seconds = result["config"]["sustained_s"]
    head = ["backend", "case", "pass", "TFLOP/s", "x flash", "SM MHz", "W", "C", "samples"]
    body = []
    for c in cells:
        case = (f"{c['mode']} {c['dtype']} D={c['head_dim']} S={seq_label(c['seqlen_q'])}"
                f"{' causal' if c['causal'] else ''}")
        if c["status"] != "ok":
            body.append([c["backend"], case, "", notes.mark(c), "", "", "", "", ""])
            continue
        r = c.get("ratio_vs_sdpa_flash")
        for p in c["passes"]:
            body.append([c["backend"], case, str(p["pass"]), num(p["tflops"]),
                         "" if r is None else f"{r:.2f}", *(
                             "-" if p[k] is None else f"{p[k]:.0f}"
                             for k in ("sm_mhz", "power_w", "temp_c")), str(p["samples"])])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    out = [f"attnkit bench --sustained {seconds:g} on {_device(result)}: each contender back "
           "to back, in order then reversed (pass 0, 1); clock, power and temperature are "
           "medians of nvidia-smi samples"]
    out += ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head] + body]
    out += _footer(result, notes)
    return "\n".join(out)


def _footer(result: dict, notes: _Notes) -> list[str]:
    out = []
    if notes.texts:
        out.append("\nNotes:")
        out += notes.lines()
    for name, why in result.get("left_out", {}).items():
        out.append(f"  not timed: {name}: {why}")
    for c in result["cells"]:
        for note in c.get("notes") or ():
            out.append(f"  note: {c['backend']} {c['mode']} Sk={c['seqlen_k']}: {note}")
    switches = result["environment"].get("switches")
    if switches:
        out.append("  environment: " + " ".join(f"{k}={v}" for k, v in switches.items()))
    out.append(f"({len(result['cells'])} cells in {result['elapsed_s']}s)")
    return out


def varlen_table(result: dict) -> str:
    """Per mode and length mix: TFLOP/s (FLOPs summed per document) of every contender by
    total tokens, head dim and causal; then each varlen call's throughput over its targets:
    the same backend's dense call (equal mix), SDPA on nested tensors and SDPA-flash on the
    padded batch (long-tailed)."""
    cells = result["cells"]
    notes = _Notes()
    dropout = result.get("config", {}).get("varlen", {}).get("dropout_p")
    out = [f"attnkit bench --varlen on {_device(result)} (TFLOP/s, median; FLOPs summed per "
           "document)"]
    if dropout:
        out[0] += f", every call with dropout_p={dropout:g}"

    def column(c):
        return f"{seq_label(c['tokens'])} D={c['head_dim']}{' causal' if c['causal'] else ''}"

    def row(c):
        return f"{c['backend']} {c['call']}" if c["kind"] == "attnkit" else c["backend"]

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["dtype"], c["mode"], c["mix"])].append(c)
    for (dtype, mode, mix), group in groups.items():
        columns = list(dict.fromkeys(column(c) for c in group))
        rows = list(dict.fromkeys(row(c) for c in group))
        values = {(row(c), column(c)): num(c["tflops"]) if c["status"] == "ok"
                  else notes.mark(c) for c in group}
        docs = sorted({(c["tokens"], c["documents"], c["seqlen_q"]) for c in group})
        shape = ", ".join(f"{seq_label(t)}: {n} docs, longest {m}" for t, n, m in docs)
        out += fmt_table(f"\n{dtype} {mode}, {mix} ({shape})", "contender", rows, columns,
                         values)
        ratios, rrows = {}, []
        for c in group:
            if c["call"] != "varlen" or c["status"] != "ok":
                continue
            parts = [f"{c[f]:.2f}x {name}" for f, name in (
                ("ratio_vs_dense", "dense"), ("ratio_vs_sdpa_nested", "nested"),
                ("ratio_vs_sdpa_flash_padded", "padded")) if c.get(f)]
            if parts:
                ratios[(row(c), column(c))] = ", ".join(parts)
                rrows.append(row(c))
        if ratios:
            out += fmt_table(f"  varlen throughput over: ({mode}, {mix})", "contender",
                             list(dict.fromkeys(rrows)), columns, ratios)
    out += _footer(result, notes)
    return "\n".join(out)


def varlen_summary(result: dict) -> str:
    """Geometric means of each varlen call's throughput over each of its targets."""
    cells = [c for c in result["cells"] if c["call"] == "varlen"]
    columns = ["vs dense (equal)", "vs sdpa-nested", "vs sdpa-flash-padded"]
    fields = ["ratio_vs_dense", "ratio_vs_sdpa_nested", "ratio_vs_sdpa_flash_padded"]
    values, rows = {}, []
    for c in cells:
        rows.append(f"{c['backend']} {c['mode']}")
    rows = list(dict.fromkeys(rows))
    for r in rows:
        mine = [c for c in cells if f"{c['backend']} {c['mode']}" == r]
        for col, f in zip(columns, fields):
            xs = [c[f] for c in mine if c.get(f)]
            values[(r, col)] = f"{geomean(xs):.2f}x ({len(xs)})" if xs else "-"
    return "\n".join(fmt_table("\nSummary: geometric mean of varlen throughput over each "
                               "target (cells)", "backend mode", rows, columns, values))


def table(result: dict) -> str:
    if result["kind"] == "paged":
        from .paged import paged_table

        return paged_table(result)
    return {"grid": grid_table, "decode": decode_table, "graphs": decode_table,
            "host": host_table, "sustained": sustained_table,
            "varlen": varlen_table}[result["kind"]](result)


def summary(result: dict) -> str:
    """A few lines: per contender and mode, the geometric mean of its throughput over
    sdpa-flash's (host time over sdpa-flash's for a host-overhead result) across the cells
    where both ran, and how many of its cells ran."""
    if result["kind"] == "varlen":
        return varlen_summary(result)
    if result["kind"] == "paged":
        from .paged import paged_summary

        return paged_summary(result)
    cells = result["cells"]
    field = "host_vs_sdpa_flash" if result["kind"] == "host" else "ratio_vs_sdpa_flash"
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    values = {}
    for b in backends_in_order(cells):
        for m in modes:
            mine = [c for c in cells if c["backend"] == b and c["mode"] == m]
            ratios = [c[field] for c in mine if c.get(field)]
            ok = sum(c["status"] == "ok" for c in mine)
            gm = f"{geomean(ratios):.2f}x" if ratios else "-"
            values[(b, m)] = f"{gm} ({ok}/{len(mine)} ran)"
    what = ("host time over sdpa-flash's" if result["kind"] == "host"
            else "throughput over sdpa-flash")
    title = f"\nSummary: geometric mean of {what} on the same cells (cells that ran / all)"
    return "\n".join(fmt_table(title, "backend", backends_in_order(cells), modes, values))
