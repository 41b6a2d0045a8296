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
