"""The calibration job on the user's own recordings: episodes -> sensitivities -> bit allocation -> packed artifact,
validated against full precision before it is handed over. No ROS here: the calibration node runs it in a child
process (`--spec`), and `qvla-calibrate` runs it from a shell.

    qvla-calibrate --policy models/sim_transfer_cube_fp --episodes data/my_task --budget 4 --out models/my_task_w4

Stages, in order, each reported with its progress and an estimate of the time left:
    reading     open every recording, skip the ones that cannot be used (each with its reason), draw samples
    sampling    the calibration samples -> model-input batches (the processor the robot uses)
    proxy       first-order sensitivity of every channel                    (qvla_quant, resumable per layer group)
    exact       exact Eq. 4 refinement of the top-ranked channels           (qvla_quant, resumable per layer)
    allocating  bits per row under the budget (greedy or Lagrangian)
    packing     the packed artifact + the policy's processor files (PolicyRuntime loads it as is)
    validating  teacher-forced action error of the artifact vs full precision on held-out episodes (never
                calibrated on), plots and a report

Interruption (cancel, SIGTERM, SIGKILL, a crash) leaves the output directory resumable: the same job again
continues from the sensitivity store (`<out>/sensitivity`, written per layer) after re-reading the recordings;
`<out>/calibration_state.json` says which inputs it belongs to, so a different job is refused rather than mixed in.
A budget below what the bit set and the pruning guard can reach is refused before anything runs, naming the
reachable range (`budget_range`).

Report (`<out>/report/`): report.json, report.txt and plots: bits_per_role.png (the paper's Fig. 1a view),
sensitivity_spread.png (spread of the channels' sensitivities within each layer, Fig. 1b), bit_histogram.png and
layer_bits.png, cumulative_error.png (teacher-forced action error accumulated over each held-out episode, Fig. 3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qvla_quant.files import is_artifact

STAGES = ("reading", "sampling", "proxy", "exact", "allocating", "packing", "validating")
# rough shares of the job's time (measured on the committed policy with small sample counts); used for the
# overall progress and the time estimate, which then follows the measured rate
STAGE_WEIGHTS = {
    "reading": 0.12,
    "sampling": 0.03,
    "proxy": 0.25,
    "exact": 0.35,
    "allocating": 0.05,
    "packing": 0.08,
    "validating": 0.12,
}
STATE_FILE = "calibration_state.json"
SENSITIVITY_DIR = "sensitivity"
REPORT_DIR = "report"
BIT_SET = (0, 2, 4, 8, 16)
# every row width the packed format stores (qvla_quant.quantizer.ROW_BITS, spelled out so that importing this module
# for the node does not import torch; tests/policy/test_loaders.py keeps the two equal)
ROW_BITS = (0, 2, 3, 4, 6, 8, 16)
SOLVERS = ("greedy", "lagrangian")
EXIT_OK, EXIT_ERROR, EXIT_VALIDATION, EXIT_CANCELLED = 0, 2, 3, 130


class JobError(ValueError):
    """The job cannot run or finish; the message names the input and what to do."""


class Cancelled(Exception):
    """The job was asked to stop; its output directory can be resumed."""


@dataclass
class JobSpec:
    """What to calibrate, on what, into where (see the module docstring)."""

    policy: str
    recordings: list[str]
    out: str
    budget: float
    bits: tuple[int, ...] = BIT_SET
    solver: str = "greedy"
    samples_per_episode: int = 4
    max_episodes: int = 16
    validation_episodes: int = 1
    validation_samples_per_episode: int = 8
    exact_fraction: float = 0.05
    rank_sample: int = 64
    max_pruned_fraction: float = 0.5
    seed: int = 0
    batch_size: int = 8
    skip_failed: bool = False
    max_action_mse: float = 0.0  # > 0: validation fails above this mean squared action error (joint units)

    def __post_init__(self):
        self.recordings = [str(r) for r in self.recordings]
        self.bits = tuple(sorted({int(b) for b in self.bits} | {16}))

    def check(self) -> None:
        """JobError naming the first invalid field (cheap checks: no model is loaded)."""
        if not isinstance(self.budget, (int, float)) or not math.isfinite(self.budget) or self.budget <= 0:
            raise JobError(f"budget must be a positive number of bits per weight (e.g. 4), got {self.budget!r}")
        bad = sorted(set(self.bits) - set(ROW_BITS))
        if bad:
            raise JobError(f"bit set {list(self.bits)}: {bad} not in {list(ROW_BITS)}")
        if len(self.bits) < 2:
            raise JobError(f"bit set {list(self.bits)} has nothing below 16 bits: add e.g. 4 or 8")
        if self.solver not in SOLVERS:
            raise JobError(f"solver {self.solver!r} is not one of {', '.join(SOLVERS)}")
        for name in ("samples_per_episode", "max_episodes", "validation_samples_per_episode", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise JobError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.validation_episodes) < 0:
            raise JobError(f"validation_episodes must be >= 0, got {self.validation_episodes}")
        if not 0.0 <= self.exact_fraction <= 1.0:
            raise JobError(f"exact_fraction must be in [0, 1], got {self.exact_fraction}")
        if not self.recordings:
            raise JobError("no recordings given: pass episode directories or a dataset directory holding episodes")
        if not self.policy:
            raise JobError("no policy given: the full-precision policy directory to calibrate")
        p = Path(self.policy)
        if not p.is_dir():
            raise JobError(f"policy {self.policy} does not exist (expected a full-precision policy directory)")
        if is_artifact(p):
            raise JobError(
                f"policy {self.policy} is already a quantized artifact: calibrate the full-precision "
                "policy it was made from"
            )
        if not self.out:
            raise JobError("no output directory given")
        out = Path(self.out)
        if out.resolve() == p.resolve():
            raise JobError(f"output {self.out} is the policy directory itself: choose a new directory")
        state = _read_state(out)
        if is_artifact(out) and (state is None or state.get("complete")):
            raise JobError(
                f"output {self.out} already holds a finished artifact: choose a new output directory "
                "(artifacts are never overwritten)"
            )
        if out.exists() and not out.is_dir():
            raise JobError(f"output {self.out} exists and is not a directory")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"] = list(self.bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise JobError(f"job spec: unknown field(s) {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------- recordings
def expand_recordings(paths) -> tuple[list[Path], list[tuple[str, str]]]:
    """Episode directories from paths that are episodes or datasets (directories of episodes, in name order);
    returns (episodes, skipped [(path, reason)])."""
    from qvla_ros.episodes.recorder import list_episodes

    episodes, skipped = [], []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            skipped.append((str(p), "does not exist"))
        elif p.is_file() and p.suffix == ".mcap":
            episodes.append(p.parent if (p.parent / "metadata.yaml").exists() else p)
        elif p.is_dir() and ((p / "metadata.yaml").exists() or any(p.glob("*.mcap"))):
            episodes.append(p)
        elif p.is_dir():
            found = list_episodes(p)
            if not found:
                skipped.append(
                    (str(p), "a directory without episodes (no metadata.yaml, .mcap or episode_* folders in it)")
                )
            episodes += found
        else:
            skipped.append((str(p), "not an episode (expected a rosbag2 directory or a dataset directory)"))
    seen, unique = set(), []
    for e in episodes:
        key = str(e.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return unique, skipped


# ---------------------------------------------------------------------------- the reachable budget range
def budget_range(
    policy: str | Path, bits=BIT_SET, max_pruned_fraction: float = 0.5, adapter=None
) -> tuple[float, float]:
    """(lowest, highest) average bits per weight a plan for this policy can have with this bit set and pruning
    guard, before any calibration (dead rows found by the calibration can lower the lowest one a little).
    adapter: the policy's qvla_quant adapter if already loaded."""
    import torch

    from qvla_quant.allocation import AllocationProblem
    from qvla_quant.config import AllocationConfig
    from qvla_quant.plan import LayerPlan
    from qvla_quant.roles import PlanTemplate
    from qvla_ros.policy.quantize import policy_adapter

    bits = tuple(sorted({int(b) for b in bits} | {16}))
    if adapter is None:
        _, adapter = policy_adapter(policy)
    template = PlanTemplate()
    items, fixed = [], {}
    for info in adapter.layers():
        rule, _ = template.explain(info.name, info.role)
        if rule == "skip":
            continue
        if rule == "auto":
            meta = info.desc()
            items.append((meta, torch.ones(info.out_features, len(bits), dtype=torch.float64)))
        else:
            fixed[info.name] = LayerPlan(
                info.name, info.role, info.kind, info.out_features, info.fan_in, [int(rule)] * info.out_features
            )
    config = AllocationConfig(bits=bits, max_pruned_fraction=max_pruned_fraction)
    problem = AllocationProblem.from_tables(
        items, bits, 16.0, config, fixed=fixed, dead_layers=set(adapter.known_dead_layers())
    )
    lowest = problem.total_bits(problem.lowest_bits()) / problem.n_weights
    highest = problem.total_bits(torch.full((len(problem.s),), 16, dtype=torch.int64)) / problem.n_weights
    return float(lowest), float(highest)


def check_budget(spec: JobSpec, adapter=None) -> tuple[float, float]:
    """JobError when the budget is below the reachable range (the message gives the range); returns the range."""
    lo, hi = budget_range(spec.policy, spec.bits, spec.max_pruned_fraction, adapter)
    if spec.budget < lo - 1e-9:
        raise JobError(
            f"budget {spec.budget:g} bits/weight cannot be met for {spec.policy} with bits {list(spec.bits)}: the "
            f"reachable range is {lo:.3f} .. {hi:.3f} bits/weight (max pruned fraction {spec.max_pruned_fraction:g})"
            "; raise the budget or add lower bit-widths"
        )
    return lo, hi


# ---------------------------------------------------------------------------- progress
class Progress:
    """Overall progress from per-stage fractions and weights; the time left from the rate measured so far."""

    def __init__(self, emit: Callable[[dict], None], cancel: threading.Event | None = None):
        self.emit = emit
        self.cancel = cancel
        self.t0 = time.monotonic()
        self.done: set[str] = set()
        self.stage = ""
        self.stage_t0 = self.t0
        self.times: dict[str, float] = {}
        self._last_emit = 0.0

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled")

    def begin(self, stage: str, detail: str = "") -> None:
        self.check_cancel()
        if self.stage and self.stage not in self.done:
            self.end()
        self.stage = stage
        self.stage_t0 = time.monotonic()
        self.update(0.0, detail, force=True)

    def end(self) -> None:
        if self.stage:
            self.times[self.stage] = self.times.get(self.stage, 0.0) + time.monotonic() - self.stage_t0
            self.done.add(self.stage)

    def overall(self, fraction: float) -> float:
        done = sum(STAGE_WEIGHTS[s] for s in self.done if s != self.stage)
        return min(1.0, done + STAGE_WEIGHTS.get(self.stage, 0.0) * min(max(fraction, 0.0), 1.0))

    def eta(self, fraction: float, p: float, now: float) -> float:
        """Seconds left: the current stage at its own measured rate, the stages after it at the job's measured time
        per unit of weight; -1 while there is too little to go on."""
        if p < 0.02:
            return -1.0
        per_weight = (now - self.t0) / p
        future = sum(w for s, w in STAGE_WEIGHTS.items() if s not in self.done and s != self.stage)
        stage_elapsed = now - self.stage_t0
        if fraction >= 0.05 and stage_elapsed > 1.0:
            current = stage_elapsed * (1.0 - fraction) / fraction
        else:
            current = per_weight * STAGE_WEIGHTS.get(self.stage, 0.0) * (1.0 - fraction)
        return max(0.0, current + per_weight * future)

    def update(self, fraction: float, detail: str = "", force: bool = False) -> None:
        self.check_cancel()
        now = time.monotonic()
        if not force and now - self._last_emit < 0.2 and fraction < 1.0:
            return  # at most 5 reports a second
        self._last_emit = now
        p = self.overall(fraction)
        elapsed = now - self.t0
        eta = self.eta(fraction, p, now)
        self.emit(
            {
                "event": "progress",
                "stage": self.stage,
                "progress": round(p, 4),
                "stage_progress": round(min(max(fraction, 0.0), 1.0), 4),
                "eta_s": round(eta, 1),
                "detail": detail,
                "elapsed_s": round(elapsed, 1),
            }
        )


# ---------------------------------------------------------------------------- state on disk
def _spec_key(spec: JobSpec, episodes: list[Path]) -> str:
    d = spec.to_dict()
    for k in ("out", "recordings", "max_action_mse"):
        d.pop(k)
    d["policy"] = str(Path(spec.policy).resolve())
    d["episodes"] = [str(e.resolve()) for e in episodes]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _read_state(out: Path) -> dict | None:
    f = out / STATE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_state(out: Path, state: dict) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    tmp.replace(out / STATE_FILE)


# ---------------------------------------------------------------------------- the job
@dataclass
class _Usable:
    path: Path
    n_samples: int
    calib: list = field(default_factory=list)  # (index, Observation)
    valid: list = field(default_factory=list)  # (index, Observation, recorded actions [H, 14])


def _pick(n: int, k: int, rng) -> np.ndarray:
    k = min(k, n)
    offset = int(rng.integers(0, max(1, n // k)))
    return np.linspace(offset, n - 1, k).astype(int)


def _read_recordings(spec: JobSpec, episodes: list[Path], processor, progress: Progress, skipped: list):
    from qvla_ros.episodes.reader import EpisodeError, read_episode
    from qvla_ros.policy.types import Observation

    cfg = processor.config
    want = spec.max_episodes + spec.validation_episodes
    usable: list[_Usable] = []
    for i, path in enumerate(episodes):
        progress.update(i / max(1, len(episodes)), f"{path.name} ({len(usable)} usable so far)")
        if len(usable) >= want:
            skipped.append(
                (
                    str(path),
                    f"not needed (max_episodes {spec.max_episodes} + validation_episodes "
                    f"{spec.validation_episodes} already usable)",
                )
            )
            continue
        try:
            ep = read_episode(path, horizon=cfg.chunk_size)
        except EpisodeError as e:
            skipped.append((str(path), " ".join(str(e).split())))
            continue
        except Exception as e:  # anything else a damaged file can raise: skip it, say what
            skipped.append((str(path), f"unreadable ({type(e).__name__}: {' '.join(str(e).split())})"))
            continue
        missing = [c for c in cfg.camera_names if c not in ep.camera_names]
        if missing:
            skipped.append(
                (
                    str(path),
                    f"camera(s) {missing} missing (episode has {list(ep.camera_names)}, the "
                    f"policy needs {list(cfg.camera_names)})",
                )
            )
            continue
        if list(ep.joint_names) != list(cfg.joint_names):
            skipped.append(
                (str(path), f"joint names {list(ep.joint_names)} differ from the policy's {list(cfg.joint_names)}")
            )
            continue
        if spec.skip_failed and ep.success is False:
            skipped.append((str(path), "the demonstration is marked failed (skip_failed)"))
            continue
        if len(ep.samples) < 2:
            skipped.append((str(path), f"too short ({len(ep.samples)} aligned sample)"))
            continue
        rng = np.random.default_rng(spec.seed + 7919 * len(usable))

        def obs(s):
            return Observation(
                images={c: s.images[c] for c in cfg.camera_names},
                state=s.state,
                instruction=s.instruction,
                stamp=s.timestamp,
            )

        u = _Usable(path, len(ep.samples))
        u.calib = [(int(j), obs(ep.samples[j])) for j in _pick(len(ep.samples), spec.samples_per_episode, rng)]
        idx = np.linspace(0, len(ep.samples) - 1, min(spec.validation_samples_per_episode, len(ep.samples)))
        u.valid = [(int(j), obs(ep.samples[int(j)]), ep.samples[int(j)].actions) for j in idx.astype(int)]
        usable.append(u)
        del ep
    progress.update(1.0, f"{len(usable)} usable of {len(episodes)}")
    return usable


def run_job(spec: JobSpec, emit: Callable[[dict], None] | None = None, cancel: threading.Event | None = None) -> dict:
    """Run the whole job (module docstring); returns the result dict. Raises JobError, Cancelled."""
    emit = emit or (lambda e: None)
    spec.check()
    progress = Progress(emit, cancel)
    out = Path(spec.out)
    episodes, skipped = expand_recordings(spec.recordings)
    if not episodes:
        raise JobError("no usable recording: " + "; ".join(f"{p}: {r}" for p, r in skipped))
    key = _spec_key(spec, episodes)
    state = _read_state(out)
    resumed = False
    if state is not None:
        if state.get("key") != key:
            raise JobError(
                f"output {out} holds an unfinished calibration of other inputs (policy, recordings or "
                "settings differ): choose a new output directory, or delete it to start over"
            )
        resumed = True
    elif out.exists() and any(out.iterdir()):
        raise JobError(
            f"output {out} exists and is not empty (and holds no calibration to resume): choose a new output directory"
        )
    from qvla_ros.policy.quantize import policy_adapter

    progress.begin("reading", f"loading {spec.policy}")  # the policy's loading counts as reading
    processor, adapter = policy_adapter(spec.policy)
    lo, hi = check_budget(spec, adapter)
    stages_before = list((state or {}).get("stages_done", []))
    emit(
        {
            "event": "started",
            "out": str(out),
            "resumed": resumed,
            "stages_done_before": stages_before,
            "budget_range": [lo, hi],
            "episodes": len(episodes),
        }
    )

    from qvla_quant.allocation import BudgetError, allocate_plan
    from qvla_quant.config import AllocationConfig, CalibrationConfig
    from qvla_quant.sensitivity import calibrate_sensitivity
    from qvla_ros.policy.quantize import write_quantized_policy

    # ---- reading
    progress.update(0.0, f"{len(episodes)} recording(s)", force=True)
    usable = _read_recordings(spec, episodes, processor, progress, skipped)
    for p, r in skipped:
        emit({"event": "skipped", "path": p, "reason": r})
    if not usable:
        raise JobError("no usable recording left: " + "; ".join(f"{p}: {r}" for p, r in skipped))
    # from here on there is work worth resuming: the output directory and its state
    out.mkdir(parents=True, exist_ok=True)
    state = state or {"key": key, "spec": spec.to_dict(), "runs": 0, "stages_done": []}
    state["runs"] = int(state.get("runs", 0)) + 1
    state["complete"] = False
    _write_state(out, state)
    if len(usable) == 1 or spec.validation_episodes == 0:
        calib_eps, valid_eps = usable, usable[-1:]
        held_out = False
    else:
        n_valid = min(spec.validation_episodes, len(usable) - 1)
        calib_eps, valid_eps = usable[:-n_valid][: spec.max_episodes], usable[-n_valid:]
        held_out = True

    # ---- sampling
    progress.begin("sampling")
    obs = [o for u in calib_eps for _, o in u.calib]
    sources = [(u.path.name, j) for u in calib_eps for j, _ in u.calib]
    batches = []
    for i in range(0, len(obs), spec.batch_size):
        batches.append(processor.batch(obs[i : i + spec.batch_size]))
        progress.update((i + spec.batch_size) / len(obs), f"{min(i + spec.batch_size, len(obs))}/{len(obs)} samples")

    # ---- proxy, exact
    cfg = CalibrationConfig(
        bits=spec.bits,
        exact_fraction=spec.exact_fraction,
        rank_sample=spec.rank_sample,
        seed=spec.seed,
        store_dir=str(out / SENSITIVITY_DIR),
        progress=False,
    )
    stage_of = {"proxy": "proxy", "exact": "exact"}

    def on_progress(stage: str, done: int, total: int) -> None:
        if progress.stage != stage_of[stage]:
            progress.begin(stage_of[stage])
        progress.update(done / max(1, total), f"{done}/{total} {'batches' if stage == 'proxy' else 'passes'}")

    progress.begin("proxy", "first-order sensitivity of every channel" + (" (resuming)" if resumed else ""))
    try:
        sens = calibrate_sensitivity(adapter, batches, cfg, on_progress=on_progress)
    except ValueError as e:
        if "sensitivity store" in str(e):
            raise JobError(f"{e} (output {out})") from None
        raise
    if progress.stage == "proxy":  # a resumed run whose proxy and exact stages were both on disk already
        progress.begin("exact")
    progress.update(1.0, "sensitivities complete")
    state["stages_done"] = sorted(set(state["stages_done"]) | {"proxy", "exact"})
    _write_state(out, state)

    # ---- allocating
    progress.begin("allocating", f"budget {spec.budget:g} bits/weight, {spec.solver}")
    try:
        plan = allocate_plan(
            sens,
            spec.budget,
            AllocationConfig(bits=spec.bits, solver=spec.solver, max_pruned_fraction=spec.max_pruned_fraction),
        )
    except BudgetError as e:
        raise JobError(f"{e} (policy {spec.policy})") from None
    progress.update(1.0, f"{plan.average_bits():.3f} bits/weight")

    # ---- packing
    progress.begin("packing", str(out))
    calib_info = {
        "samples": len(sources),
        "episodes": sorted({n for n, _ in sources}),
        "sources": sources,
        "config": cfg.to_dict(),
        "job": spec.to_dict(),
        "held_out": [str(u.path) for u in valid_eps],
    }
    write_quantized_policy(spec.policy, plan, out, extra={"calibration": calib_info}, plots_of=None)
    progress.update(1.0, "artifact written")
    state["stages_done"] = sorted(set(state["stages_done"]) | {"allocating", "packing"})
    _write_state(out, state)

    # ---- validating
    progress.begin("validating", f"{sum(len(u.valid) for u in valid_eps)} held-out samples")
    validation = validate_artifact(spec.policy, out, valid_eps, progress, held_out, spec.batch_size)
    report_dir = out / REPORT_DIR
    plots = write_plots(plan, sens, validation, report_dir / "plots")
    progress.update(1.0, "report written")
    progress.end()

    from qvla_quant.artifact import artifact_summary
    from qvla_quant.report import format_table, summary_rows

    summary = artifact_summary(out)
    n_weights = sum(lp.n_weights for lp in plan.layers.values())
    with_overhead = 8.0 * summary["quantized_weight_bytes_after"] / max(1, n_weights)
    dtype = next(p for p in adapter.model.parameters() if p.is_floating_point()).dtype
    table = format_table(summary_rows(plan, dtype))
    passed = not (spec.max_action_mse > 0 and validation["action_mse"] > spec.max_action_mse)
    result = {
        "artifact_path": str(out),
        "budget": spec.budget,
        "budget_range": [lo, hi],
        "average_bits": plan.average_bits(),
        "average_bits_with_overhead": with_overhead,
        "pruned_fraction": plan.pruned_fraction(),
        "summary": table,
        "validation": validation,
        "validation_text": validation_text(validation, spec.max_action_mse),
        "action_mse": validation["action_mse"],
        "passed": passed,
        "report_path": str(report_dir),
        "plots": [str(p) for p in plots],
        "skipped": [f"{p}: {r}" for p, r in skipped],
        "resumed": resumed,
        "stages_done_before": stages_before,
        "stage_times_s": {k: round(v, 3) for k, v in progress.times.items()},
        "calibration_samples": len(sources),
        "calibration_episodes": [str(u.path) for u in calib_eps],
        "sensitivity_report": {
            k: sens.report.get(k)
            for k in ("n_channels", "n_layers", "n_samples", "n_exact_top", "dead_layers", "time_s", "rank_correlation")
        },
        "weight_bytes": summary.get("parameter_bytes_after"),
        "fp_weight_bytes": summary.get("parameter_bytes_before"),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(result, indent=1, default=str))
    (report_dir / "report.txt").write_text(format_report(result))
    state["stages_done"] = list(STAGES)
    state["complete"] = True
    state["result"] = {k: result[k] for k in ("artifact_path", "average_bits", "action_mse", "passed")}
    _write_state(out, state)
    return result


# ---------------------------------------------------------------------------- validation
def validate_artifact(
    policy,
    artifact,
    episodes: list[_Usable],
    progress: Progress | None = None,
    held_out: bool = True,
    batch_size: int = 8,
) -> dict:
    """Teacher-forced action error of `artifact` vs the full-precision `policy` on the episodes' validation
    samples (the recorded observations, both policies with the same fixed noise). Per sample: the mean squared
    error over the chunk (joint units) and the L2 norm of the chunk difference (Eq. 4 for one prediction); per
    episode: its sum over the samples in time order (Eq. 5, teacher-forced)."""
    from qvla_ros.policy.runtime import PolicyRuntime

    fp = PolicyRuntime.load(policy, warmup=False)
    q = PolicyRuntime.load(artifact, warmup=False)
    total = sum(len(u.valid) for u in episodes)
    done = 0
    per_episode = []
    all_mse, all_l2, fp_mse_to_recorded = [], [], []
    for u in episodes:
        obs = [o for _, o, _ in u.valid]
        recorded = np.stack([a for _, _, a in u.valid])
        a_fp, a_q = [], []
        for i in range(0, len(obs), batch_size):
            part = obs[i : i + batch_size]
            a_fp.append(fp.processor.actions_from_model(fp.sample_model_actions(fp.model_inputs(part))))
            a_q.append(q.processor.actions_from_model(q.sample_model_actions(q.model_inputs(part))))
            done += len(part)
            if progress is not None:
                progress.update(done / max(1, total), f"{done}/{total} held-out samples")
        a_fp, a_q = np.concatenate(a_fp), np.concatenate(a_q)
        d = (a_q - a_fp).reshape(len(obs), -1)
        mse = (d**2).mean(1)
        l2 = np.linalg.norm(d, axis=1)
        h = min(a_fp.shape[1], recorded.shape[1])
        fp_err = ((a_fp[:, :h] - recorded[:, :h]) ** 2).reshape(len(obs), -1).mean(1)
        all_mse.append(mse)
        all_l2.append(l2)
        fp_mse_to_recorded.append(fp_err)
        per_episode.append(
            {
                "episode": str(u.path),
                "samples": [j for j, _, _ in u.valid],
                "mse": mse.tolist(),
                "l2": l2.tolist(),
                "cumulative_l2": np.cumsum(l2).tolist(),
                "mean_mse": float(mse.mean()),
            }
        )
    mse = np.concatenate(all_mse)
    l2 = np.concatenate(all_l2)
    return {
        "held_out": held_out,
        "episodes": len(episodes),
        "samples": int(mse.size),
        "action_mse": float(mse.mean()),
        "action_mse_max": float(mse.max()),
        "action_rmse": float(np.sqrt(mse.mean())),
        "chunk_l2_mean": float(l2.mean()),
        "cumulative_l2_mean": float(np.mean([e["cumulative_l2"][-1] for e in per_episode])),
        "fp_mse_to_recorded": float(np.concatenate(fp_mse_to_recorded).mean()),
        "fp_model": fp.model_id,
        "quantized_model": q.model_id,
        "per_episode": per_episode,
    }


def validation_text(v: dict, threshold: float = 0.0) -> str:
    where = "held-out" if v["held_out"] else "NOT held out (only one usable recording)"
    gate = ""
    if threshold > 0:
        gate = (
            f"; {'PASSED' if v['action_mse'] <= threshold else 'FAILED'} the limit {threshold:g} "
            "(calibration.max_action_mse)"
        )
    return (
        f"teacher-forced action error vs full precision on {v['samples']} samples of {v['episodes']} {where} "
        f"episode(s): MSE {v['action_mse']:.3g} (max {v['action_mse_max']:.3g}, RMSE {v['action_rmse']:.3g} "
        f"rad), chunk L2 {v['chunk_l2_mean']:.3g}, cumulative over an episode {v['cumulative_l2_mean']:.3g}; "
        f"FP vs the recorded commands: MSE {v['fp_mse_to_recorded']:.3g}" + gate
    )


def format_report(r: dict) -> str:
    lines = [
        f"artifact  {r['artifact_path']}",
        f"budget    {r['budget']:g} bits/weight (reachable {r['budget_range'][0]:.3f} .. {r['budget_range'][1]:.3f})",
        f"average   {r['average_bits']:.4f} bits/weight, {r['average_bits_with_overhead']:.4f} with the per-row "
        f"scale/zero; pruned {100 * r['pruned_fraction']:.2f}% of the rows' weights",
        f"data      {r['calibration_samples']} calibration samples from {len(r['calibration_episodes'])} episode(s)"
        + (" (resumed an interrupted run)" if r["resumed"] else ""),
        "",
        r["summary"],
        "",
        "validation: " + r["validation_text"],
        "",
        "stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_times_s"].items()),
    ]
    if r["skipped"]:
        lines += ["", "skipped recordings:"] + [f"  {s}" for s in r["skipped"]]
    lines += ["", "plots: " + ", ".join(Path(p).name for p in r["plots"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def write_plots(plan, sens, validation: dict, directory) -> list[Path]:
    """The report's plots (module docstring); the bit histogram and per-layer bits come from qvla_quant.cli."""
    from qvla_quant.report import ROLE_COLORS, plot_plan, pyplot

    plt = pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = list(plot_plan(plan, directory))

    # bits per role (Fig. 1a): average bits and pruned share of each role's weights
    roles = plan.roles()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(roles, [plan.average_bits(r) for r in roles], color=[ROLE_COLORS.get(r, "k") for r in roles])
    for i, r in enumerate(roles):
        ax.text(
            i,
            plan.average_bits(r),
            f"{plan.average_bits(r):.2f}\n{100 * plan.pruned_fraction(r):.0f}% pruned",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.axhline(plan.budget, color="k", ls="--", lw=0.8, label=f"budget {plan.budget:g}")
    ax.set_ylabel("average bits per weight")
    ax.set_title("bits per role")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(directory / "bits_per_role.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # sensitivity spread within layers (Fig. 1b): the channels' log10 sensitivity at the lowest quantized bit
    qbits = [b for b in sens.bits if 0 < b < 16] or [b for b in sens.bits if b < 16]
    b = qbits[0]
    col = sens.bit_index(b)
    names = [n for n in sens.layers if n not in sens.dead_layers]
    data = []
    for n in names:
        v = sens.values(n)[:, col]
        v = v[v > 0]
        data.append(v.log10().numpy() if len(v) else np.zeros(1))
    fig, ax = plt.subplots(figsize=(max(8, 0.2 * len(names)), 3.5))
    if data:
        parts = ax.boxplot(data, showfliers=True, flierprops={"markersize": 1.5}, patch_artist=True)
        for patch, n in zip(parts["boxes"], names):
            patch.set_facecolor(ROLE_COLORS.get(sens.layers[n].role, "k"))
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([n.split(".", 2)[-1] for n in names], rotation=90, fontsize=5)
    ax.set_ylabel(f"log10 sensitivity ({b} bit)")
    ax.set_title(f"spread of channel sensitivities within each layer ({len(sens.dead_layers)} dead layers left out)")
    fig.tight_layout()
    paths.append(directory / "sensitivity_spread.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # cumulative error over the held-out episodes (Fig. 3)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for e in validation["per_episode"]:
        ax.plot(e["samples"], e["cumulative_l2"], marker=".", label=Path(e["episode"]).name)
    ax.set_xlabel("sample (30 Hz step) in the episode")
    ax.set_ylabel("cumulative action L2 vs FP")
    ax.set_title("teacher-forced cumulative action error")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(directory / "cumulative_error.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------- command line
def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be a comma-separated list from {ROW_BITS}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qvla-calibrate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Stages: " + ", ".join(STAGES) + ". Exit codes: 0 done, 2 error, 3 validation "
        "failed (--max-action-mse), 130 interrupted (run again to resume).",
    )
    p.add_argument("--spec", type=Path, help="a JSON job spec (what the calibration node writes); prints JSON lines")
    p.add_argument("--policy", help="full-precision policy directory")
    p.add_argument("--episodes", nargs="+", help="episode directories or dataset directories of episodes")
    p.add_argument("--budget", type=float, help="average bits per weight, e.g. 4")
    p.add_argument("--out", help="artifact directory to write (an interrupted one is resumed)")
    p.add_argument("--bits", type=_bits, default=BIT_SET, help="candidate bit-widths per channel (default 0,2,4,8,16)")
    p.add_argument("--solver", choices=SOLVERS, default="greedy")
    p.add_argument("--samples-per-episode", type=int, default=4)
    p.add_argument("--max-episodes", type=int, default=16)
    p.add_argument("--validation-episodes", type=int, default=1, help="episodes held out for validation")
    p.add_argument("--validation-samples-per-episode", type=int, default=8)
    p.add_argument("--exact-fraction", type=float, default=0.05)
    p.add_argument("--rank-sample", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-failed", action="store_true", help="skip episodes marked failed")
    p.add_argument("--max-action-mse", type=float, default=0.0, help="fail validation above this MSE (0: no limit)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="progress and result as JSON lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    json_lines = args.json or args.spec is not None

    def emit(event: dict) -> None:
        if json_lines:
            print(json.dumps(event, default=str), flush=True)
        elif event["event"] == "progress":
            eta = f", {event['eta_s']:.0f} s left" if event["eta_s"] >= 0 else ""
            print(f"[{100 * event['progress']:5.1f}%] {event['stage']:<10} {event['detail']}{eta}", flush=True)
        elif event["event"] == "skipped":
            print(f"skipped {event['path']}: {event['reason']}", flush=True)
        elif event["event"] == "started" and event["resumed"]:
            print(f"resuming the interrupted calibration in {event['out']}", flush=True)

    cancel = threading.Event()

    def on_signal(signum, frame):
        cancel.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.spec is not None:
            spec = JobSpec.from_dict(json.loads(args.spec.read_text()))
        else:
            missing = [f"--{n}" for n in ("policy", "episodes", "budget", "out") if getattr(args, n) is None]
            if missing:
                raise JobError(f"missing {', '.join(missing)} (or give --spec FILE)")
            spec = JobSpec(
                policy=args.policy,
                recordings=args.episodes,
                out=args.out,
                budget=args.budget,
                bits=args.bits,
                solver=args.solver,
                samples_per_episode=args.samples_per_episode,
                max_episodes=args.max_episodes,
                validation_episodes=args.validation_episodes,
                validation_samples_per_episode=args.validation_samples_per_episode,
                exact_fraction=args.exact_fraction,
                rank_sample=args.rank_sample,
                seed=args.seed,
                skip_failed=args.skip_failed,
                max_action_mse=args.max_action_mse,
            )
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = run_job(spec, emit, cancel)
    except Cancelled:
        emit(
            {
                "event": "cancelled",
                "message": f"interrupted; run the same job again to resume from {args.out or ''}".rstrip(),
            }
        )
        if not json_lines:
            print("qvla-calibrate: interrupted (the same command resumes it)", file=sys.stderr)
        return EXIT_CANCELLED
    except (JobError, OSError, ValueError, KeyError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        emit({"event": "error", "message": message})
        if not json_lines:
            print(f"qvla-calibrate: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    emit({"event": "result", "result": result})
    if not json_lines:
        print(format_report(result))
    return EXIT_OK if result["passed"] else EXIT_VALIDATION


if __name__ == "__main__":
    sys.exit(main())
