"""Results out: the terminal table, the JSON file and the PNG plot."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

SCHEMA = "attnkit-bench/1"

_STATUS_TEXT = {"oom": "OOM", "unsupported": "n/a", "skipped": "skip"}


# -- tables --------------------------------------------------------------------------------

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


def _fmt_table(title: str, row_name: str, rows: list, columns: list[str],
               values: dict) -> list[str]:
    head = [row_name] + columns
    body = [[str(r)] + [values.get((r, c), "") for c in columns] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    out = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in body]
    return out


def _backends_in_order(cells: list[dict]) -> list[str]:
    return list(dict.fromkeys(c["backend"] for c in cells))


def _ratio(c: dict) -> str:
    r = c.get("ratio_vs_sdpa_flash")
    return "" if r is None or c["backend"] == "sdpa-flash" else f" {r:.2f}x"


def _num(x: float) -> str:
    """Three significant digits or so, without exponents for the usual ranges."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _seq_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def grid_table(result: dict) -> str:
    cells = result["cells"]
    backends = _backends_in_order(cells)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["dtype"], c["head_dim"], c["causal"], c["mode"])].append(c)
    notes = _Notes()
    out = [f"attnkit bench on {result['environment']['device']['name']} "
           f"(TFLOP/s, median; Nx = throughput over sdpa-flash)"]
    for (dtype, d, causal, mode), group in groups.items():
        values = {}
        for c in group:
            text = (f"{_num(c['tflops'])}{_ratio(c)}" if c["status"] == "ok"
                    else notes.mark(c))
            values[(_seq_label(c["seqlen_q"]), c["backend"])] = text
        rows = list(dict.fromkeys(_seq_label(c["seqlen_q"]) for c in group))
        title = f"\n{dtype} D={d} {'causal' if causal else 'non-causal'} {mode}"
        out += _fmt_table(title, "seqlen", rows, backends, values)
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
                values[(_seq_label(c["seqlen_q"]), c["backend"])] = text
            rows = list(dict.fromkeys(_seq_label(c["seqlen_q"]) for c in group))
            title = f"\n{dtype} D={d} {'causal' if causal else 'non-causal'} fwd+bwd memory"
            out += _fmt_table(title, "seqlen", rows, backends, values)
    elif mem:
        out.append("\n(peak memory is measured on CUDA devices only)")
    out += _footer(result, notes)
    return "\n".join(out)


def decode_table(result: dict) -> str:
    cells = result["cells"]
    spec = result["config"]["decode"]
    backends = _backends_in_order(cells)
    notes = _Notes()
    values = {}
    for c in cells:
        text = (f"{_num(c['tbps'])}{_ratio(c)}" if c["status"] == "ok" else notes.mark(c))
        values[(_seq_label(c["seqlen_k"]), c["backend"])] = text
    rows = list(dict.fromkeys(_seq_label(c["seqlen_k"]) for c in cells))
    title = (f"attnkit bench --decode on {result['environment']['device']['name']}: "
             f"B={spec['batch']} Hq={spec['heads_q']} Hkv={spec['heads_kv']} "
             f"D={spec['head_dim']} {spec['dtype']} Sq={spec['seqlen_q']}\n"
             "TB/s of K+V read (median; Nx = over sdpa-flash)")
    out = _fmt_table(title, "cache", rows, backends, values)
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
    out.append(f"({len(result['cells'])} cells in {result['elapsed_s']}s)")
    return out


def table(result: dict) -> str:
    return decode_table(result) if result["kind"] == "decode" else grid_table(result)


def summary(result: dict) -> str:
    """A few lines: per contender and mode, the geometric mean of its throughput over
    sdpa-flash's across the cells where both ran, and how many of its cells ran."""
    cells = result["cells"]
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    values = {}
    for b in _backends_in_order(cells):
        for m in modes:
            mine = [c for c in cells if c["backend"] == b and c["mode"] == m]
            ratios = [c["ratio_vs_sdpa_flash"] for c in mine if c["ratio_vs_sdpa_flash"]]
            ok = sum(c["status"] == "ok" for c in mine)
            gm = (f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x"
                  if ratios else "-")
            values[(b, m)] = f"{gm} ({ok}/{len(mine)} ran)"
    title = ("\nSummary: geometric mean of throughput over sdpa-flash on the same cells "
             "(cells that ran / all)")
    return "\n".join(_fmt_table(title, "backend", _backends_in_order(cells), modes, values))


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
    result = json.loads(Path(path).read_text())
    if result.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not an attnkit bench result (schema "
                         f"{result.get('schema')!r}, expected {SCHEMA!r})")
    return result


# -- plots -----------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "the bench plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or attnkit[bench]); the JSON is complete, and `attnkit bench --plot-from "
            "FILE.json` draws it later") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _memory_panel(ax, cells, backends, colors, styles, d, causal, seqlens) -> None:
    """Peak fwd+bwd memory against seqlen; an out-of-memory cell is an x on the top edge."""
    top = max((c["mem_peak_bytes"] for c in cells if c.get("mem_peak_bytes")), default=1)
    top /= 2**30
    for b in backends:
        for dt, style in styles.items():
            mine = [c for c in cells if c["backend"] == b and c["dtype"] == dt
                    and c["head_dim"] == d and c["causal"] == causal]
            pts = sorted((c["seqlen_q"], c["mem_peak_bytes"] / 2**30) for c in mine
                         if c.get("mem_peak_bytes") is not None)
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[b])
            ooms = [c["seqlen_q"] for c in mine if c["status"] == "oom"]
            if ooms:
                ax.plot(ooms, [top * 1.05] * len(ooms), "x", ms=7, color=colors[b])
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens, [_seq_label(n) for n in seqlens])
    ax.minorticks_off()
    ax.set_title(f"D={d} {'causal' if causal else 'non-causal'} fwd+bwd peak memory "
                 "(x = OOM)", fontsize=9)
    ax.set_xlabel("seqlen")
    ax.set_ylabel("GiB")
    ax.grid(alpha=0.3)


def plot(result: dict, path: str | Path) -> Path:
    """Draw ``result`` to a PNG: TFLOP/s against seqlen per backend, one panel per head dim /
    causal / mode (dtypes as line styles); for decode, TB/s against cache length."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = [c for c in result["cells"] if c["status"] == "ok"]
    backends = _backends_in_order(result["cells"])
    colors = {b: f"C{i % 10}" for i, b in enumerate(backends)}
    device = result["environment"]["device"]["name"]
    if result["kind"] == "decode":
        spec = result["config"]["decode"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for b in backends:
            pts = sorted((c["seqlen_k"], c["tbps"]) for c in cells if c["backend"] == b)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[b], label=b)
        ax.set_xscale("log", base=2)
        lens = spec["cache_lens"]
        ax.set_xticks(lens, [_seq_label(n) for n in lens])
        ax.minorticks_off()
        ax.set_xlabel("cache length")
        ax.set_ylabel("TB/s of K+V read")
        ax.set_title(f"decode on {device}: B={spec['batch']} Hq={spec['heads_q']} "
                     f"Hkv={spec['heads_kv']} D={spec['head_dim']} {spec['dtype']}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        grid = result["config"]["grid"]
        panels = [(d, causal) for d in grid["head_dims"] for causal in grid["causal"]]
        modes = grid["modes"]
        styles = {dt: s for dt, s in zip(grid["dtypes"], ["-", "--", ":", "-."])}
        # Memory panels (CUDA runs): one per head dim / causal, after the throughput rows.
        mem_cells = [c for c in result["cells"] if c["mode"] == "fwd_bwd"
                     and (c.get("mem_peak_bytes") is not None or c["status"] == "oom")]
        ncols = len(modes)
        mem_rows = -(-len(panels) // ncols) if mem_cells else 0
        fig, axes = plt.subplots(len(panels) + mem_rows, ncols, squeeze=False,
                                 figsize=(4.2 * ncols, 3.2 * (len(panels) + mem_rows)))
        for n in range(len(panels) * ncols, (len(panels) + mem_rows) * ncols):
            ax = axes[n // ncols][n % ncols]
            if n - len(panels) * ncols >= len(panels):
                ax.set_visible(False)
                continue
            d, causal = panels[n - len(panels) * ncols]
            _memory_panel(ax, mem_cells, backends, colors, styles, d, causal, grid["seqlens"])
        for i, (d, causal) in enumerate(panels):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                for b in backends:
                    for dt, style in styles.items():
                        pts = sorted((c["seqlen_q"], c["tflops"]) for c in cells
                                     if c["backend"] == b and c["dtype"] == dt
                                     and c["head_dim"] == d and c["causal"] == causal
                                     and c["mode"] == mode)
                        if pts:
                            label = b if len(styles) == 1 else f"{b} {dt}"
                            ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[b],
                                    label=label)
                ax.set_xscale("log", base=2)
                ax.set_xticks(grid["seqlens"], [_seq_label(n) for n in grid["seqlens"]])
                ax.minorticks_off()
                ax.set_title(f"D={d} {'causal' if causal else 'non-causal'} {mode}",
                             fontsize=9)
                ax.set_xlabel("seqlen")
                ax.set_ylabel("TFLOP/s")
                ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for row in axes:
            for ax in row:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in labels:
                        handles.append(h)
                        labels.append(lab)
        fig.suptitle(f"attnkit bench on {device}", y=0.995, fontsize=10)
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.975),
                   ncol=min(len(labels), 6), fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.93 if len(labels) <= 6 else 0.9))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
