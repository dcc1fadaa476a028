"""Measured sensitivities as plain, inspectable, versioned data, and the directory they are stored in. Produced by
`calibrate` (`qvla_quant.sensitivity`, which measures them), consumed by `allocate` (`qvla_quant.allocation`,
which needs only these types, not the algorithm).

A `Sensitivity` holds, for every calibrated layer, one `LayerSensitivity`: tables [out_features, len(choices)]
float64 of the action-space sensitivity of each output row (channel) at each measured row choice, the column of 16
bits being 0. A layer has up to three tables: the two first-order proxies ("gain", "aligned") and the exact values
(NaN where a row was not measured exactly). `Sensitivity.values` combines them into the one table an allocation
reads.

Columns (`Sensitivity.choices`, `column_choices`): the per-row bit-widths `bits` (ascending, 16 included), then,
when the calibration had a `group_size`, the grouped variant of each of them in GROUPED_BITS ("2g", "4g", ...,
ascending). Appending keeps every per-row column where it was: `bit_index(b)` is still the column of b, and a
store without groups is exactly what it was.

The store is a directory:

    index.json               format version, the settings and fingerprints a resumed run must match, per layer
                             its metadata, its file and progress flags (proxy_done, exact_done), and once the run
                             is complete ("complete": true) the proxy scale and the report; with grouped columns
                             also "group_size" and the column labels ("choices")
    layers/00000.safetensors one file per layer, in calibration order: proxy_gain, proxy_aligned, exact (the
                             tables a layer has), metadata {"name": layer name}

Every file is written atomically (write + rename): an interrupted run leaves a consistent store, which `calibrate`
resumes at the next unfinished layer. `Sensitivity.save` writes the same format, complete.

Format versions: 2 (whole rows exact, proxy scale fitted on the random sample) for stores without grouped columns,
so that they stay readable by older qvla_quant and unchanged; 3 for stores with grouped columns (an older reader
would misread their wider tables, so it refuses them by the version). Both are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qvla_quant.config import CalibrationConfig
from qvla_quant.layers import LayerDesc
from qvla_quant.quantizer import GROUPED_BITS, KEEP_BITS, RowChoice, check_group_size, n_groups

SENSITIVITY_FORMAT_VERSION = 3  # the newest: 3 = 2 + grouped columns; stores without them are written as 2
READ_FORMAT_VERSIONS: tuple[int, ...] = (2, 3)
TABLES = ("proxy_gain", "proxy_aligned", "exact")  # a layer's tables, as named in its file


def store_format_version(group_size: int | None) -> int:
    """The format a store is written as: 2 without grouped columns (what it always was), 3 with them."""
    return 2 if group_size is None else 3


def column_choices(bits: Sequence[int], group_size: int | None = None) -> tuple[RowChoice, ...]:
    """The columns of a sensitivity table (module docstring): RowChoice(b) for each of `bits` (ascending), then,
    with a group size, RowChoice(b, True) for each of them in GROUPED_BITS."""
    check_group_size(group_size)
    bits = sorted({int(b) for b in bits})
    grouped = [RowChoice(b, True) for b in bits if b in GROUPED_BITS] if group_size is not None else []
    return tuple(RowChoice(b) for b in bits) + tuple(grouped)


def proxy_scale_key(choice: RowChoice) -> int | str:
    """The key of a column in `Sensitivity.proxy_scale`: the bit-width (int) of a per-row column, as it always was,
    the label ("4g") of a grouped one."""
    return choice.label if choice.grouped else choice.bits


def _scale_key_from_text(text: str) -> int | str:
    return text if text.endswith("g") else int(text)


@dataclass
class LayerSensitivity(LayerDesc):
    """Measurements of one layer; every tensor is [out_features, len(choices)] float64, column of 16 bits = 0.

    exact: NaN where not measured. proxy_gain / proxy_aligned: None when the proxy did not run.
    """

    proxy_gain: torch.Tensor | None = None
    proxy_aligned: torch.Tensor | None = None
    exact: torch.Tensor | None = None
    dead: bool = False

    def meta(self) -> dict:
        return {**self.desc_dict(), "dead": self.dead}


@dataclass
class Sensitivity:
    """Per-layer, per-channel, per-bit action sensitivities of one policy on one calibration set.

    `values(name)` is what the allocation uses, row by row: exact when the row was measured exactly at every
    column, else the ranking proxy times its per-column scale (`proxy_scale`, keyed by `proxy_scale_key`) at every
    column (a row never mixes the two), 0 for dead layers and for 16 bits. `other_layers`: the policy's layers that
    were not measured (template rule "skip" or fixed bits) with their shapes and rule. `group_size`: the group size
    of the grouped columns (None: none; see `choices`).
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
    group_size: int | None = None

    @property
    def choices(self) -> tuple[RowChoice, ...]:
        """The row choice of every column, in column order (module docstring)."""
        return column_choices(self.bits, self.group_size)

    def bit_index(self, bits: int) -> int:
        """The column of the per-row choice at `bits`."""
        try:
            return self.bits.index(int(bits))
        except ValueError:
            raise ValueError(f"no sensitivity was measured for {bits} bits (measured: {self.bits})") from None

    def choice_index(self, choice: RowChoice | str | int) -> int:
        """The column of a row choice (a RowChoice, or a label such as "4" or "4g")."""
        c = choice if isinstance(choice, RowChoice) else RowChoice.parse(choice)
        try:
            return self.choices.index(c)
        except ValueError:
            measured = [x.label for x in self.choices]
            raise ValueError(f"no sensitivity was measured for row choice {c.label!r} (measured: {measured})") from None

    def values(self, name: str) -> torch.Tensor:
        layer = self.layers[name]
        choices = self.choices
        shape = (layer.out_features, len(choices))
        if layer.dead:
            return torch.zeros(shape, dtype=torch.float64)
        for key in TABLES:
            t = getattr(layer, key)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name}: {key} table has shape {tuple(t.shape)}, expected {shape} (one column per "
                                 f"choice {[c.label for c in choices]})")  # fmt: skip
        proxy = layer.proxy_aligned if self.proxy == "aligned" else layer.proxy_gain
        out = torch.full(shape, float("nan"), dtype=torch.float64)
        if proxy is not None:
            scale = [self.proxy_scale.get(proxy_scale_key(c), 1.0) for c in choices]
            out = proxy.double() * torch.tensor(scale, dtype=torch.float64)
        if layer.exact is not None:
            keep = self.bit_index(KEEP_BITS)
            quantized = [i for i in range(len(choices)) if i != keep]
            whole = torch.isfinite(layer.exact[:, quantized]).all(1)  # rows measured exactly at every bit
            if proxy is None:  # method "exact": nothing to fall back to, a NaN below says what is missing
                whole = torch.ones_like(whole)
            out = torch.where(whole[:, None], layer.exact.double(), out)
        out[:, self.bit_index(KEEP_BITS)] = 0.0
        if self.group_size is not None and n_groups(layer.fan_in, self.group_size) == 1:
            # rows in one group: a grouped column is the per-row row itself; the same value (not another column's
            # proxy scale)
            for j, c in enumerate(choices):
                if c.grouped:
                    out[:, j] = out[:, self.bit_index(c.bits)]
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
# The on-disk store
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _result_key(config: dict) -> dict:
    """The settings of a stored calibration config that change the numbers (`CalibrationConfig.result_key`)."""
    return CalibrationConfig.from_dict(config).result_key()


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
        version = index.get("format_version")
        if version not in READ_FORMAT_VERSIONS:
            raise ValueError(
                f"{self.index_path}: sensitivity format {version!r} is not supported "
                f"(reads {', '.join(map(str, READ_FORMAT_VERSIONS))}); re-run calibrate"
            )
        if (version == 3) != (index.get("group_size") is not None):
            raise ValueError(f"{self.index_path}: sensitivity format {version} with group_size "
                             f"{index.get('group_size')!r}: format 3 is the one with grouped columns")  # fmt: skip
        return index

    def write_index(self, index: dict) -> None:
        """The one place index.json is written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.index_path, json.dumps(index, indent=1).encode())

    def _layer_file(self, index: dict, name: str) -> Path:
        return self.directory / "layers" / index["layers"][name]["file"]

    def write_layer(self, index: dict, layer: LayerSensitivity) -> None:
        from safetensors.torch import save

        tensors = {}
        for key in TABLES:
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
        """The complete store of `sens`: every layer file, then the index (complete)."""
        index = {
            "format_version": store_format_version(sens.group_size),
            "complete": True,
            "bits": list(sens.bits),
            **grouped_index_entries(sens.bits, sens.group_size),
            "proxy": sens.proxy,
            # what a resumed run is compared against, and the full settings
            "config": _result_key(sens.config) if sens.config else {},
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
            proxy_scale={_scale_key_from_text(b): float(s) for b, s in index.get("proxy_scale", {}).items()},
            report=index.get("report", {}),
            config=index.get("calibration_config", {}),
            fingerprint=index.get("fingerprint", {}),
            adapter_config=index.get("adapter"),
            group_size=index.get("group_size"),
        )


def grouped_index_entries(bits: Sequence[int], group_size: int | None) -> dict:
    """The index keys of grouped columns: none without a group size (the index of a format-2 store), else
    "group_size" and the column labels "choices" (for a reader of the index; the columns follow from the two)."""
    if group_size is None:
        return {}
    return {"group_size": int(group_size), "choices": [c.label for c in column_choices(bits, group_size)]}
