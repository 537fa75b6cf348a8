"""The PNG of a result: throughput against seqlen (or cache length) per backend."""

from __future__ import annotations

from pathlib import Path

from .tables import backends_in_order as _backends_in_order
from .tables import seq_label as _seq_label

#: Kinds that have a plot (host-overhead and sustained results are tables only).
PLOTTED = ("grid", "decode", "graphs")

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
    if result["kind"] not in PLOTTED:
        raise ValueError(f"a {result['kind']} result has no plot, only its table")
    if result["kind"] in ("decode", "graphs"):
        spec = result["config"]["decode"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = {"decode": "-", "decode_graph": "--"}
        for b in backends:
            for mode, style in styles.items():
                pts = sorted((c["seqlen_k"], c["tbps"]) for c in cells
                             if c["backend"] == b and c["mode"] == mode)
                if pts:
                    label = b if mode == "decode" else f"{b} (CUDA graph)"
                    ax.plot(*zip(*pts), style, marker="o", color=colors[b], label=label)
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
