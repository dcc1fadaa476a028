"""Where in the workspace a policy fails: closed-loop outcomes per seed against the cube's initial position.

    PYTHONPATH=src .venv/bin/python bench/success_map.py runs/bench_policy.json --out runs/success_map.png
    PYTHONPATH=src .venv/bin/python bench/success_map.py runs/eval.json runs/bench_policy/episodes/FP*.jsonl
                                  # qvla-eval --out reports and bench_policy's episode caches too

Reads bench_policy.py's --json (every row's per-seed outcomes) or qvla-eval's --out report, recomputes each seed's
cube position exactly as the rig samples it (`qvla_ros.sim.rig.sample_object_poses`), and prints success per
quartile of the cube's x and y range (Wilson 95% intervals), the share of failures that never touched the cube
(max reward 0, where the report has it), and a scatter plot of successes and failures over the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qvla_ros.policy.stats import wilson_interval  # noqa: E402
from qvla_ros.sim.rig import sample_object_poses  # noqa: E402

# gym-aloha's transfer-cube ranges (sample_box_pose): x in [0, 0.2], y in [0.4, 0.6] metres
RANGES = {"x": (0.0, 0.2), "y": (0.4, 0.6)}


def read_rows(path: Path) -> dict[str, dict[int, tuple[bool, int | None]]]:
    """{row name: {seed: (success, max reward or None)}} from a bench_policy JSON or a qvla-eval report."""
    if path.suffix == ".jsonl":  # a bench_policy episode cache (<work>/episodes/<row>.jsonl): one episode a line
        episodes = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {path.stem: {int(e["seed"]): (bool(e["success"]), e.get("max_reward")) for e in episodes}}
    data = json.loads(path.read_text())
    if "rows" in data:
        return {r["method"]: {int(s): (bool(v), None) for s, v in r["outcomes"].items()} for r in data["rows"]}
    if "episodes" in data:
        name = data.get("summary", {}).get("policy") or path.stem
        return {name: {int(e["seed"]): (bool(e["success"]), e.get("max_reward")) for e in data["episodes"]}}
    raise SystemExit(f"success_map: {path} is neither a bench_policy --json file nor a qvla-eval --out report")


def quartile_table(outcomes: dict[int, tuple[bool, int | None]]) -> list[str]:
    seeds = sorted(outcomes)
    pos = np.array([sample_object_poses("transfer_cube", s)[:2] for s in seeds])
    ok = np.array([outcomes[s][0] for s in seeds])
    lines = []
    for axis, i in (("x", 0), ("y", 1)):
        lo, hi = RANGES[axis]
        edges = np.linspace(lo, hi, 5)
        cells = []
        for k in range(4):
            m = (pos[:, i] >= edges[k]) & ((pos[:, i] < edges[k + 1]) | (k == 3))
            n, s = int(m.sum()), int(ok[m].sum())
            a, b = wilson_interval(s, n) if n else (float("nan"), float("nan"))
            cells.append(f"{edges[k]:.2f}-{edges[k + 1]:.2f}: {s}/{n} ({a:.0%}-{b:.0%})")
        lines.append(f"  cube {axis}: " + " | ".join(cells))
    rewards = [outcomes[s][1] for s in seeds if not outcomes[s][0] and outcomes[s][1] is not None]
    if rewards:
        lines.append(f"  failures that never touched the cube (max reward 0): {rewards.count(0)}/{len(rewards)}")
    return lines


def plot(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    for ax, (name, outcomes) in zip(axes[0], rows.items()):
        seeds = sorted(outcomes)
        pos = np.array([sample_object_poses("transfer_cube", s)[:2] for s in seeds])
        ok = np.array([outcomes[s][0] for s in seeds])
        ax.scatter(pos[ok, 0], pos[ok, 1], c="tab:green", s=14, label="success")
        ax.scatter(pos[~ok, 0], pos[~ok, 1], c="tab:red", marker="x", s=14, label="failure")
        ax.set_title(f"{name[:28]}: {ok.sum()}/{len(ok)}", fontsize=8)
        ax.set_xlim(*RANGES["x"])
        ax.set_ylim(*RANGES["y"])
        ax.set_xlabel("cube x (m)")
        ax.set_ylabel("cube y (m)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", type=Path, help="bench_policy --json files and/or qvla-eval --out reports")
    p.add_argument("--out", type=Path, help="scatter plot PNG (one panel per row)")
    args = p.parse_args(argv)
    rows = {}
    for path in args.reports:
        if not path.is_file():
            raise SystemExit(f"success_map: {path} does not exist")
        rows.update(read_rows(path))
    for name, outcomes in rows.items():
        s = sum(v[0] for v in outcomes.values())
        print(f"{name}: {s}/{len(outcomes)}")
        print("\n".join(quartile_table(outcomes)))
    if args.out:
        plot(rows, args.out)
        print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
