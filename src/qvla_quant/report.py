"""What people read and look at: the per-role summary table of a plan or artifact, the stored-bytes lines, and
plots of sensitivities and bit allocations (PNG, written with matplotlib's Agg backend). Used by the `qvla-quant`
CLI and by the policy jobs (`qvla_ros.policy.quantize`, `qvla_ros.policy.calibration_job`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qvla_quant.packed import PACKED_FORMAT_VERSION, predicted_weight_bytes
from qvla_quant.plan import Plan
from qvla_quant.quantizer import BIT_CHOICES


def summary_rows(plan: Plan, source_dtype, *, packed_version: int | None = None) -> list[dict]:
    """Per role and in total: layers, weights, average bits (the plan's, b * K per row), the per-row overhead in bits
    per weight beside it and the stored bits per weight (the two added), pruned fraction, weight bytes before (source
    dtype) and after (what the plan implies: `qvla_quant.packed.predicted_weight_bytes`, equal to what is stored).

    source_dtype: one dtype, or {layer name: dtype}; packed_version: the byte formula's layout (default current).
    """
    version = packed_version or PACKED_FORMAT_VERSION

    def dtype_of(name):
        return source_dtype[name] if isinstance(source_dtype, dict) else source_dtype

    rows = []
    for role in [*plan.roles(), None]:
        layers = [lp for lp in plan.layers.values() if role is None or lp.role == role]
        weights = sum(lp.n_weights for lp in layers)
        after = sum(predicted_weight_bytes(lp, dtype_of(lp.name), packed_version=version) for lp in layers)
        stored = 8.0 * after / weights if weights else float("nan")
        rows.append(
            {
                "role": role or "total",
                "layers": len(layers),
                "weights": weights,
                "avg_bits": plan.average_bits(role),
                "overhead_bits": stored - plan.average_bits(role),
                "stored_bits": stored,
                "pruned": plan.pruned_fraction(role),
                "bytes_before": sum(lp.n_weights * dtype_of(lp.name).itemsize for lp in layers),
                "bytes_after": after,
            }
        )
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_table(rows: list[dict]) -> str:
    header = ["role", "layers", "weights", "avg bits", "+overhead", "stored bits", "pruned", "bytes before",
              "bytes after", "ratio"]  # fmt: skip
    body = [
        [
            r["role"], str(r["layers"]), f"{r['weights']:,}", f"{r['avg_bits']:.3f}", f"+{r['overhead_bits']:.3f}",
            f"{r['stored_bits']:.3f}", f"{100 * r['pruned']:.2f}%",
            human_bytes(r["bytes_before"]), human_bytes(r["bytes_after"]),
            f"{r['bytes_after'] / r['bytes_before']:.3f}" if r["bytes_before"] else "-",
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))))
    lines.append(
        "(bits per weight: the plan's b x K per row, +overhead of the per-row scale, zero point, row index and byte "
        "padding, stored = the two added = 8 x bytes after / weights)"
    )
    return "\n".join(lines)


def stored_bytes_lines(summary: dict) -> list[str]:
    """An artifact's stored weight bytes (measured when it was saved) against what its plan implies, and its bits."""
    after, planned = summary.get("quantized_weight_bytes_after"), summary.get("quantized_weight_bytes_planned")
    verdict = "equal" if after == planned else f"DIFFER by {after - planned:+,} B" if planned is not None else "-"
    overhead = summary.get("overhead_bits_per_weight", float("nan"))
    stored = summary.get("average_bits_stored", float("nan"))
    source = ", ".join(summary.get("source_dtype", [])) or "?"
    kept = ", ".join(summary.get("kept_dtype", [])) or "?"
    lines = [
        f"stored: quantized weights {after:,} B ({human_bytes(after)}), plan-implied {planned:,} B: {verdict}"
        if planned is not None
        else f"stored: quantized weights {after:,} B ({human_bytes(after)})",
        f"bits per weight: {summary['average_bits']:.4f} planned + {overhead:.4f} overhead = {stored:.4f} stored "
        f"(packed layout {summary.get('packed_format_version')}; source {source}, kept rows {kept}, per-row "
        f"overhead bytes {summary.get('row_overhead_bytes')})",
        f"measured: quantized weights {human_bytes(summary['quantized_weight_bytes_before'])} -> "
        f"{human_bytes(after)}, all parameters {human_bytes(summary['parameter_bytes_before'])} -> "
        f"{human_bytes(summary['parameter_bytes_after'])}",
    ]
    return lines


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


ROLE_COLORS = {
    "vision": "tab:blue", "projector": "tab:purple", "language": "tab:green", "action": "tab:red",
    "action_head": "tab:orange", "other": "tab:gray",
}  # fmt: skip


def plot_sensitivity(sens, directory) -> Path:
    """sensitivity_map.png: log10 s of every channel, one column of dots per layer, one panel per bit-width."""
    plt = pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    qbits = [b for b in sens.bits if b != 16]
    fig, axes = plt.subplots(len(qbits), 1, figsize=(max(8, 0.18 * len(sens.layers)), 2.2 * len(qbits)), sharex=True)
    axes = [axes] if len(qbits) == 1 else axes
    names = list(sens.layers)
    for ax, b in zip(axes, qbits):
        col = sens.bit_index(b)
        for x, name in enumerate(names):
            v = sens.values(name)[:, col]
            v = v[v > 0]
            if len(v):
                jitter = (torch.rand(len(v), generator=torch.Generator().manual_seed(x)) - 0.5) * 0.6
                ax.scatter(x + jitter, v.log10(), s=2, color=ROLE_COLORS.get(sens.layers[name].role, "k"), alpha=0.5)
        ax.set_ylabel(f"log10 s ({b} bit)")
    axes[-1].set_xticks(range(len(names)))
    axes[-1].set_xticklabels([n.split(".", 2)[-1] for n in names], rotation=90, fontsize=5)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=r) for r, c in ROLE_COLORS.items()]
    axes[0].legend(handles=handles, fontsize=6, ncol=6, loc="upper right")
    axes[0].set_title(f"action-space sensitivity per channel ({len(sens.dead_layers)} dead layers not shown)")
    fig.tight_layout()
    path = directory / "sensitivity_map.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_plan(plan: Plan, directory) -> list[Path]:
    """bit_histogram.png (share of weights at each bit-width, per role) and layer_bits.png (average per layer)."""
    plt = pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    roles = plan.roles()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(roles))
    for i, role in enumerate(roles):
        hist = plan.bit_histogram(role)
        total = sum(hist.values()) or 1
        xs = [j + i * width for j in range(len(BIT_CHOICES))]
        ax.bar(xs, [hist[b] / total for b in BIT_CHOICES], width, label=role, color=ROLE_COLORS.get(role))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(BIT_CHOICES))])
    ax.set_xticklabels([f"{b} bit" if b else "pruned" for b in BIT_CHOICES])
    ax.set_ylabel("share of the role's weights")
    ax.set_title(f"{plan.method}: {plan.average_bits():.3f} bits/weight (budget {plan.budget})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    hist_path = directory / "bit_histogram.png"
    fig.savefig(hist_path, dpi=120)
    plt.close(fig)

    names = list(plan.layers)
    fig, ax = plt.subplots(figsize=(max(8, 0.18 * len(names)), 3.5))
    ax.bar(
        range(len(names)),
        [sum(lp.bits) / lp.out_features for lp in plan.layers.values()],
        color=[ROLE_COLORS.get(lp.role, "k") for lp in plan.layers.values()],
    )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.split(".", 2)[-1] for n in names], rotation=90, fontsize=5)
    ax.set_ylabel("average bits per row")
    fig.tight_layout()
    layer_path = directory / "layer_bits.png"
    fig.savefig(layer_path, dpi=120)
    plt.close(fig)
    return [hist_path, layer_path]
