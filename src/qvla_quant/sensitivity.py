"""Action-space sensitivity of every output channel (the paper's Sec. 3.2-3.3.1): how far the policy's actions move
when one output channel (row) of one layer is quantized to b bits. `calibrate_sensitivity` measures it for every
calibrated channel at every bit-width; `qvla_quant.allocation` turns the table into bits per row. The table and its
resumable on-disk store are plain data in `qvla_quant.sensitivity_store`.

A run (`calibrate_sensitivity`), step by step:
  1. prepare the calibration batches and pick the layers the template marks "auto";
  2. open the run record: a fresh one, or the store of an interrupted run with the same policy, data and settings,
     resumed at its first unfinished layer;
  3. proxy stage (Eq. 6): a first-order estimate for every channel and bit, layers in groups bounded by weight count
     (method "exact" has none and only looks for dead layers);
  4. choose the exact jobs: the proxy's global top channels per bit and a random sample (method "exact": all);
  5. exact stage (Eq. 4): forward passes that measure the chosen rows at every bit;
  6. fit the proxy's per-bit scale on the random sample, write the report, store the complete result.
The file reads in that order: the configuration; the run and its steps (with the choice of exact jobs, the scale fit
and the report); then the measurements they call: calibration data, layer algebra, proxy, exact, cumulative.

Notation: layer l, output channel (row) c, bit-width b; dW_c = Q_b(W_c) - W_c is the row's quantization error
(`qvla_quant.quantizer.row_quantization_error`, the same quantizer the runtime packs with), and the channel's output
error on an input x is dX_c = x . dW_c (for a conv: the filter's response to dW_c, at every position).

Row choices: with `CalibrationConfig.group_size` g, every calibrated width b in GROUPED_BITS is also measured as
its grouped variant "bg" (one scale and zero point per g weights along K: dW_c = `row_choice_error(W, "bg")`), in
extra columns after the per-row ones (`qvla_quant.sensitivity_store.column_choices`), by the same proxy and exact
machinery: below, "bit" stands for any such column. A layer whose rows fit in one group (K <= g) has grouped
variants equal to its per-row rows: they are computed and measured once and their columns copied.

Exact (Eq. 4)   s_{l,c}^(b) = E_x || A(x; W with row c quantized) - A(x; W) ||^2, averaged over every calibration
                sample (the action chunk [H, D] flattened). No weight is copied: a forward hook adds dX_c to the
                layer's output. k channels share one forward pass by replicating the batch k times and adding
                channel i's error to replica i only (`PolicyAdapter.repeat_batch`; replicas are contiguous blocks
                of the leading dimension). The reference actions are computed at the same replicated batch size,
                so a perturbation that changes nothing gives exactly 0. Layers downstream of the adapter's
                prefix (`PolicyAdapter.downstream_of_prefix`; π0: the action expert, which reads the VLM only
                through its KV cache) reuse that prefix (`prefix_cache`, computed once per batch and replica count
                with the unperturbed weights, at the replicated size, so the numbers are bit for bit those of a
                full pass) and rerun only what follows it (π0: the denoising loop); `prefix_cache=False` reruns
                everything.
Proxy (Eq. 6)   "gain":    ||J||_F^2 * ||dX_c||^2, J = dA/dX_c the Jacobian of the action w.r.t. the channel's
                           whole output (every token, every call: π0's expert runs once per denoising step), i.e. the
                           paper's gain-times-error with the Frobenius norm, per sample, then averaged.
                "aligned": ||J dX_c||^2 = sum_d (g_d . dX_c)^2, the first-order (linearized) value of Eq. 4 itself:
                           it keeps the alignment between the gradient and the error that the gain drops.
                Both come from the same backward passes: one per action dimension when the chunk has at most
                `max_exact_dims` dims (exact), otherwise `n_probes` seeded Rademacher projections v
                (E[(v.J dX)^2] = ||J dX||^2, E||J^T v||^2 = ||J||_F^2: unbiased).
Two-stage       the proxy ranks every channel; exact passes refine the globally top-ranked `exact_fraction` of
                channels per bit-width (the paper's "limited number of full forward passes ... targeting the most
                important channels"), plus `rank_sample` random (channel, bit) pairs that measure how well each
                proxy ranks channels (Spearman). A refined channel is measured exactly at every bit (its whole row:
                one pass batches channels, so the extra bits are cheap), so that every row of the table is
                consistent: all exact, or all proxy times a per-bit scale. That scale (median exact/proxy ratio per
                bit) is fitted on the rows of the random sample only: the top picks are the channels the proxy
                over-ranks most, so a fit on them would be biased low. Consistent rows keep the allocation's
                rho = (s^lo - s^hi) / (hi - lo) a difference of like with like.
Cumulative (Eq. 5)  S = E_episode sum_t ||dA_t|| over recorded episodes (teacher forcing: the recorded
                observations, not a closed-loop rollout), for validating rankings; `cumulative_sensitivity`.

Dead layers: a layer whose output gradient is exactly zero for every calibration sample (or never arrives), plus the
adapter's structurally known ones (π0: the last VLM layer's q/o/MLP). Their sensitivities are exactly 0 for every
bit, they are listed in `Sensitivity.dead_layers`, never measured exactly, and the allocation prunes them first
(`qvla_quant.allocation`).

Calibration inputs are evaluated with floating-point activations (Eq. 4 is about weights; A8 is applied uniformly
at run time and is not part of the per-channel choice).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qvla_quant.adapters.base import Batch, LayerInfo, PolicyAdapter, output_gradients
from qvla_quant.config import CalibrationConfig, WeightQuantConfig
from qvla_quant.fingerprint import model_fingerprint
from qvla_quant.quantizer import KEEP_BITS, RowChoice, n_groups, row_choice_error
from qvla_quant.quantizer import row_quantization_error as row_quantization_error  # its users import it from here
from qvla_quant.roles import PlanTemplate
from qvla_quant.sensitivity_store import (
    LayerSensitivity,
    Sensitivity,
    SensitivityStore,
    column_choices,
    grouped_index_entries,
    proxy_scale_key,
    store_format_version,
)


class CalibrationError(RuntimeError):
    """The policy violates an assumption of the sensitivity computation (message says which, and what to do)."""


# ---------------------------------------------------------------------------------------------------------------
# The calibration run
def calibrate_sensitivity(
    adapter: PolicyAdapter, batches: Iterable[Batch], config: CalibrationConfig, *, on_progress=None
) -> Sensitivity:
    """The whole calibration (the steps of the module docstring); `qvla_quant.calibrate` is the public entry point.

    on_progress(stage, done, total): called as the work advances, stage "proxy" (batches of every proxy group)
    or "exact" (forward passes of every layer still to measure); it may raise to stop the run, which then resumes
    from the store (`store_dir`) like any interrupted one."""
    started = time.perf_counter()
    batches = list(batches)
    data = _prepare(adapter, batches, config.seed)
    auto, others = _split_by_template(adapter.layers(), config.template)
    record = _RunRecord.open(config.store_dir, _new_index(adapter, batches, config, auto, others), auto)
    errors: dict[str, torch.Tensor] = {}  # dW per layer: the proxy stage computes them, the exact stage reuses them
    if config.method == "exact":
        _find_dead_layers(adapter, data, auto, config, record)
    else:
        _proxy_stage(adapter, data, auto, config, record, errors, on_progress)
    top, sample = _choose_exact_jobs(auto, record.results, config)
    measure = _whole_rows(top, sample, len(_quantized_columns(config)))
    _exact_stage(adapter, data, auto, measure, config, record, errors, on_progress)
    sens = _result(config, record, data, others, top, sample, measure, started)
    record.finish(sens)
    return sens


def _split_by_template(layers: Sequence[LayerInfo], template: PlanTemplate) -> tuple[list[LayerInfo], dict]:
    """The layers to calibrate (rule "auto"), and the others by name with their shape and rule: recorded so that an
    allocation can fix them at some bits or tell that they were never measured."""
    auto, others = [], {}
    for info in layers:
        rule, why = template.explain(info.name, info.role)
        if rule == "auto":
            auto.append(info)
        else:
            others[info.name] = {**info.desc_dict(), "rule": rule, "why": why}
    if not auto:
        raise ValueError("calibrate: no layer has rule 'auto' in the template; nothing to measure")
    return auto, others


def _new_index(
    adapter: PolicyAdapter, batches: Sequence[Batch], config: CalibrationConfig, auto: Sequence[LayerInfo], others
) -> dict:
    """The progress index of a fresh run (the store's index.json until the run is complete): what a resumed run must
    match (`_RESUME_KEYS`), every calibrated layer's metadata and file, nothing done yet."""
    known_dead = set(adapter.known_dead_layers())
    index = {
        "format_version": store_format_version(config.group_size),
        "complete": False,
        "bits": list(config.bits),
        **grouped_index_entries(config.bits, config.group_size),
        "proxy": config.proxy,
        "config": config.result_key(),
        "fingerprint": dict(model_fingerprint(adapter.model)),
        "data": data_fingerprint(batches),
        "adapter": adapter.config_dict(),
        "other_layers": others,
        "layers": SensitivityStore.layer_entries([info.name for info in auto]),
        "times": {"proxy_s": 0.0, "exact_s": 0.0},
    }
    for info in auto:
        index["layers"][info.name].update(
            role=info.role, kind=info.kind, out_features=info.out_features, fan_in=info.fan_in,
            dead=info.name in known_dead, proxy_done=False, exact_done=False,
        )  # fmt: skip
    return index


_RESUME_KEYS = ("bits", "config", "fingerprint", "data", "layers")  # a stored run must match these to be resumed


class _RunRecord:
    """What a run has measured so far (`results`, layer name -> LayerSensitivity) and its progress index.

    The one owner of the index: every change goes through its methods, and with a store it is the one writer,
    storing a layer's file and then the index each time a stage of a layer is done, so that an interruption loses
    at most the layer in progress. Without a store the index lives in memory only (the result still reads the
    fingerprints and timings from it)."""

    def __init__(self, store: SensitivityStore | None, index: dict, results: dict[str, LayerSensitivity]):
        self.store = store
        self.index = index
        self.results = results

    @classmethod
    def open(cls, store_dir: str | None, header: dict, auto: Sequence[LayerInfo]) -> _RunRecord:
        """A fresh record whose index is `header` (written at once to a new store), or, when `store_dir` holds a
        run, that run's record with its finished layers read back; refused when it was written for another policy,
        other data or other settings (`_RESUME_KEYS`)."""
        results = {
            info.name: LayerSensitivity(info.name, info.role, info.kind, info.out_features, info.fan_in)
            for info in auto
        }
        store = SensitivityStore(store_dir) if store_dir else None
        if store is None or not store.exists():
            record = cls(store, header, results)
            record._write_index()
            return record
        index = store.read_index()
        for key in _RESUME_KEYS:
            old, new = index.get(key), header.get(key)
            if key == "layers":  # the same layers in the same files; their progress differs, of course
                old = {n: m["file"] for n, m in (old or {}).items()}
                new = {n: m["file"] for n, m in new.items()}
            if old != new:
                what = {"fingerprint": "model", "data": "calibration data"}.get(key, key)
                raise ValueError(
                    f"the sensitivity store {str(store.directory)!r} was written for a different {key} ({what}); "
                    "resume only with the same policy, data and settings, or give a new store directory"
                )
        for name in results:
            if index["layers"][name].get("proxy_done") or index["layers"][name].get("exact_done"):
                results[name] = store.read_layer(index, name)
        return cls(store, index, results)

    def proxy_done(self, name: str) -> bool:
        return bool(self.index["layers"][name].get("proxy_done"))

    def exact_done(self, name: str) -> bool:
        return bool(self.index["layers"][name].get("exact_done"))

    @property
    def probes(self) -> str:
        """How the proxy's Jacobian was probed ("exact", "random(n)"; "none" before any proxy group ran)."""
        return self.index.get("probes", "none")

    @probes.setter
    def probes(self, kind: str) -> None:
        self.index["probes"] = kind

    def add_time(self, stage: str, seconds: float) -> None:
        """Time spent in `stage` ("proxy" or "exact"), summed over every run that worked on this record."""
        self.index["times"][f"{stage}_s"] += seconds

    def layer_done(self, name: str, stage: str) -> None:
        """Stage `stage` ("proxy" or "exact") of layer `name` is done: flag it, and store the layer, then the index."""
        entry = self.index["layers"][name]
        entry[f"{stage}_done"] = True
        entry["dead"] = self.results[name].dead
        if self.store is not None:
            self.store.write_layer(self.index, self.results[name])
            self._write_index()

    def finish(self, sens: Sensitivity) -> None:
        """Rewrite the store complete (`SensitivityStore.write_all`): the form `Sensitivity.load` reads."""
        if self.store is not None:
            self.store.write_all(sens)

    def _write_index(self) -> None:
        if self.store is not None:
            self.store.write_index(self.index)


class _Steps:
    """Counts the steps of one stage for `on_progress(stage, done, total)`; call it (no argument) after each."""

    def __init__(self, stage: str, total: int, on_progress):
        self.stage = stage
        self.total = total
        self.done = 0
        self.on_progress = on_progress

    def __call__(self) -> None:
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.stage, self.done, self.total)


def _proxy_groups(layers: Sequence[LayerInfo], max_weights: int) -> list[list[LayerInfo]]:
    """Consecutive layers in groups of at most `max_weights` weights (a larger layer alone). A group shares its
    forward and backward passes, and holds each of its layers' quantization errors at every bit meanwhile."""
    groups, current, size = [], [], 0
    for info in layers:
        if current and size + info.n_weights > max_weights:
            groups.append(current)
            current, size = [], 0
        current.append(info)
        size += info.n_weights
    if current:
        groups.append(current)
    return groups


def _columns(config: CalibrationConfig) -> tuple[RowChoice, ...]:
    """The row choice of every column of the tables (16 included), in column order."""
    return column_choices(config.bits, config.group_size)


def _quantized_columns(config: CalibrationConfig) -> tuple[RowChoice, ...]:
    """The columns that are measured (all but 16 bits), in column order: the "bits" q of the exact jobs (row, q)."""
    return tuple(c for c in _columns(config) if c.bits != KEEP_BITS)


def _as_choice(bits) -> RowChoice:
    """A column given as a bit-width (int), a label ("4g") or a RowChoice."""
    return bits if isinstance(bits, RowChoice) else RowChoice.parse(bits)


def _same_columns(info: LayerInfo, choices: Sequence[RowChoice], group_size: int | None) -> dict[int, int]:
    """Position of each grouped choice whose rows fit in one group (K <= g) -> position of its per-row twin in
    `choices`: the same quantized rows (`quantize_rows` pads the one group with exact zeros), measured once."""
    if group_size is None or n_groups(info.fan_in, group_size) > 1:
        return {}
    return {i: list(choices).index(RowChoice(c.bits)) for i, c in enumerate(choices) if c.grouped}


def _copy_same(table: torch.Tensor, same: dict[int, int]) -> torch.Tensor:
    """`table` [out, columns] with column dst set to column src for each pair of `same` (in place)."""
    for dst, src in same.items():
        table[:, dst] = table[:, src]
    return table


def _with_keep_column(table: torch.Tensor, bits: Sequence, qbits: Sequence) -> torch.Tensor:
    """[out, len(qbits)] -> [out, len(bits)] float64, 0 in the column of 16 bits (columns: bit-widths or choices)."""
    full = torch.zeros(table.shape[0], len(bits), dtype=torch.float64)
    full[:, [list(bits).index(b) for b in qbits]] = table
    return full


def _proxy_stage(adapter, data, auto, config: CalibrationConfig, record: _RunRecord, errors: dict, on_progress):
    """Step 3: both proxies for every layer whose proxy is not stored yet, group by group."""
    columns, qbits = _columns(config), _quantized_columns(config)
    pending = [info for info in auto if not record.proxy_done(info.name)]
    groups = _proxy_groups(pending, config.proxy_group_weights)
    step = _Steps("proxy", len(groups) * len(data), on_progress)
    for group in tqdm(groups, desc="proxy groups", disable=not config.progress or len(groups) < 2):
        t0 = time.perf_counter()
        if len(groups) > 1:
            errors.clear()  # keep at most one group's quantization errors in memory
        res = proxy_sensitivity(
            adapter, data, group, qbits, config.weight,
            max_exact_dims=config.max_exact_dims, n_probes=config.n_probes, seed=config.seed,
            progress=config.progress, errors=errors, on_step=step, group_size=config.group_size,
        )  # fmt: skip
        record.probes = res.probes
        record.add_time("proxy", time.perf_counter() - t0)
        for info in group:
            layer = record.results[info.name]
            # the twins of a one-group layer are the same rows: the same values, bit for bit
            same = _same_columns(info, columns, config.group_size)
            layer.proxy_gain = _copy_same(_with_keep_column(res.gain[info.name], columns, qbits), same)
            layer.proxy_aligned = _copy_same(_with_keep_column(res.aligned[info.name], columns, qbits), same)
            layer.dead = layer.dead or info.name in res.dead
            record.layer_done(info.name, "proxy")


def _find_dead_layers(adapter, data, auto, config: CalibrationConfig, record: _RunRecord) -> None:
    """Step 3 of method "exact", which has no proxy to notice dead layers: one gradient probe per batch instead (a
    layer is dead when it is dead on every batch)."""
    pending = [info for info in auto if not record.exact_done(info.name)]
    if pending:
        dead_sets = [set(adapter.dead_layers(p.batch, seed=config.seed + i)) for i, p in enumerate(data)]
        for info in pending:
            layer = record.results[info.name]
            layer.dead = layer.dead or all(info.name in d for d in dead_sets)


def _choose_exact_jobs(auto, results: dict[str, LayerSensitivity], config: CalibrationConfig):
    """Step 4: (top, sample), each layer -> {(row, bit column)} of the live layers. "two_stage": the proxy's global
    top `exact_fraction` per bit and `rank_sample` random pairs; "proxy": the random pairs only; "exact": all."""
    columns, qbits = _columns(config), _quantized_columns(config)
    live = [info for info in auto if not results[info.name].dead]
    if config.method == "exact":
        top = {info.name: {(r, q) for r in range(info.out_features) for q in range(len(qbits))} for info in live}
        return top, {info.name: set() for info in live}
    counts = {info.name: info.out_features for info in live}
    qcols = [columns.index(c) for c in qbits]
    ranking = {info.name: getattr(results[info.name], f"proxy_{config.proxy}")[:, qcols] for info in live}
    n_top = math.ceil(config.exact_fraction * sum(counts.values())) if config.method == "two_stage" else 0
    return _select_jobs(ranking, counts, len(qbits), n_top, config.rank_sample, config.seed)


def _exact_stage(adapter, data, auto, measure, config: CalibrationConfig, record: _RunRecord, errors, on_progress):
    """Step 5: the exact table of every layer not stored yet: `measure`'s (row, bit column) jobs measured, the rest
    NaN (the proxy stands in for them), dead layers 0 without a pass. A one-group layer's grouped columns are not
    measured: they copy their per-row twins (`_same_columns`)."""
    bits, qbits = _columns(config), _quantized_columns(config)
    qcols = [bits.index(b) for b in qbits]
    references = _References(adapter)
    prefixes = _Prefixes(adapter) if config.prefix_cache else None
    todo = [info for info in auto if not record.exact_done(info.name)]

    def layer_jobs(info):
        same = _same_columns(info, qbits, config.group_size)
        return sorted((r, q) for r, q in measure.get(info.name, set()) if q not in same), same

    n_passes = sum(
        math.ceil(len(layer_jobs(info)[0]) / config.channels_per_pass)
        for info in todo if not record.results[info.name].dead
    )  # fmt: skip
    step = _Steps("exact", n_passes, on_progress)
    for info in tqdm(todo, desc="exact", unit="layer", disable=not config.progress):
        layer = record.results[info.name]
        exact = torch.full((info.out_features, len(bits)), float("nan"), dtype=torch.float64)
        exact[:, bits.index(RowChoice(KEEP_BITS))] = 0.0
        jobs, same = layer_jobs(info)
        if layer.dead:
            exact[:, qcols] = 0.0  # dead: exactly zero, nothing to measure
        elif jobs:
            t0 = time.perf_counter()
            values = exact_sensitivity(
                adapter, data, info, [(r, qbits[q]) for r, q in jobs], qbits, config.weight,
                channels_per_pass=config.channels_per_pass, references=references, progress=config.progress,
                errors=errors.pop(info.name, None), on_step=step, prefixes=prefixes, group_size=config.group_size,
            )  # fmt: skip
            record.add_time("exact", time.perf_counter() - t0)
            for (r, q), v in zip(jobs, values.tolist()):
                exact[r, qcols[q]] = v
        _copy_same(exact, {qcols[q]: qcols[p] for q, p in same.items()})
        layer.exact = exact
        record.layer_done(info.name, "exact")


def _result(config: CalibrationConfig, record: _RunRecord, data, others, top, sample, measure, started) -> Sensitivity:
    """Step 6: the Sensitivity, with the proxy's scale fitted (`_fit_proxy_scale`) and the report."""
    qbits = _quantized_columns(config)
    index = record.index
    sens = Sensitivity(
        bits=config.bits,
        layers=record.results,
        proxy=config.proxy,
        dead_layers=[name for name, layer in record.results.items() if layer.dead],
        other_layers=others,
        config=config.to_dict(),
        fingerprint=index["fingerprint"],
        adapter_config=index["adapter"],
        group_size=config.group_size,
    )
    fit_on = "none"
    if config.method != "exact":
        # the random sample's rows; without one (rank_sample=0) only the top rows exist, and the fit is biased
        fit_rows = {n: {r for r, _ in pairs} for n, pairs in sample.items()}
        fit_on = "random sample" if any(fit_rows.values()) else "top (no random sample: biased)"
        if not any(fit_rows.values()):
            fit_rows = {n: {r for r, _ in pairs} for n, pairs in measure.items()}
        sens.proxy_scale = _fit_proxy_scale(sens, qbits, fit_rows)
    sens.report = _report(sens, sample, top, qbits, index["times"], record.probes, time.perf_counter() - started)
    sens.report["n_exact_rows"] = sum(len({r for r, _ in v}) for v in measure.values())
    sens.report["n_exact_jobs"] = sum(len(v) for v in measure.values())
    sens.report["proxy_scale_fit"] = fit_on
    sens.report["data_fingerprint"] = index["data"]
    sens.report["n_samples"] = sum(p.size for p in data)
    return sens


# ---------------------------------------------------------------------------------------------------------------
# Exact jobs, the proxy's scale, the report
def _select_jobs(
    proxies: dict[str, torch.Tensor], counts: dict[str, int], nq: int, n_top: int, n_sample: int, seed: int
) -> tuple[dict[str, set[tuple[int, int]]], dict[str, set[tuple[int, int]]]]:
    """Global top-`n_top` channels per bit by proxy (ties: layer order, row), and `n_sample` random (row, bit)
    pairs over all channels; both as layer -> {(row, bit column)}."""
    names = list(proxies)
    top: dict[str, set] = {n: set() for n in names}
    sample: dict[str, set] = {n: set() for n in names}
    if not names:
        return top, sample
    if n_top > 0:
        for q in range(nq):
            values = torch.cat([proxies[n][:, q] for n in names])
            order = torch.argsort(-values, stable=True)[:n_top]
            offsets = torch.tensor([0] + [counts[n] for n in names]).cumsum(0)
            for flat in order.tolist():
                li = int(torch.searchsorted(offsets, flat, right=True)) - 1
                top[names[li]].add((flat - int(offsets[li]), q))
    total = sum(counts[n] for n in names) * nq
    if n_sample > 0 and total > 0:
        gen = torch.Generator().manual_seed(seed)
        picks = torch.randperm(total, generator=gen)[: min(n_sample, total)].tolist()
        offsets = [0]
        for n in names:
            offsets.append(offsets[-1] + counts[n] * nq)
        for flat in picks:
            li = next(i for i in range(len(names)) if offsets[i + 1] > flat)
            local = flat - offsets[li]
            sample[names[li]].add((local // nq, local % nq))
    return top, sample


def _whole_rows(top: dict[str, set], sample: dict[str, set], nq: int) -> dict[str, set[tuple[int, int]]]:
    """Every (row, bit column) of each row that `top` or `sample` picks at some bit: rows are measured whole."""
    out = {}
    for name in set(top) | set(sample):
        rows = {r for r, _ in top.get(name, set()) | sample.get(name, set())}
        out[name] = {(r, q) for r in rows for q in range(nq)}
    return out


def _fit_proxy_scale(sens: Sensitivity, qbits, rows: dict[str, set[int]] | None = None) -> dict[int | str, float]:
    """Per column (`qbits`: bit-widths or row choices; keyed by `proxy_scale_key`): exp(median(log(exact /
    proxy))) over the channels of `rows` (layer -> row indices; None: every channel) measured both ways (1.0 when
    none). Give it the random sample's rows: the proxy's top picks are selected for a high proxy, so their
    exact/proxy ratio is biased low."""
    scale = {}
    for b in map(_as_choice, qbits):
        col = sens.choice_index(b)
        ratios = []
        for name, layer in sens.layers.items():
            if layer.dead or layer.exact is None:
                continue
            proxy = layer.proxy_aligned if sens.proxy == "aligned" else layer.proxy_gain
            if proxy is None:
                continue
            e, p = layer.exact[:, col], proxy[:, col]
            ok = torch.isfinite(e) & (e > 0) & (p > 0)
            if rows is not None:
                chosen = torch.zeros_like(ok)
                chosen[torch.tensor(sorted(rows.get(name, ())), dtype=torch.long)] = True
                ok &= chosen
            ratios.append((e[ok] / p[ok]).log())
        r = torch.cat(ratios) if ratios else torch.zeros(0)
        scale[proxy_scale_key(b)] = float(r.median().exp()) if r.numel() else 1.0
    return scale


def _report(sens, sample, top, qbits, times, probes, elapsed) -> dict:
    report = {
        "method": sens.config.get("method"),
        "proxy": sens.proxy,
        "probes": probes,
        "n_layers": len(sens.layers),
        "n_channels": sens.total_channels(),
        "dead_layers": list(sens.dead_layers),
        "n_exact_top": sum(len(v) for v in top.values()),
        "n_rank_sample": sum(len(v) for v in sample.values()),
        "proxy_scale": {str(b): s for b, s in sens.proxy_scale.items()},
        "time_s": {"proxy": round(times["proxy_s"], 3), "exact": round(times["exact_s"], 3),
                   "total_this_run": round(elapsed, 3)},
    }  # fmt: skip
    if any(layer.proxy_gain is not None for layer in sens.layers.values()):
        rank = {}
        for key in ("gain", "aligned"):
            triples = _pairs(sens, sample, qbits, f"proxy_{key}")
            entry = {"all": spearman([t[0] for t in triples], [t[1] for t in triples]), "n": len(triples)}
            for b in map(_as_choice, qbits):  # keyed by label: "2" (per-row, as always), "2g"
                sub = [t for t in triples if t[2] == b]
                entry[b.label] = spearman([t[0] for t in sub], [t[1] for t in sub])
            rank[key] = entry
        report["rank_correlation"] = rank
        finite = {k: v["all"] for k, v in rank.items() if not math.isnan(v["all"])}
        report["better_proxy"] = max(finite, key=finite.get) if finite else None
    return report


def _pairs(sens: Sensitivity, jobs: dict[str, set], qbits, key: str):
    """(exact, proxy, row choice) triples for measured jobs."""
    out = []
    for name, pairs in jobs.items():
        layer = sens.layers[name]
        table = getattr(layer, key)
        for r, q in pairs:
            choice = _as_choice(qbits[q])
            col = sens.choice_index(choice)
            out.append((float(layer.exact[r, col]), float(table[r, col]), choice))
    return out


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long sequences (nan when undefined)."""
    from scipy.stats import spearmanr

    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.numel() < 3 or a.numel() != b.numel():
        return float("nan")
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return float("nan")
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


# ---------------------------------------------------------------------------------------------------------------
# Calibration data
@dataclass
class _Prepared:
    batch: Batch
    noise: torch.Tensor | None
    size: int


def _prepare(adapter: PolicyAdapter, batches: Iterable[Batch], seed: int) -> list[_Prepared]:
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict):
            raise ValueError(f"calibration batch {i} is a {type(batch).__name__}, expected a dict of tensors")
        adapter.check_batch(batch)
        batch = adapter.to_device(batch)
        size = adapter.batch_size(batch)
        out.append(_Prepared(batch, adapter.make_noise(size, seed + i), size))
    if not out:
        raise ValueError("no calibration batches: give at least one batch of model inputs")
    return out


def data_fingerprint(batches: Sequence[Batch]) -> str:
    """Hash of the calibration inputs (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key].detach().cpu().contiguous()
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Layer algebra: the output error of a channel
def _errors(info: LayerInfo, bits: Sequence, wcfg: WeightQuantConfig, group_size: int | None = None) -> torch.Tensor:
    """dW for every row at every column in `bits` (bit-widths or row choices; grouped ones need `group_size`):
    [len(bits), out, fan_in] fp32 on the weight's device."""
    w = info.module.weight
    done: dict[RowChoice, torch.Tensor] = {}
    out = []
    for c in map(_as_choice, bits):
        if c.grouped and group_size is None:
            raise ValueError(f"{info.name}: row choice {c.label!r} is grouped: give the group_size")
        if c.grouped and n_groups(info.fan_in, group_size) == 1:
            c = RowChoice(c.bits)  # one group: the per-row rows themselves (and the clip search is not free)
        if c not in done:
            done[c] = row_choice_error(w, c, wcfg, group_size).reshape(info.out_features, -1)
        out.append(done[c])
    return torch.stack(out).to(w.device)


def _conv_response(module, x: torch.Tensor, rows_weight: torch.Tensor) -> torch.Tensor:
    """The conv's response (no bias) with the full filter bank replaced by `rows_weight` [out, fan_in]."""
    return module._conv_forward(x, rows_weight.reshape(module.weight.shape).to(x.dtype), None)


def _channel_last(info: LayerInfo, t: torch.Tensor, n_samples: int) -> torch.Tensor:
    """A layer output (or its gradient) as [samples, positions, out]: tokens/pixels of a sample are positions."""
    if info.kind == "conv":
        t = t.movedim(1, -1)
    if t.shape[0] % n_samples:
        raise CalibrationError(
            f"{info.name}: leading dimension {t.shape[0]} is not a multiple of the batch size {n_samples}; "
            "the adapter must keep samples in the leading dimension of every quantizable layer (batch-major)"
        )
    return t.reshape(n_samples, -1, info.out_features)


def _output_errors(info: LayerInfo, x: torch.Tensor, errs: torch.Tensor, n_samples: int) -> torch.Tensor:
    """dX for every row and bit: [nq, samples, positions, out]."""
    if info.kind == "linear":
        nq = errs.shape[0]
        p = F.linear(x, errs.reshape(-1, errs.shape[-1]).to(x.dtype))  # [..., nq * out]
        p = p.reshape(n_samples, -1, nq, info.out_features)
        return p.permute(2, 0, 1, 3)
    return torch.stack([_channel_last(info, _conv_response(info.module, x, e), n_samples) for e in errs])


# ---------------------------------------------------------------------------------------------------------------
# First-order proxy (Eq. 6)
@dataclass
class ProxyResult:
    """Per layer [out, nq] float64 (nq = the quantized bits, ascending), and the layers without gradient."""

    gain: dict[str, torch.Tensor]
    aligned: dict[str, torch.Tensor]
    dead: list[str]
    probes: str


def _probes(shape: torch.Size, max_exact_dims: int, n_probes: int, seed: int, like: torch.Tensor):
    """(probe, weight) pairs: unit vectors per action dim (exact) or Rademacher projections (unbiased)."""
    n_samples, dims = shape[0], math.prod(shape[1:])
    if dims <= max_exact_dims:
        for j in range(dims):
            v = torch.zeros(n_samples, dims, dtype=like.dtype, device=like.device)
            v[:, j] = 1
            yield v.reshape(shape), 1.0
    else:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n_probes):
            v = torch.randint(0, 2, tuple(shape), generator=gen) * 2 - 1
            yield v.to(dtype=like.dtype, device=like.device), 1.0 / n_probes


class _LayerProxySums:
    """One layer's sums over one calibration batch, per sample (the gain multiplies two per-sample sums before the
    mean over samples, so they stay apart until `gain`), on the adapter's device:

    err_sq  [B, out, nq]  ||dX_c||^2 at each bit, summed over the layer's calls (forward)
    grad_sq [B, out]      sum over probes v of weight * ||g_v||^2, g_v = J^T v on channel c: E = ||J||_F^2
    inner   [B, out, nq]  g_v . dX_c of the current probe, summed over the layer's calls (backward)
    aligned [B, out, nq]  sum over probes of weight * (g_v . dX_c)^2: E = ||J dX_c||^2
    """

    def __init__(self, info: LayerInfo, errors: torch.Tensor, nq: int, n_samples: int, device):
        self.info = info
        self.errors = errors  # dW of every row at every bit: [nq, out, fan_in]
        self.n_samples = n_samples
        self.err_sq = torch.zeros(n_samples, info.out_features, nq, device=device)
        self.inner = torch.zeros(n_samples, info.out_features, nq, device=device)
        self.aligned = torch.zeros(n_samples, info.out_features, nq, device=device)
        self.grad_sq = torch.zeros(n_samples, info.out_features, device=device)
        self.probe_weight = 1.0

    def on_call(self, x: torch.Tensor):
        """One call of the layer on input x (π0's expert layers: one per denoising step): adds its ||dX||^2 and
        returns the hook for this call's output gradient, which pairs it with this call's dX."""
        with torch.no_grad():
            dx = _output_errors(self.info, x.detach(), self.errors, self.n_samples).float()  # [nq, B, T, out]
            self.err_sq += dx.pow(2).sum(2).permute(1, 2, 0)

        def on_grad(g):
            g = _channel_last(self.info, g.detach(), self.n_samples).float()
            self.grad_sq.add_(g.pow(2).sum(1), alpha=self.probe_weight)
            self.inner += torch.einsum("btc,qbtc->bcq", g, dx)

        return on_grad

    def start_probe(self, weight: float) -> None:
        self.probe_weight = weight
        self.inner.zero_()

    def end_probe(self) -> None:
        # squared only now: J dX sums the contributions of every call of the layer before the norm
        self.aligned.add_(self.inner.pow(2), alpha=self.probe_weight)

    def gain(self) -> torch.Tensor:
        """[out, nq] float64 on the CPU: sum over the batch's samples of ||J||_F^2 ||dX_c||^2."""
        return (self.grad_sq[:, :, None] * self.err_sq).sum(0).double().cpu()

    def aligned_sum(self) -> torch.Tensor:
        """[out, nq] float64 on the CPU: sum over the batch's samples of ||J dX_c||^2."""
        return self.aligned.sum(0).double().cpu()

    def alive(self) -> bool:
        """Whether any gradient reached the layer in this batch."""
        return bool(self.grad_sq.ne(0).any())


class _ProxyBatch:
    """The `_LayerProxySums` of every layer of a group over one batch, and the hook of `output_gradients` that
    fills them."""

    def __init__(self, layers: Sequence[LayerInfo], errors: dict[str, torch.Tensor], nq: int, n_samples: int, device):
        self.layers = {info.name: _LayerProxySums(info, errors[info.name], nq, n_samples, device) for info in layers}

    def grad_hook(self, info: LayerInfo, x: torch.Tensor, output: torch.Tensor):
        """`output_gradients`' make_grad_hook."""
        return self.layers[info.name].on_call(x)

    def start_probe(self, weight: float) -> None:
        for sums in self.layers.values():
            sums.start_probe(weight)

    def end_probe(self) -> None:
        for sums in self.layers.values():
            sums.end_probe()


def proxy_sensitivity(
    adapter: PolicyAdapter,
    data: Sequence[_Prepared],
    layers: Sequence[LayerInfo],
    bits: Sequence[int],
    wcfg: WeightQuantConfig,
    *,
    max_exact_dims: int = 64,
    n_probes: int = 16,
    seed: int = 0,
    progress: bool = False,
    errors: dict[str, torch.Tensor] | None = None,
    on_step=None,
    group_size: int | None = None,
) -> ProxyResult:
    """Both first-order proxies for `layers` (one forward and one backward per probe per batch, all layers at
    once): gain = E[||J||_F^2 ||dX||^2], aligned = E[||J dX||^2], per channel and column of `bits` (bit-widths
    or row choices such as "4g", which need `group_size`; no 16).

    errors: a cache of `_errors(info, bits, wcfg, group_size)` by layer name, filled here (the clip search is not
    free). on_step: called with no argument after each batch (progress reports; may raise to stop the run)."""
    errs = errors if errors is not None else {}
    for info in layers:
        if info.name not in errs:
            errs[info.name] = _errors(info, bits, wcfg, group_size)
    nq = len(bits)
    gain = {info.name: torch.zeros(info.out_features, nq, dtype=torch.float64) for info in layers}
    aligned = {info.name: torch.zeros(info.out_features, nq, dtype=torch.float64) for info in layers}
    alive = {info.name: False for info in layers}
    n_total = 0
    probe_kind = "exact"
    bar = tqdm(total=len(data), desc="proxy", unit="batch", disable=not progress, leave=False)
    try:
        for i, prep in enumerate(data):
            sums = _ProxyBatch(layers, errs, nq, prep.size, adapter.device)
            with output_gradients(adapter.model, layers, sums.grad_hook):
                actions = adapter.actions(prep.batch, prep.noise)
                probes = list(_probes(actions.shape, max_exact_dims, n_probes, seed + 7919 * i, actions))
                if len(probes) > 0 and math.prod(actions.shape[1:]) > max_exact_dims:
                    probe_kind = f"random({n_probes})"
                for j, (v, w) in enumerate(probes):
                    sums.start_probe(w)
                    torch.autograd.backward(actions, v, retain_graph=j < len(probes) - 1)
                    sums.end_probe()
                del actions
            for info in layers:
                layer = sums.layers[info.name]
                gain[info.name] += layer.gain()
                aligned[info.name] += layer.aligned_sum()
                alive[info.name] = alive[info.name] or layer.alive()
            n_total += prep.size
            bar.update(1)
            if on_step is not None:
                on_step()
    finally:
        bar.close()
    for name in gain:
        gain[name] /= n_total
        aligned[name] /= n_total
    dead = [info.name for info in layers if not alive[info.name]]
    return ProxyResult(gain, aligned, dead, probe_kind)


# ---------------------------------------------------------------------------------------------------------------
# Exact (Eq. 4) by hooks
@contextlib.contextmanager
def _channel_error_hook(info: LayerInfo, rows: torch.Tensor, row_errors: torch.Tensor):
    """Within the block, replica i (of k = len(rows) contiguous blocks of the leading dimension) of the layer's
    output gets channel rows[i]'s output error from row_errors[i] ([k, fan_in]) added. Always removed."""
    k = len(rows)
    module = info.module
    arange = torch.arange(k, device=rows.device)

    def hook(mod, args, output):
        x = args[0]
        if x.shape[0] % k:
            raise CalibrationError(
                f"{info.name}: leading dimension {x.shape[0]} is not a multiple of the {k} batch replicas; the "
                "adapter must keep samples in the leading dimension of every quantizable layer (batch-major)"
            )
        m = x.shape[0] // k
        out = output.clone(memory_format=torch.contiguous_format)
        if info.kind == "linear":
            xk = x.reshape(k, -1, x.shape[-1])
            e = torch.einsum("kmf,kf->km", xk, row_errors.to(x.dtype))  # [k, M]
            view = out.view(k, -1, info.out_features)
            view[arange, :, rows] += e.to(out.dtype)
        else:
            for i in range(k):
                full = torch.zeros(info.out_features, info.fan_in, dtype=row_errors.dtype, device=row_errors.device)
                full[rows[i]] = row_errors[i]
                c = int(rows[i])
                out[i * m : (i + 1) * m, c] += _conv_response(module, x[i * m : (i + 1) * m], full)[:, c]
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _References:
    """Unperturbed actions per (batch, replica count), computed at the replicated size the perturbed pass uses."""

    def __init__(self, adapter: PolicyAdapter):
        self.adapter = adapter
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, i: int, prep: _Prepared, k: int, prefix=None) -> torch.Tensor:
        """prefix: the replicated batch's unperturbed prefix when one is at hand (the same numbers, bit for bit,
        without recomputing the prefix)."""
        key = (i, k)
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = _replicated_actions(self.adapter, prep, k, prefix)
        return self.cache[key]


class _Prefixes:
    """The adapter's prefix (`PolicyAdapter.prefix_cache`) per (batch, replica count), computed once with the
    unperturbed weights at the replicated size the passes use (so that a cached pass computes bit for bit what a
    full pass does). Kept up to `max_bytes` (the prefix's `nbytes`, when it has one), least recently used first out:
    layers with fewer jobs than a full chunk use other replica counts."""

    def __init__(self, adapter: PolicyAdapter, max_bytes: int = 2 << 30):
        self.adapter = adapter
        self.max_bytes = max_bytes
        self.cache: dict[tuple[int, int], object] = {}

    def get(self, i: int, prep: _Prepared, k: int):
        key = (i, k)
        if key in self.cache:
            self.cache[key] = self.cache.pop(key)  # most recently used last
            return self.cache[key]
        batch = self.adapter.repeat_batch(prep.batch, k) if k > 1 else prep.batch
        with torch.no_grad():
            prefix = self.adapter.prefix_cache(batch)
        size = getattr(prefix, "nbytes", 0)
        while self.cache and sum(getattr(v, "nbytes", 0) for v in self.cache.values()) + size > self.max_bytes:
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = prefix
        return prefix


def _replicated_actions(adapter: PolicyAdapter, prep: _Prepared, k: int, prefix=None) -> torch.Tensor:
    batch = adapter.repeat_batch(prep.batch, k) if k > 1 else prep.batch
    noise = None if prep.noise is None else torch.cat([prep.noise] * k, dim=0)
    if prefix is not None:
        return adapter.actions_from_prefix(prefix, batch, noise)
    return adapter.actions(batch, noise)


def _squared_deviations(
    adapter: PolicyAdapter,
    prep: _Prepared,
    ref: torch.Tensor,
    info: LayerInfo,
    rows: torch.Tensor,
    row_errors: torch.Tensor,
    prefix=None,
) -> torch.Tensor:
    """||A_i - A*||^2 per replica i (channel rows[i] perturbed) and sample: [k, B] float64. prefix: the adapter's
    unperturbed prefix of the replicated batch, for a layer downstream of it (None: the full forward)."""
    k = len(rows)
    with torch.no_grad(), _channel_error_hook(info, rows, row_errors):
        actions = _replicated_actions(adapter, prep, k, prefix)
    diff = (actions.double() - ref.double()).reshape(k, prep.size, -1)
    return diff.pow(2).sum(-1)


def _errors_by_bit(
    info: LayerInfo,
    jobs: Sequence[tuple[int, RowChoice]],
    wcfg: WeightQuantConfig,
    cached=None,
    cached_bits=(),
    group_size: int | None = None,
) -> dict[RowChoice, torch.Tensor]:
    """row choice -> dW of every row [out, fan_in], for the choices `jobs` use; from `cached` (`_errors(info,
    cached_bits, wcfg, group_size)`) when given."""
    used = sorted({_as_choice(b) for _, b in jobs})
    if cached is not None:
        columns = [_as_choice(b) for b in cached_bits]
        return {b: cached[columns.index(b)] for b in used}
    return dict(zip(used, _errors(info, used, wcfg, group_size)))


def _exact_passes(
    adapter: PolicyAdapter,
    data: Sequence[_Prepared],
    info: LayerInfo,
    jobs: Sequence[tuple[int, int]],
    errs: dict[int, torch.Tensor],
    *,
    channels_per_pass: int,
    references: _References,
    prefixes: _Prefixes | None = None,
    progress: bool = False,
) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """The perturbed forward passes that measure the (row, bit) `jobs` of one layer (Eq. 4 and Eq. 5 reduce them
    differently): a pass perturbs up to `channels_per_pass` channels, one per replica of the batch. Yields, pass by
    pass, where its jobs are in `jobs` and, per batch of `data`, ||A_i - A*||^2 per replica i and sample ([k, B]).

    errs: `_errors_by_bit` of the layer. prefixes: the adapter's unperturbed prefixes, for a layer downstream of
    the prefix (None: every pass recomputes the whole policy)."""
    chunks = range(0, len(jobs), channels_per_pass)
    for start in tqdm(chunks, desc=info.name, unit="pass", disable=not progress, leave=False):
        chunk = jobs[start : start + channels_per_pass]
        k = len(chunk)
        rows = torch.tensor([r for r, _ in chunk], device=adapter.device)
        row_errors = torch.stack([errs[b][r] for r, b in chunk])
        deviations = []
        for i, prep in enumerate(data):
            prefix = None if prefixes is None else prefixes.get(i, prep, k)
            ref = references.get(i, prep, k, prefix)
            deviations.append(_squared_deviations(adapter, prep, ref, info, rows, row_errors, prefix))
        yield slice(start, start + k), deviations


def exact_sensitivity(
    adapter: PolicyAdapter,
    data: Sequence[_Prepared],
    info: LayerInfo,
    jobs: Sequence[tuple[int, int]],
    bits: Sequence[int],
    wcfg: WeightQuantConfig,
    *,
    channels_per_pass: int = 16,
    references: _References | None = None,
    progress: bool = False,
    errors: torch.Tensor | None = None,
    on_step=None,
    prefixes: _Prefixes | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """Eq. 4 for (row, bit) `jobs` of one layer: [len(jobs)] float64, the mean over all calibration samples. A
    job's bit may be a row choice ("4g", a RowChoice): grouped ones need `group_size`.

    errors: this layer's `_errors(info, bits, wcfg, group_size)` if already computed (rows of every column in
    `bits`).
    prefixes: the adapter's unperturbed prefixes, reused when the layer is downstream of the prefix (None: every
    pass recomputes the whole policy).
    on_step: called with no argument after each pass (progress reports; may raise to stop the run)."""
    if not jobs:
        return torch.zeros(0, dtype=torch.float64)
    references = references or _References(adapter)
    jobs = [(r, _as_choice(b)) for r, b in jobs]
    errs = _errors_by_bit(info, jobs, wcfg, errors, bits, group_size)
    if prefixes is not None and not adapter.downstream_of_prefix(info.name):
        prefixes = None  # the layer feeds the prefix: its perturbation changes it
    out = torch.zeros(len(jobs), dtype=torch.float64)
    n_samples = sum(p.size for p in data)
    passes = _exact_passes(
        adapter, data, info, jobs, errs,
        channels_per_pass=channels_per_pass, references=references, prefixes=prefixes, progress=progress,
    )  # fmt: skip
    for where, deviations in passes:
        total = torch.zeros(where.stop - where.start, dtype=torch.float64)
        for sq in deviations:
            total += sq.sum(1).cpu()
        out[where] = total / n_samples
        if on_step is not None:
            on_step()
    return out


def brute_force_sensitivity(
    adapter: PolicyAdapter,
    batches: Sequence[Batch],
    layer: str,
    row: int,
    bits,
    wcfg=None,
    seed: int = 0,
    group_size: int | None = None,
) -> float:
    """Eq. 4 by copying the weight (for tests): quantize one row in place, run, restore. bits: a bit-width or a row
    choice ("4g" with `group_size`)."""
    choice = _as_choice(bits)
    if choice.grouped and group_size is None:
        raise ValueError(f"brute_force_sensitivity: row choice {choice.label!r} is grouped: give the group_size")
    wcfg = wcfg or WeightQuantConfig()
    module = dict(adapter.model.named_modules())[layer]
    data = _prepare(adapter, batches, seed)
    total, n = 0.0, 0
    original = module.weight.detach().clone()
    try:
        with torch.no_grad():
            refs = [adapter.actions(p.batch, p.noise) for p in data]
            dW = row_choice_error(module.weight, choice, wcfg, group_size).reshape(module.weight.shape[0], -1)[row]
            module.weight.view(module.weight.shape[0], -1)[row] += dW.to(module.weight.dtype)
            for p, ref in zip(data, refs):
                diff = (adapter.actions(p.batch, p.noise).double() - ref.double()).reshape(p.size, -1)
                total += float(diff.pow(2).sum())
                n += p.size
    finally:
        with torch.no_grad():
            module.weight.copy_(original)
    return total / n


# ---------------------------------------------------------------------------------------------------------------
# Cumulative (Eq. 5)
def cumulative_sensitivity(
    adapter: PolicyAdapter,
    episodes: Iterable[Iterable[Batch]],
    jobs: dict[str, Sequence[tuple[int, int]]],
    *,
    wcfg: WeightQuantConfig | None = None,
    channels_per_pass: int = 16,
    seed: int = 0,
    progress: bool = False,
    group_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """S = E_episode [ sum_t ||A_t(channel quantized) - A_t|| ] (Eq. 5), under teacher forcing.

    episodes: an iterable of episodes, each an iterable of batches holding consecutive time steps of that episode
    (one or more steps per batch: every sample of an episode's batches is one t of the sum). The noise of the
    episode's j-th batch is `make_noise(size, seed + j)`, the same for every episode and every channel.
    jobs: layer name -> (row, bit) pairs (a bit may be a row choice such as "4g", with `group_size`). Returns
    layer name -> [len(jobs)] float64.
    """
    wcfg = wcfg or WeightQuantConfig()
    infos = {info.name: info for info in adapter.layers()}
    unknown = set(jobs) - set(infos)
    if unknown:
        raise ValueError(f"cumulative_sensitivity: unknown layers {sorted(unknown)}")
    sums = {name: torch.zeros(len(j), dtype=torch.float64) for name, j in jobs.items()}
    n_episodes = 0
    for episode in tqdm(episodes, desc="episodes", disable=not progress, leave=False):
        data = _prepare(adapter, episode, seed)
        references = _References(adapter)
        for name, layer_jobs in jobs.items():
            info = infos[name]
            layer_jobs = [(r, _as_choice(b)) for r, b in layer_jobs]
            errs = _errors_by_bit(info, layer_jobs, wcfg, group_size=group_size)
            passes = _exact_passes(
                adapter, data, info, list(layer_jobs), errs,
                channels_per_pass=channels_per_pass, references=references,
            )  # fmt: skip
            for where, deviations in passes:
                for sq in deviations:  # Eq. 5 sums norms, not squares: one per time step (sample)
                    sums[name][where] += sq.sqrt().sum(1).cpu()
        n_episodes += 1
    if n_episodes == 0:
        raise ValueError("cumulative_sensitivity: no episodes given")
    return {name: s / n_episodes for name, s in sums.items()}
