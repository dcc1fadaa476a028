"""Action-space sensitivity of every output channel: exact (Eq. 4), first-order proxy (Eq. 6), two-stage, cumulative
(Eq. 5), with an on-disk store that makes long runs resumable.

Notation: layer l, output channel (row) c, bit-width b; dW_c = Q_b(W_c) - W_c is the row's quantization error
(`qvla_quant.quantizer.row_quantization_error`, the same quantizer the runtime packs with), and the channel's output
error on an input x is dX_c = x . dW_c (for a conv: the filter's response to dW_c, at every position).

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
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qvla_quant.adapters.base import Batch, LayerInfo, PolicyAdapter, output_gradients
from qvla_quant.quantizer import BIT_CHOICES, KEEP_BITS, ROW_BITS, WeightQuantConfig, row_quantization_error
from qvla_quant.roles import PlanTemplate

SENSITIVITY_FORMAT_VERSION = 2  # 2: whole rows exact, proxy scale fitted on the random sample
METHODS = ("two_stage", "proxy", "exact")
PROXIES = ("aligned", "gain")


class CalibrationError(RuntimeError):
    """The policy violates an assumption of the sensitivity computation (message says which, and what to do)."""


@dataclass(frozen=True)
class CalibrationConfig:
    """How sensitivities are measured. Validated on construction; `to_dict`/`from_dict` round-trip through JSON.

    bits: bit-widths measured per channel (16 is always included, with s = 0).
    method: "two_stage" (proxy for all, exact for the top), "proxy" (proxy only) or "exact" (Eq. 4 for every
        channel and bit: the definition, and the slowest).
    proxy: which first-order estimate ranks channels ("aligned" or "gain", see the module docstring).
    exact_fraction: two_stage: fraction of all calibrated channels refined exactly, per bit-width (global top).
    rank_sample: random (channel, bit) pairs measured exactly to report the proxy/exact rank correlation.
    channels_per_pass: channels perturbed per forward pass of the exact computation (the batch is replicated that
        many times: memory grows with it).
    max_exact_dims: action chunks with at most this many dims (H * D) get one backward pass per dim (exact
        Jacobian); larger ones use `n_probes` random projections.
    proxy_group_weights: the proxy handles layers in groups of at most this many weights per forward/backward
        pass (each layer's quantization errors for every bit are held in memory during its group's pass).
    seed: random projections, the rank sample and the noise of batch i (seed + i).
    weight: the weight quantizer, identical to the one the plan will be packed with.
    template: which layers are calibrated (rule "auto"); fixed/skipped layers are not measured.
    store_dir: directory of the resumable on-disk store (None: in memory only).
    prefix_cache: exact passes over layers downstream of the adapter's observation prefix (π0: the action expert)
        reuse that prefix instead of recomputing it (the same numbers, bit for bit; False: recompute, for timing).
    """

    bits: tuple[int, ...] = BIT_CHOICES
    method: str = "two_stage"
    proxy: str = "aligned"
    exact_fraction: float = 0.05
    rank_sample: int = 64
    channels_per_pass: int = 16
    max_exact_dims: int = 64
    n_probes: int = 16
    proxy_group_weights: int = 50_000_000
    seed: int = 0
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    template: PlanTemplate = field(default_factory=PlanTemplate)
    store_dir: str | None = None
    progress: bool = True
    prefix_cache: bool = True

    def __post_init__(self):
        bits = tuple(sorted({int(b) for b in self.bits} | {KEEP_BITS}))
        bad = set(bits) - set(ROW_BITS)  # 3 and 6 on request: the default stays the paper's BIT_CHOICES
        if bad:
            raise ValueError(f"CalibrationConfig.bits: {sorted(bad)} not in {ROW_BITS}")
        if len(bits) < 2:
            raise ValueError("CalibrationConfig.bits: give at least one bit-width below 16")
        object.__setattr__(self, "bits", bits)
        if self.method not in METHODS:
            raise ValueError(f"CalibrationConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.proxy not in PROXIES:
            raise ValueError(f"CalibrationConfig.proxy must be one of {PROXIES}, got {self.proxy!r}")
        if not 0.0 <= self.exact_fraction <= 1.0:
            raise ValueError(f"CalibrationConfig.exact_fraction must be in [0, 1], got {self.exact_fraction}")
        for name in ("channels_per_pass", "max_exact_dims", "n_probes", "proxy_group_weights"):
            if getattr(self, name) < 1:
                raise ValueError(f"CalibrationConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.rank_sample < 0:
            raise ValueError(f"CalibrationConfig.rank_sample must be >= 0, got {self.rank_sample}")
        if isinstance(self.weight, dict):
            object.__setattr__(self, "weight", WeightQuantConfig.from_dict(self.weight))
        if isinstance(self.template, dict):
            object.__setattr__(self, "template", PlanTemplate.from_dict(self.template))

    @property
    def quantized_bits(self) -> tuple[int, ...]:
        return tuple(b for b in self.bits if b != KEEP_BITS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"] = list(self.bits)
        d["weight"] = self.weight.to_dict()
        d["template"] = self.template.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"CalibrationConfig: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "bits" in d:
            d["bits"] = tuple(d["bits"])
        return cls(**d)

    def result_key(self) -> dict:
        """The settings that change the numbers (a store written with other ones cannot be resumed)."""
        d = self.to_dict()
        for k in ("channels_per_pass", "proxy_group_weights", "store_dir", "progress", "prefix_cache"):
            d.pop(k)
        return d


# ---------------------------------------------------------------------------------------------------------------
# Results
@dataclass
class LayerSensitivity:
    """Measurements of one layer; every tensor is [out_features, len(bits)] float64, column of 16 bits = 0.

    exact: NaN where not measured. proxy_gain / proxy_aligned: None when the proxy did not run.
    """

    name: str
    role: str
    kind: str
    out_features: int
    fan_in: int
    proxy_gain: torch.Tensor | None = None
    proxy_aligned: torch.Tensor | None = None
    exact: torch.Tensor | None = None
    dead: bool = False

    def meta(self) -> dict:
        return {
            "role": self.role,
            "kind": self.kind,
            "out_features": self.out_features,
            "fan_in": self.fan_in,
            "dead": self.dead,
        }


@dataclass
class Sensitivity:
    """Per-layer, per-channel, per-bit action sensitivities of one policy on one calibration set.

    `values(name)` is what the allocation uses, row by row: exact when the row was measured exactly at every bit,
    else the ranking proxy times its per-bit scale (`proxy_scale`) at every bit (a row never mixes the two), 0 for
    dead layers and for 16 bits. `other_layers`: the policy's layers that were not
    measured (template rule "skip" or fixed bits) with their shapes and rule.
    """

    bits: tuple[int, ...]
    layers: dict[str, LayerSensitivity]
    proxy: str = "aligned"
    dead_layers: list[str] = field(default_factory=list)
    other_layers: dict[str, dict] = field(default_factory=dict)
    proxy_scale: dict[int, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    adapter_config: dict | None = None

    def bit_index(self, bits: int) -> int:
        try:
            return self.bits.index(int(bits))
        except ValueError:
            raise ValueError(f"no sensitivity was measured for {bits} bits (measured: {self.bits})") from None

    def values(self, name: str) -> torch.Tensor:
        layer = self.layers[name]
        shape = (layer.out_features, len(self.bits))
        if layer.dead:
            return torch.zeros(shape, dtype=torch.float64)
        proxy = layer.proxy_aligned if self.proxy == "aligned" else layer.proxy_gain
        out = torch.full(shape, float("nan"), dtype=torch.float64)
        if proxy is not None:
            scale = torch.tensor([self.proxy_scale.get(b, 1.0) for b in self.bits], dtype=torch.float64)
            out = proxy.double() * scale
        if layer.exact is not None:
            keep = self.bit_index(KEEP_BITS)
            quantized = [i for i in range(len(self.bits)) if i != keep]
            whole = torch.isfinite(layer.exact[:, quantized]).all(1)  # rows measured exactly at every bit
            if proxy is None:  # method "exact": nothing to fall back to, a NaN below says what is missing
                whole = torch.ones_like(whole)
            out = torch.where(whole[:, None], layer.exact.double(), out)
        out[:, self.bit_index(KEEP_BITS)] = 0.0
        if torch.isnan(out).any():
            raise ValueError(f"{name}: some channels have neither a proxy nor an exact sensitivity")
        return out

    def total_channels(self) -> int:
        return sum(layer.out_features for layer in self.layers.values())

    # ---- persistence (the same directory format the resumable store writes)
    def save(self, directory) -> Path:
        store = SensitivityStore(directory)
        store.write_all(self)
        return store.directory

    @classmethod
    def load(cls, directory) -> Sensitivity:
        return SensitivityStore(directory).read()


# ---------------------------------------------------------------------------------------------------------------
# Layer algebra: the output error of a channel
def _errors(info: LayerInfo, bits: Sequence[int], wcfg: WeightQuantConfig) -> torch.Tensor:
    """dW for every row at every bit in `bits`: [len(bits), out, fan_in] fp32 on the weight's device."""
    w = info.module.weight
    return torch.stack([row_quantization_error(w, b, wcfg).reshape(info.out_features, -1) for b in bits]).to(w.device)


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
        if hasattr(adapter, "check_batch"):
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
) -> ProxyResult:
    """Both first-order proxies for `layers` (one forward and one backward per probe per batch, all layers at
    once): gain = E[||J||_F^2 ||dX||^2], aligned = E[||J dX||^2], per channel and bit in `bits` (no 16).

    errors: a cache of `_errors(info, bits, wcfg)` by layer name, filled here (the clip search is not free).
    on_step: called with no argument after each batch (progress reports; may raise to stop the run)."""
    errs = errors if errors is not None else {}
    for info in layers:
        if info.name not in errs:
            errs[info.name] = _errors(info, bits, wcfg)
    nq = len(bits)
    gain = {info.name: torch.zeros(info.out_features, nq, dtype=torch.float64) for info in layers}
    aligned = {info.name: torch.zeros(info.out_features, nq, dtype=torch.float64) for info in layers}
    alive = {info.name: False for info in layers}
    n_total = 0
    probe_kind = "exact"
    bar = tqdm(total=len(data), desc="proxy", unit="batch", disable=not progress, leave=False)
    try:
        for i, prep in enumerate(data):
            B = prep.size
            st = {
                info.name: {
                    "errsq": torch.zeros(B, info.out_features, nq, device=adapter.device),
                    "inner": torch.zeros(B, info.out_features, nq, device=adapter.device),
                    "aligned": torch.zeros(B, info.out_features, nq, device=adapter.device),
                    "gsq": torch.zeros(B, info.out_features, device=adapter.device),
                }
                for info in layers
            }
            weight = [1.0]

            def make_grad_hook(info, x, output, B=B, st=st, weight=weight):
                s = st[info.name]
                with torch.no_grad():
                    p = _output_errors(info, x.detach(), errs[info.name], B).float()  # [nq, B, T, out]
                    s["errsq"] += p.pow(2).sum(2).permute(1, 2, 0)

                def on_grad(g):
                    g = _channel_last(info, g.detach(), B).float()
                    s["gsq"].add_(g.pow(2).sum(1), alpha=weight[0])
                    s["inner"] += torch.einsum("btc,qbtc->bcq", g, p)

                return on_grad

            with output_gradients(adapter.model, layers, make_grad_hook):
                actions = adapter.actions(prep.batch, prep.noise)
                probes = list(_probes(actions.shape, max_exact_dims, n_probes, seed + 7919 * i, actions))
                if len(probes) > 0 and math.prod(actions.shape[1:]) > max_exact_dims:
                    probe_kind = f"random({n_probes})"
                for j, (v, w) in enumerate(probes):
                    weight[0] = w
                    for s in st.values():
                        s["inner"].zero_()
                    torch.autograd.backward(actions, v, retain_graph=j < len(probes) - 1)
                    for s in st.values():
                        s["aligned"].add_(s["inner"].pow(2), alpha=w)
                del actions
            for info in layers:
                s = st[info.name]
                gain[info.name] += (s["gsq"][:, :, None] * s["errsq"]).sum(0).double().cpu()
                aligned[info.name] += s["aligned"].sum(0).double().cpu()
                alive[info.name] = alive[info.name] or bool(s["gsq"].ne(0).any())
            n_total += B
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
) -> torch.Tensor:
    """Eq. 4 for (row, bit) `jobs` of one layer: [len(jobs)] float64, the mean over all calibration samples.

    errors: this layer's `_errors(info, bits, wcfg)` if already computed (rows of every bit in `bits`).
    prefixes: the adapter's unperturbed prefixes, reused when the layer is downstream of the prefix (None: every
    pass recomputes the whole policy).
    on_step: called with no argument after each pass (progress reports; may raise to stop the run)."""
    if not jobs:
        return torch.zeros(0, dtype=torch.float64)
    references = references or _References(adapter)
    used = sorted({b for _, b in jobs})
    if errors is not None:
        errs = {b: errors[list(bits).index(b)] for b in used}
    else:
        errs = dict(zip(used, _errors(info, used, wcfg)))
    rows = torch.tensor([r for r, _ in jobs], device=adapter.device)
    out = torch.zeros(len(jobs), dtype=torch.float64)
    n_samples = sum(p.size for p in data)
    if prefixes is not None and not adapter.downstream_of_prefix(info.name):
        prefixes = None  # the layer feeds the prefix: its perturbation changes it
    chunks = range(0, len(jobs), channels_per_pass)
    for start in tqdm(chunks, desc=info.name, unit="pass", disable=not progress, leave=False):
        chunk = jobs[start : start + channels_per_pass]
        k = len(chunk)
        chunk_rows = rows[start : start + k]
        row_errors = torch.stack([errs[b][r] for r, b in chunk])
        total = torch.zeros(k, dtype=torch.float64)
        for i, prep in enumerate(data):
            prefix = None if prefixes is None else prefixes.get(i, prep, k)
            ref = references.get(i, prep, k, prefix)
            total += _squared_deviations(adapter, prep, ref, info, chunk_rows, row_errors, prefix).sum(1).cpu()
        out[start : start + k] = total / n_samples
        if on_step is not None:
            on_step()
    return out


def brute_force_sensitivity(
    adapter: PolicyAdapter, batches: Sequence[Batch], layer: str, row: int, bits: int, wcfg=None, seed: int = 0
) -> float:
    """Eq. 4 by copying the weight (for tests): quantize one row in place, run, restore."""
    wcfg = wcfg or WeightQuantConfig()
    module = dict(adapter.model.named_modules())[layer]
    data = _prepare(adapter, batches, seed)
    total, n = 0.0, 0
    original = module.weight.detach().clone()
    try:
        with torch.no_grad():
            refs = [adapter.actions(p.batch, p.noise) for p in data]
            dW = row_quantization_error(module.weight, bits, wcfg).reshape(module.weight.shape[0], -1)[row]
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
) -> dict[str, torch.Tensor]:
    """S = E_episode [ sum_t ||A_t(channel quantized) - A_t|| ] (Eq. 5), under teacher forcing.

    episodes: an iterable of episodes, each an iterable of batches holding consecutive time steps of that episode
    (one or more steps per batch: every sample of an episode's batches is one t of the sum). The noise of the
    episode's j-th batch is `make_noise(size, seed + j)`, the same for every episode and every channel.
    jobs: layer name -> (row, bit) pairs. Returns layer name -> [len(jobs)] float64.
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
            used = sorted({b for _, b in layer_jobs})
            errs = dict(zip(used, _errors(info, used, wcfg)))
            for start in range(0, len(layer_jobs), channels_per_pass):
                chunk = list(layer_jobs[start : start + channels_per_pass])
                k = len(chunk)
                rows = torch.tensor([r for r, _ in chunk], device=adapter.device)
                row_errors = torch.stack([errs[b][r] for r, b in chunk])
                for i, prep in enumerate(data):
                    sq = _squared_deviations(adapter, prep, references.get(i, prep, k), info, rows, row_errors)
                    sums[name][start : start + k] += sq.sqrt().sum(1).cpu()
        n_episodes += 1
    if n_episodes == 0:
        raise ValueError("cumulative_sensitivity: no episodes given")
    return {name: s / n_episodes for name, s in sums.items()}


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
# The on-disk store
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class SensitivityStore:
    """A directory: index.json (config, fingerprints, layer metadata, progress flags, report) + one safetensors file
    per layer (proxy_gain, proxy_aligned, exact; [out, len(bits)] float64). Every write is atomic (write + rename),
    so an interrupted run leaves a consistent store that `calibrate` resumes at the next unfinished layer."""

    INDEX = "index.json"

    def __init__(self, directory):
        self.directory = Path(directory)

    @property
    def index_path(self) -> Path:
        return self.directory / self.INDEX

    def exists(self) -> bool:
        return self.index_path.is_file()

    def read_index(self) -> dict:
        try:
            index = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{str(self.directory)!r} is not a sensitivity store (no {self.INDEX}); run calibrate first"
            ) from None
        except ValueError as e:
            raise ValueError(f"{self.index_path}: not valid JSON ({e})") from None
        if index.get("format_version") != SENSITIVITY_FORMAT_VERSION:
            raise ValueError(
                f"{self.index_path}: sensitivity format {index.get('format_version')!r} is not supported "
                f"(expects {SENSITIVITY_FORMAT_VERSION}); re-run calibrate"
            )
        return index

    def write_index(self, index: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.index_path, json.dumps(index, indent=1).encode())

    def _layer_file(self, index: dict, name: str) -> Path:
        return self.directory / "layers" / index["layers"][name]["file"]

    def write_layer(self, index: dict, layer: LayerSensitivity) -> None:
        from safetensors.torch import save

        tensors = {}
        for key in ("proxy_gain", "proxy_aligned", "exact"):
            t = getattr(layer, key)
            if t is not None:
                tensors[key] = t.double().contiguous()
        path = self._layer_file(index, layer.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, save(tensors, metadata={"name": layer.name}))

    def read_layer(self, index: dict, name: str) -> LayerSensitivity:
        from safetensors.torch import load

        meta = index["layers"][name]
        path = self._layer_file(index, name)
        tensors = load(path.read_bytes()) if path.is_file() else {}
        return LayerSensitivity(
            name,
            meta["role"],
            meta["kind"],
            meta["out_features"],
            meta["fan_in"],
            proxy_gain=tensors.get("proxy_gain"),
            proxy_aligned=tensors.get("proxy_aligned"),
            exact=tensors.get("exact"),
            dead=bool(meta.get("dead", False)),
        )

    @staticmethod
    def layer_entries(names: Sequence[str]) -> dict:
        return {name: {"file": f"{i:05d}.safetensors"} for i, name in enumerate(names)}

    def write_all(self, sens: Sensitivity) -> None:
        index = {
            "format_version": SENSITIVITY_FORMAT_VERSION,
            "complete": True,
            "bits": list(sens.bits),
            "proxy": sens.proxy,
            # what a resumed run is compared against, and the full settings
            "config": CalibrationConfig.from_dict(sens.config).result_key() if sens.config else {},
            "calibration_config": sens.config,
            "data": sens.report.get("data_fingerprint"),
            "probes": sens.report.get("probes", "none"),
            "times": {
                "proxy_s": sens.report.get("time_s", {}).get("proxy", 0.0),
                "exact_s": sens.report.get("time_s", {}).get("exact", 0.0),
            },
            "fingerprint": sens.fingerprint,
            "adapter": sens.adapter_config,
            "dead_layers": list(sens.dead_layers),
            "other_layers": sens.other_layers,
            "proxy_scale": {str(b): s for b, s in sens.proxy_scale.items()},
            "report": sens.report,
            "layers": {},
        }
        entries = self.layer_entries(list(sens.layers))
        for name, layer in sens.layers.items():
            index["layers"][name] = {**entries[name], **layer.meta(), "proxy_done": True, "exact_done": True}
        for layer in sens.layers.values():
            self.write_layer(index, layer)
        self.write_index(index)

    def read(self) -> Sensitivity:
        index = self.read_index()
        if not index.get("complete"):
            done = sum(1 for m in index["layers"].values() if m.get("exact_done"))
            raise ValueError(
                f"the calibration in {str(self.directory)!r} is not finished ({done} of {len(index['layers'])} "
                "layers done); run calibrate again with the same arguments to resume it"
            )
        layers = {name: self.read_layer(index, name) for name in index["layers"]}
        return Sensitivity(
            bits=tuple(index["bits"]),
            layers=layers,
            proxy=index.get("proxy", "aligned"),
            dead_layers=list(index.get("dead_layers", [])),
            other_layers=dict(index.get("other_layers", {})),
            proxy_scale={int(b): float(s) for b, s in index.get("proxy_scale", {}).items()},
            report=index.get("report", {}),
            config=index.get("calibration_config", {}),
            fingerprint=index.get("fingerprint", {}),
            adapter_config=index.get("adapter"),
        )


# ---------------------------------------------------------------------------------------------------------------
# The calibration run
def _model_fingerprint(model) -> dict:
    from qvla_quant.artifact import model_fingerprint  # artifact imports torch-heavy runtime modules: lazily

    return dict(model_fingerprint(model))


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


def calibrate_sensitivity(
    adapter: PolicyAdapter, batches: Iterable[Batch], config: CalibrationConfig, *, on_progress=None
) -> Sensitivity:
    """The whole calibration (see the module docstring); `qvla_quant.calibrate` is the public entry point.

    on_progress(stage, done, total): called as the work advances, stage "proxy" (batches of every proxy group)
    or "exact" (forward passes of every layer still to measure); it may raise to stop the run, which then resumes
    from the store (`store_dir`) like any interrupted one."""
    started = time.perf_counter()
    batches = list(batches)
    data = _prepare(adapter, batches, config.seed)
    bits = config.bits
    qbits = config.quantized_bits
    qcols = [bits.index(b) for b in qbits]
    all_layers = adapter.layers()
    template = config.template
    auto, others = [], {}
    for info in all_layers:
        rule, why = template.explain(info.name, info.role)
        if rule == "auto":
            auto.append(info)
        else:  # recorded so that an allocation can fix them at some bits or tell that they were never measured
            others[info.name] = {
                "role": info.role, "kind": info.kind, "out_features": info.out_features,
                "fan_in": info.fan_in, "rule": rule, "why": why,
            }  # fmt: skip
    if not auto:
        raise ValueError("calibrate: no layer has rule 'auto' in the template; nothing to measure")
    known_dead = set(adapter.known_dead_layers())

    header = {
        "format_version": SENSITIVITY_FORMAT_VERSION,
        "complete": False,
        "bits": list(bits),
        "proxy": config.proxy,
        "config": config.result_key(),
        "fingerprint": _model_fingerprint(adapter.model),
        "data": data_fingerprint(batches),
        "adapter": adapter.config_dict(),
        "other_layers": others,
        "layers": SensitivityStore.layer_entries([info.name for info in auto]),
        "times": {"proxy_s": 0.0, "exact_s": 0.0},
    }
    for info in auto:
        header["layers"][info.name].update(
            role=info.role, kind=info.kind, out_features=info.out_features, fan_in=info.fan_in,
            dead=info.name in known_dead, proxy_done=False, exact_done=False,
        )  # fmt: skip
    store = SensitivityStore(config.store_dir) if config.store_dir else None
    index = header
    results = {
        info.name: LayerSensitivity(info.name, info.role, info.kind, info.out_features, info.fan_in) for info in auto
    }
    if store is not None and store.exists():
        index = store.read_index()
        for key in ("bits", "config", "fingerprint", "data", "layers"):
            old = index.get(key)
            new = header.get(key)
            if key == "layers":
                old = {n: m["file"] for n, m in (old or {}).items()}
                new = {n: m["file"] for n, m in new.items()}
            if old != new:
                raise ValueError(
                    f"the sensitivity store {str(store.directory)!r} was written for a different {key} "
                    f"({'model' if key == 'fingerprint' else 'calibration data' if key == 'data' else key}); "
                    "resume only with the same policy, data and settings, or give a new store directory"
                )
        for name in results:
            if index["layers"][name].get("proxy_done") or index["layers"][name].get("exact_done"):
                results[name] = store.read_layer(index, name)
    elif store is not None:
        store.write_index(index)

    def save_layer(name: str, **flags):
        index["layers"][name].update(flags)
        index["layers"][name]["dead"] = results[name].dead
        if store is not None:
            store.write_layer(index, results[name])
            store.write_index(index)

    # ---- stage 1: the proxy, in groups of layers bounded by weight count
    error_cache: dict[str, torch.Tensor] = {}  # dW per layer, reused by the exact stage while it fits
    use_proxy = config.method in ("two_stage", "proxy")
    probes = index.get("probes", "none")
    if use_proxy:
        pending = [info for info in auto if not index["layers"][info.name].get("proxy_done")]
        groups, current, size = [], [], 0
        for info in pending:
            if current and size + info.n_weights > config.proxy_group_weights:
                groups.append(current)
                current, size = [], 0
            current.append(info)
            size += info.n_weights
        if current:
            groups.append(current)
        proxy_steps = {"done": 0, "total": len(groups) * len(data)}

        def proxy_step():
            proxy_steps["done"] += 1
            if on_progress is not None:
                on_progress("proxy", proxy_steps["done"], proxy_steps["total"])

        for group in tqdm(groups, desc="proxy groups", disable=not config.progress or len(groups) < 2):
            t0 = time.perf_counter()
            if len(groups) > 1:
                error_cache.clear()  # keep at most one group's quantization errors in memory
            res = proxy_sensitivity(
                adapter, data, group, qbits, config.weight,
                max_exact_dims=config.max_exact_dims, n_probes=config.n_probes, seed=config.seed,
                progress=config.progress, errors=error_cache, on_step=proxy_step,
            )  # fmt: skip
            probes = index["probes"] = res.probes
            index["times"]["proxy_s"] += time.perf_counter() - t0
            for info in group:
                layer = results[info.name]
                for key, table in (("proxy_gain", res.gain), ("proxy_aligned", res.aligned)):
                    full = torch.zeros(info.out_features, len(bits), dtype=torch.float64)
                    full[:, qcols] = table[info.name]
                    setattr(layer, key, full)
                layer.dead = layer.dead or info.name in res.dead
                save_layer(info.name, proxy_done=True)
    else:
        # dead layers without a proxy: one gradient probe per batch (dead = dead on every batch)
        pending = [info for info in auto if not index["layers"][info.name].get("exact_done")]
        if pending:
            dead_sets = [set(adapter.dead_layers(p.batch, seed=config.seed + i)) for i, p in enumerate(data)]
            for info in pending:
                results[info.name].dead = results[info.name].dead or all(info.name in d for d in dead_sets)

    # ---- stage 2: exact passes
    live = [info for info in auto if not results[info.name].dead]
    counts = {info.name: info.out_features for info in live}
    if config.method == "exact":
        top = {info.name: {(r, q) for r in range(info.out_features) for q in range(len(qbits))} for info in live}
        sample = {info.name: set() for info in live}
    else:
        ranking = {info.name: getattr(results[info.name], f"proxy_{config.proxy}")[:, qcols] for info in live}
        n_top = math.ceil(config.exact_fraction * sum(counts.values())) if config.method == "two_stage" else 0
        top, sample = _select_jobs(ranking, counts, len(qbits), n_top, config.rank_sample, config.seed)
    measure = _whole_rows(top, sample, len(qbits))
    references = _References(adapter)
    prefixes = _Prefixes(adapter) if config.prefix_cache else None
    todo = [info for info in auto if not index["layers"][info.name].get("exact_done")]
    exact_steps = {"done": 0, "total": sum(
        math.ceil(len(measure.get(i.name, set())) / config.channels_per_pass)
        for i in todo if not results[i.name].dead
    )}  # fmt: skip

    def exact_step():
        exact_steps["done"] += 1
        if on_progress is not None:
            on_progress("exact", exact_steps["done"], exact_steps["total"])

    for info in tqdm(todo, desc="exact", unit="layer", disable=not config.progress):
        layer = results[info.name]
        exact = torch.full((info.out_features, len(bits)), float("nan"), dtype=torch.float64)
        exact[:, bits.index(KEEP_BITS)] = 0.0
        jobs = sorted(measure.get(info.name, set()))
        if layer.dead:
            exact[:, qcols] = 0.0  # dead: exactly zero, nothing to measure
        elif jobs:
            t0 = time.perf_counter()
            values = exact_sensitivity(
                adapter, data, info, [(r, qbits[q]) for r, q in jobs], qbits, config.weight,
                channels_per_pass=config.channels_per_pass, references=references, progress=config.progress,
                errors=error_cache.pop(info.name, None), on_step=exact_step, prefixes=prefixes,
            )  # fmt: skip
            index["times"]["exact_s"] += time.perf_counter() - t0
            for (r, q), v in zip(jobs, values.tolist()):
                exact[r, qcols[q]] = v
        layer.exact = exact
        save_layer(info.name, exact_done=True)

    # ---- the report, the scale of the proxy, the result
    dead = [info.name for info in auto if results[info.name].dead]
    sens = Sensitivity(
        bits=bits,
        layers=results,
        proxy=config.proxy,
        dead_layers=dead,
        other_layers=others,
        config=config.to_dict(),
        fingerprint=index["fingerprint"],
        adapter_config=index["adapter"],
    )
    fit_on = "none"
    if use_proxy:
        # the random sample's rows; without one (rank_sample=0) only the top rows exist, and the fit is biased
        fit_rows = {n: {r for r, _ in pairs} for n, pairs in sample.items()}
        fit_on = "random sample" if any(fit_rows.values()) else "top (no random sample: biased)"
        if not any(fit_rows.values()):
            fit_rows = {n: {r for r, _ in pairs} for n, pairs in measure.items()}
        sens.proxy_scale = _fit_proxy_scale(sens, qbits, fit_rows)
    sens.report = _report(sens, sample, top, qbits, index["times"], probes, time.perf_counter() - started)
    sens.report["n_exact_rows"] = sum(len({r for r, _ in v}) for v in measure.values())
    sens.report["n_exact_jobs"] = sum(len(v) for v in measure.values())
    sens.report["proxy_scale_fit"] = fit_on
    sens.report["data_fingerprint"] = index["data"]
    sens.report["n_samples"] = sum(p.size for p in data)
    if store is not None:
        store.write_all(sens)
    return sens


def _pairs(sens: Sensitivity, jobs: dict[str, set], qbits, key: str):
    """(exact, proxy, bit) triples for measured jobs."""
    out = []
    for name, pairs in jobs.items():
        layer = sens.layers[name]
        table = getattr(layer, key)
        for r, q in pairs:
            col = sens.bit_index(qbits[q])
            out.append((float(layer.exact[r, col]), float(table[r, col]), qbits[q]))
    return out


def _whole_rows(top: dict[str, set], sample: dict[str, set], nq: int) -> dict[str, set[tuple[int, int]]]:
    """Every (row, bit column) of each row that `top` or `sample` picks at some bit: rows are measured whole."""
    out = {}
    for name in set(top) | set(sample):
        rows = {r for r, _ in top.get(name, set()) | sample.get(name, set())}
        out[name] = {(r, q) for r in rows for q in range(nq)}
    return out


def _fit_proxy_scale(sens: Sensitivity, qbits, rows: dict[str, set[int]] | None = None) -> dict[int, float]:
    """Per bit: exp(median(log(exact / proxy))) over the channels of `rows` (layer -> row indices; None: every
    channel) measured both ways (1.0 when none). Give it the random sample's rows: the proxy's top picks are
    selected for a high proxy, so their exact/proxy ratio is biased low."""
    scale = {}
    for b in qbits:
        col = sens.bit_index(b)
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
        scale[b] = float(r.median().exp()) if r.numel() else 1.0
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
            for b in qbits:
                sub = [t for t in triples if t[2] == b]
                entry[str(b)] = spearman([t[0] for t in sub], [t[1] for t in sub])
            rank[key] = entry
        report["rank_correlation"] = rank
        finite = {k: v["all"] for k, v in rank.items() if not math.isnan(v["all"])}
        report["better_proxy"] = max(finite, key=finite.get) if finite else None
    return report
