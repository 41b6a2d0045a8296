"""`--plot FILE.png`: latency percentiles and throughput against load, one point per step (matplotlib).

The x axis is the step's request rate, or its measured request throughput when it sent at an infinite rate
(a fixed concurrency).
"""

from __future__ import annotations

import math


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_steps(steps: list[dict], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_rate = all(not math.isinf(s["request_rate"]) for s in steps)
    x = [s["request_rate"] if by_rate else s["request_throughput"] for s in steps]
    xlabel = "request rate (req/s)" if by_rate else "measured request throughput (req/s)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, name, label in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        for stat, style in (("median", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(x, [s[f"{stat}_{name}_ms"] for s in steps], style, label=stat)
        slo = steps[0]["slo_ms"].get(name) if steps else None
        if slo:
            ax.axhline(slo, color="red", linewidth=1, label=f"SLO {slo:g} ms")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(x, [s["output_throughput"] for s in steps], "o-", label="output tok/s")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, [s["request_throughput"] for s in steps], "s--", color="gray", label="requests/s")
    if steps and steps[0]["slo_ms"]:
        ax2.plot(x, [s["request_goodput"] for s in steps], "^-", color="green", label="goodput req/s")
    ax2.set_ylabel("requests/s")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expert_load_path(plot_path: str) -> str:
    """`run.png` -> `run-expert-load.png`."""
    stem = plot_path[:-4] if plot_path.lower().endswith(".png") else plot_path
    return stem + "-expert-load.png"


def plot_expert_load(table: dict, path: str, title: str = "") -> bool:
    """Heat map of GET /v1/expert_load's layer x expert table, each row as shares of the layer's routed tokens
    (so layers compare on one colour scale). False, and no file, when the table is off or empty."""
    rows = [r for r in table.get("layers") or [] if r.get("counts")]
    if not table.get("enabled", True) or not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray([r["counts"] for r in rows], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    n_layers, n_experts = shares.shape
    fig, ax = plt.subplots(figsize=(min(4 + 0.12 * n_experts, 24), min(2 + 0.3 * n_layers, 18)))
    im = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers), [str(r["layer"]) for r in rows])
    if n_layers > 40:
        ax.yaxis.set_major_locator(plt.MaxNLocator(20, integer=True))
    fig.colorbar(im, ax=ax, label="share of the layer's routed tokens")
    window = table.get("window_s")
    ax.set_title((title + "\n" if title else "") + "expert load" + (f" over {window:g} s" if window else "")
                 + f" (even = {1 / n_experts:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
