"""Packed token embeddings: an nn.Embedding table stored as per-row integer codes, dequantized only where looked up.

A token embedding is a table of V rows (one per token id) of D values. In a VLA it is the largest single tensor
(π0: 257,152 x 2048 in the VLM, 15% of the whole bf16 model, plus a 257,152 x 1024 copy in the action expert) and
the cheapest to quantize at run time: a forward reads only the rows of the tokens it embeds (a few hundred), so
only those are ever dequantized. `Plan.embeddings` (`qvla_quant.plan.EmbeddingPlan`) names the tables to store
this way and their bit-width; `qvla_quant.transforms.quantize_model` builds the modules and
`qvla_quant.artifact` saves and loads them.

Storage layout, embedding format version 1 (every tensor is a buffer, so `state_dict()` and the artifact hold
exactly this; one bit-width b per table, so the row of token t is row t of each buffer and no index is stored)
---------------------------------------------------------------------------------------------------------------
    buffer    dtype        shape                          content
    qweight   uint8        [V, code_bytes(D, b)]          b in 8, 6, 4, 3, 2: row t = the codes of token t, bit plane
                                                          after bit plane, exactly as a row of `qvla_quant.packed`
    scale     float32      [V]                            per-row scale s
    zero      uint8        [V]                            per-row zero point z in [0, 2^b - 1]
    kept      kept dtype   [V, D]                         b = 16: the rows unquantized, in
                                                          `quantizer.kept_dtype(source dtype)` (a bf16 / fp16 table
                                                          as is, bit-exact; an fp32 one rounded to bf16)
Buffers a bit-width does not use are empty (0 rows), so the names never depend on the plan. A table that
`Plan.embeddings` gives 0 bits is not stored at all: it becomes a `DroppedEmbedding`, which holds no tensor and
raises if it is ever called. That is only for a table the model provably never reads: π0's action expert is
always called with `inputs_embeds`, so its own `embed_tokens` is dead weight (`Pi0Adapter.unused_embeddings`).

Bytes per row (`embedding_row_bytes`; `PackedEmbedding.weight_bytes()` measures the same):
    b in 2, 3, 4, 6, 8:   code_bytes(D, b) + 5          (codes + 4 fp32 scale + 1 uint8 zero; no row index)
    b = 16:               D * itemsize(kept dtype)
    b = 0:                0
so a quantized table stores b + 40 / D bits per weight (+ the padding of each plane's last byte): 4.0195 at D = 2048.

Lookup (`forward`): the codes, scales and zero points of the requested ids are gathered (`index_select`, which
refuses ids outside [0, V) as nn.Embedding does) and dequantized exactly as the reference does,

    w[t, k] = (q[t, k] - z[t]) * s[t]     in fp32 (`quantizer.dequantize_rows`), then cast to the source dtype,

so a lookup equals `fake_quantize_rows(weight, b)[ids]` bit for bit (tests). Kept rows are returned in the source
dtype (exact). Quantizing the rows of a table at once or in blocks gives the same codes (every row has its own
range and clip search), so `from_float` works in blocks of `QUANTIZE_BLOCK_BYTES` of fp32 to bound its memory.

Which modules: an nn.Embedding whose forward is nn.Embedding's, without max_norm (max_norm renormalizes the table
in place at lookup, which codes cannot do), and the scaled word embeddings of Gemma / Gemma 3
(`SCALED_EMBEDDING_CLASSES`: nn.Embedding's lookup times a non-persistent `embed_scale` buffer cast to the table's
dtype; the packed module keeps that buffer and multiplies the same way). Any other subclass has its own forward,
which a replacement would silently change: it is refused with its class named.

Tied tables. A table whose weight is shared with another module (an lm_head tied to the input embedding, or one
embedding module registered under two names) is refused by `planned_embeddings` with the partner named:
quantizing it alone would untie them and change what the partner computes, and storing the partner from the same
codes would need a packed layer that shares buffers. Leave such a table out of `Plan.embeddings`: it stays float,
shared exactly as before. `embedding_plans` (which builds the plan entries from name rules) skips tied tables and
says so in what it returns.

Model structure. A PackedEmbedding or DroppedEmbedding reports the weight it replaced (`weight_shape`,
`source_dtype`, and a meta-device `weight` for code that reads `.weight.dtype`), so `source_structure` and
`source_fingerprint` of a quantized model equal those of its float source, as `qvla_quant.fingerprint` does for
packed layers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch
from torch import nn

from qvla_quant.config import WeightQuantConfig
from qvla_quant.fingerprint import FINGERPRINT_ALGORITHM, dtype_name, model_fingerprint, model_structure
from qvla_quant.packed import SOURCE_FINGERPRINT_ATTR, PackedLinear, pack_codes, unpack_codes
from qvla_quant.plan import EmbeddingPlan, Plan
from qvla_quant.quantizer import (
    KEEP_BITS,
    PRUNE_BITS,
    QUANTIZED_BITS,
    SCALE_BYTES,
    SCALE_DTYPE,
    ZERO_BYTES,
    ZERO_DTYPE,
    code_bytes,
    dequantize_rows,
    kept_dtype,
    quantize_rows,
)
from qvla_quant.roles import NameRules

EMBEDDING_FORMAT_VERSION = 1
EMBEDDING_READ_VERSIONS: tuple[int, ...] = (1,)
EMBEDDING_ROW_OVERHEAD_BYTES = SCALE_BYTES + ZERO_BYTES  # fp32 scale + uint8 zero per quantized row
# rows quantized at a time by `from_float`: 16 MiB of fp32 (the clip search holds a few temporaries of that size),
# instead of several fp32 copies of a whole 1 GB table
QUANTIZE_BLOCK_BYTES = 16 << 20
# nn.Embedding subclasses whose forward is `nn.Embedding.forward(ids) * self.embed_scale.to(self.weight.dtype)`
# (read in transformers 5.24); by qualified name, so that transformers is not imported here
SCALED_EMBEDDING_CLASSES: frozenset[str] = frozenset({
    "transformers.models.gemma.modeling_gemma.GemmaTextScaledWordEmbedding",
    "transformers.models.gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding",
})  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# which modules, and their sizes


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def embedding_kind(module: nn.Module) -> str:
    """How `module` looks tokens up: "plain" (nn.Embedding's own forward) or "scaled" (`SCALED_EMBEDDING_CLASSES`);
    ValueError saying why any other module cannot be stored as a PackedEmbedding."""
    if isinstance(module, (PackedEmbedding, DroppedEmbedding)):
        raise ValueError("it is already a packed embedding: quantize the float model, not a quantized one")
    if not isinstance(module, nn.Embedding):
        raise ValueError(f"it is a {type(module).__name__}, not an nn.Embedding")
    if module.max_norm is not None:
        raise ValueError(
            f"it has max_norm={module.max_norm}: nn.Embedding renormalizes those rows in place at every lookup, "
            "which stored codes cannot do. Leave it out of plan.embeddings"
        )
    if type(module).forward is nn.Embedding.forward:
        return "plain"
    if _qualname(type(module)) in SCALED_EMBEDDING_CLASSES and isinstance(
        module._buffers.get("embed_scale"), torch.Tensor
    ):
        return "scaled"
    raise ValueError(
        f"it is a {_qualname(type(module))} with its own forward(); replacing it would change what it computes "
        f"(known: nn.Embedding and {sorted(SCALED_EMBEDDING_CLASSES)}). Leave it out of plan.embeddings"
    )


def embedding_row_bytes(embedding_dim: int, bits: int, source_dtype: torch.dtype) -> int:
    """Stored bytes of one row of D = `embedding_dim` values at `bits` (see the module docstring's byte table)."""
    if bits == PRUNE_BITS:
        return 0
    if bits == KEEP_BITS:
        return embedding_dim * kept_dtype(source_dtype).itemsize
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"embedding bits must be 0, 16 or one of {QUANTIZED_BITS}, got {bits}")
    return code_bytes(embedding_dim, bits) + EMBEDDING_ROW_OVERHEAD_BYTES


def predicted_embedding_bytes(ep: EmbeddingPlan, source_dtype: torch.dtype) -> int:
    """Bytes a table of plan entry `ep` takes in the artifact (equals `PackedEmbedding.weight_bytes()`; 0 when
    dropped)."""
    return ep.num_embeddings * embedding_row_bytes(ep.embedding_dim, ep.bits, source_dtype)


def _meta_weight(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------------------------------------------------------
# the modules


class PackedEmbedding(nn.Module):
    """An nn.Embedding table stored at `bits` per value (2, 3, 4, 6, 8 with per-row fp32 scales and uint8 zero
    points, or 16 kept), looked up and dequantized row by row (see the module docstring for the layout).

    Build it with `from_float`, or with the constructor (empty buffers, e.g. on the meta device, to be filled by
    `load_state_dict(..., assign=True)`). `dtype`: the source table's dtype (what lookups return). `embed_scale`:
    the source module's scale buffer for a "scaled" embedding (None for a plain one), kept as a non-persistent
    buffer like the source's.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        *,
        dtype: torch.dtype = torch.float32,
        padding_idx: int | None = None,
        embed_scale: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if bits not in (*QUANTIZED_BITS, KEEP_BITS):
            raise ValueError(
                f"PackedEmbedding bits must be one of {(*QUANTIZED_BITS, KEEP_BITS)}, got {bits!r} "
                "(0 bits: the table is not stored, see DroppedEmbedding)"
            )
        self.num_embeddings, self.embedding_dim, self.bits = int(num_embeddings), int(embedding_dim), int(bits)
        self.padding_idx = padding_idx  # kept for code that reads it; a lookup does not depend on it
        self._source_dtype = dtype
        v, d = self.num_embeddings, self.embedding_dim
        quantized = v if bits != KEEP_BITS else 0
        factory = {"device": device}
        self.register_buffer("qweight", torch.empty(quantized, code_bytes(d, bits) if quantized else 0,
                                                    dtype=torch.uint8, **factory))  # fmt: skip
        self.register_buffer("scale", torch.empty(quantized, dtype=SCALE_DTYPE, **factory))
        self.register_buffer("zero", torch.empty(quantized, dtype=ZERO_DTYPE, **factory))
        self.register_buffer("kept", torch.empty(v - quantized, d, dtype=kept_dtype(dtype), **factory))
        self.scaled = embed_scale is not None
        if self.scaled:
            # non-persistent, like the source's: the artifact stores it with the other non-persistent buffers
            self.register_buffer("embed_scale", embed_scale.detach().to(device=device), persistent=False)

    @classmethod
    def from_float(cls, module: nn.Embedding, bits: int, config: WeightQuantConfig | None = None) -> PackedEmbedding:
        """Quantize the table of `module` (an nn.Embedding `embedding_kind` accepts) with every row at `bits`,
        in blocks of rows (`QUANTIZE_BLOCK_BYTES`); same codes as quantizing the whole table at once."""
        try:
            kind = embedding_kind(module)
        except ValueError as e:
            raise ValueError(f"PackedEmbedding.from_float: {e}") from None
        weight = module.weight.detach()
        if weight.is_meta:
            raise ValueError("cannot quantize an embedding whose table is on the meta device: load its weights first")
        v, d = weight.shape
        packed = cls(
            v, d, bits, dtype=weight.dtype, padding_idx=module.padding_idx,
            embed_scale=module.embed_scale if kind == "scaled" else None, device=weight.device,
        )  # fmt: skip
        config = config or WeightQuantConfig()
        with torch.no_grad():
            if bits == KEEP_BITS:
                packed.kept.copy_(weight)  # rounds an fp32 table to bf16, as fake_quantize_rows(rows, 16) does
            else:
                block = max(1, QUANTIZE_BLOCK_BYTES // (4 * d))
                for r0 in range(0, v, block):
                    r1 = min(r0 + block, v)
                    codes, scale, zero = quantize_rows(weight[r0:r1], bits, config)
                    packed.qweight[r0:r1] = pack_codes(codes, bits)
                    packed.scale[r0:r1] = scale
                    packed.zero[r0:r1] = zero
        return packed

    # ---- introspection
    @property
    def source_dtype(self) -> torch.dtype:
        return self._source_dtype

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """A data-free stand-in for the replaced table: right shape and dtype, on the meta device (model code reads
        `embed_tokens.weight.dtype`); arithmetic with it fails loudly. The table is `dequantized_weight()`."""
        return _meta_weight(self.weight_shape, self.source_dtype)

    def weight_bytes(self) -> int:
        """Bytes stored for the table: codes + scales + zero points + kept rows (`embedding_row_bytes` x V)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero, self.kept))

    def stored_bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes() / (self.num_embeddings * self.embedding_dim)

    def validate(self) -> None:
        """Check that the buffers are a consistent table (after loading from a file)."""
        v, d, b = self.num_embeddings, self.embedding_dim, self.bits
        quantized = v if b != KEEP_BITS else 0
        want = {
            "qweight": (quantized, code_bytes(d, b) if quantized else 0), "scale": (quantized,),
            "zero": (quantized,), "kept": (v - quantized, d),
        }  # fmt: skip
        problems = [f"{n} has shape {tuple(getattr(self, n).shape)}, expected {s}" for n, s in want.items()
                    if tuple(getattr(self, n).shape) != s]  # fmt: skip
        if not problems and quantized and not self.scale.is_meta:
            if not bool(torch.isfinite(self.scale).all() and (self.scale > 0).all()):
                problems.append("scales that are not finite and positive")
            if int(self.zero.max()) > (1 << b) - 1:
                problems.append(f"zero points above {(1 << b) - 1}")
        if problems:
            raise ValueError(f"inconsistent packed embedding ({v} x {d} at {b} bits): " + "; ".join(problems))

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, scaled={self.scaled}, "
            f"weight_bytes={self.weight_bytes()} ({self.stored_bits_per_weight():.4f} bits per weight)"
        )

    # ---- lookup
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows of the 1-D token ids `ids` [N] -> [N, D] in the source dtype (the lookup without
        the embedding scale)."""
        ids = ids.to(self.qweight.device)
        if self.bits == KEEP_BITS:
            return self.kept.index_select(0, ids).to(self.source_dtype)
        codes = unpack_codes(self.qweight.index_select(0, ids), self.bits, self.embedding_dim)
        w = dequantize_rows(codes, self.scale.index_select(0, ids), self.zero.index_select(0, ids))
        return w.to(self.source_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.rows(input_ids.reshape(-1)).reshape(*input_ids.shape, self.embedding_dim)
        if self.scaled:  # what GemmaTextScaledWordEmbedding.forward does after the lookup
            out = out * self.embed_scale.to(self.source_dtype)
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The whole table [V, D] as lookups see it (before the embedding scale), in the source dtype."""
        return self.rows(torch.arange(self.num_embeddings, device=self.qweight.device))

    def _apply(self, fn, recurse=True):
        # like PackedLinear: `.half()` / `.to(dtype)` change the source dtype (what lookups return) but not the
        # stored format (fp32 scales; 16-bit kept rows stay 16-bit under a cast to a wider dtype), and such a cast
        # never rounds them: the buffers from before the cast are put back, on the new device
        scale_before, kept_before = self.scale, self.kept
        super()._apply(fn, recurse)
        new_source = fn(torch.empty(0, dtype=self._source_dtype)).dtype
        if new_source.is_floating_point:
            self._source_dtype = new_source
        for name, before, cast in (
            ("scale", scale_before, self.scale.dtype != SCALE_DTYPE),
            ("kept", kept_before, kept_before.itemsize == 2 < self.kept.dtype.itemsize),
        ):
            if cast:  # fp32 scales through fp16 and back would lose their low bits
                now = self._buffers[name]
                self._buffers[name] = (now.to(before.dtype) if before.is_meta or now.is_meta
                                       else before.to(now.device))  # fmt: skip
        return self


class DroppedEmbedding(nn.Module):
    """Stands in for a table that is not stored (plan bits 0): holds no tensor, reports the replaced weight's shape
    and dtype (`weight` on the meta device), and raises if anything looks a token up in it."""

    def __init__(self, name: str, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype,
                 padding_idx: int | None = None):  # fmt: skip
        super().__init__()
        self.name = name
        self.num_embeddings, self.embedding_dim, self.padding_idx = int(num_embeddings), int(embedding_dim), padding_idx
        self._source_dtype = dtype

    @classmethod
    def replacing(cls, name: str, module: nn.Embedding) -> DroppedEmbedding:
        return cls(name, module.num_embeddings, module.embedding_dim, dtype=module.weight.dtype,
                   padding_idx=module.padding_idx)  # fmt: skip

    @property
    def source_dtype(self) -> torch.dtype:
        return self._source_dtype

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        return _meta_weight(self.weight_shape, self.source_dtype)

    def weight_bytes(self) -> int:
        return 0

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        new_source = fn(torch.empty(0, dtype=self._source_dtype)).dtype
        if new_source.is_floating_point:
            self._source_dtype = new_source
        return self

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"embedding {self.name!r} ({self.num_embeddings} x {self.embedding_dim}) was not stored: the plan gives "
            "it 0 bits because the model was said never to read it (e.g. π0's action expert, which receives "
            "inputs_embeds). This call reads it: quantize again with this table in plan.embeddings at 8, 4 or 16 "
            "bits, or left out of plan.embeddings (then it stays float)"
        )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, not stored"


EMBEDDING_MODULES = (PackedEmbedding, DroppedEmbedding)


def embedding_modules(model: nn.Module) -> list[tuple[str, PackedEmbedding | DroppedEmbedding]]:
    """(name, module) of every packed or dropped embedding of `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EMBEDDING_MODULES)]


def build_embedding(ep: EmbeddingPlan, module: nn.Embedding, *, device="meta") -> PackedEmbedding | DroppedEmbedding:
    """The empty replacement of float `module` that plan entry `ep` describes (what a loader fills): a
    PackedEmbedding on `device`, or a DroppedEmbedding for 0 bits."""
    if ep.bits == PRUNE_BITS:
        return DroppedEmbedding.replacing(ep.name, module)
    scale = module.embed_scale if embedding_kind(module) == "scaled" else None
    return PackedEmbedding(ep.num_embeddings, ep.embedding_dim, ep.bits, dtype=module.weight.dtype,
                           padding_idx=module.padding_idx, embed_scale=scale, device=device)  # fmt: skip


def pack_embedding(ep: EmbeddingPlan, module: nn.Embedding, config: WeightQuantConfig | None = None):
    """The filled replacement of float `module` for plan entry `ep`: PackedEmbedding.from_float, or a
    DroppedEmbedding for 0 bits."""
    if ep.bits == PRUNE_BITS:
        return DroppedEmbedding.replacing(ep.name, module)
    return PackedEmbedding.from_float(module, ep.bits, config)


# ---------------------------------------------------------------------------------------------------------------
# ties, plan entries, resolution


def _param_key(p: torch.Tensor):
    return id(p) if p.is_meta else (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.dtype)


def tied_names(model: nn.Module, name: str) -> list[str]:
    """Other parameter names of `model` that share the weight of module `name` (the same Parameter, or the same
    storage at the same view): an lm_head tied to the embedding, or the module registered under another name."""
    weight = model.get_submodule(name).weight
    key, own = _param_key(weight), f"{name}.weight"
    return [n for n, p in model.named_parameters(remove_duplicate=False) if n != own and _param_key(p) == key]


def planned_embeddings(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Module, str, nn.Module, EmbeddingPlan]]:
    """Resolve and check every entry of `plan.embeddings` in `model`: (name, parent, attribute, module, entry).

    All problems are reported at once, before anything is changed: a missing module, a module that is not a
    supported embedding (`embedding_kind`), another shape than the plan's, a name that is also a planned layer, and
    a table tied to another parameter (see the module docstring: such a table stays float).
    """
    resolved, problems = [], []
    for name, ep in plan.embeddings.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name!r}: no such module in the model")
            continue
        try:
            embedding_kind(module)
        except ValueError as e:
            problems.append(f"{name!r}: {e}")
            continue
        if name in plan.layers:
            problems.append(f"{name!r} is in plan.layers and plan.embeddings: it is one or the other")
            continue
        if tuple(module.weight.shape) != (ep.num_embeddings, ep.embedding_dim):
            problems.append(
                f"{name!r}: the plan expects a {ep.num_embeddings} x {ep.embedding_dim} table, the model has "
                f"{tuple(module.weight.shape)}; the plan was made for a different model"
            )
            continue
        tied = tied_names(model, name)
        if tied:
            problems.append(
                f"{name!r}: its weight is tied to {tied}; quantizing the table alone would untie them and change "
                "what they compute. Leave it out of plan.embeddings: it stays float, shared as before"
            )
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        resolved.append((name, parent, attr, module, ep))
    if problems:
        raise ValueError(
            f"plan.embeddings does not fit this model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    return resolved


def embedding_plans(
    model: nn.Module, rules: dict[str, int], *, role_of: Callable[[str], str] | None = None
) -> tuple[dict[str, EmbeddingPlan], dict[str, str]]:
    """Plan entries for the embeddings of `model` that `rules` name ({exact name or "re:pattern": bits}, resolved
    with `qvla_quant.roles.NameRules` precedence; bits 0 = not stored), and {name: why} for the matched tables that
    stay float (tied to another parameter, or a module kind that cannot be packed). `role_of`: a layer name -> role
    function (an adapter's `role_of`), else "other"."""
    name_rules = NameRules(rules)
    plans, kept_float = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding):
            continue
        bits = name_rules.resolve(name)
        if bits is None:
            continue
        try:
            embedding_kind(module)
        except ValueError as e:
            kept_float[name] = str(e)
            continue
        tied = tied_names(model, name)
        if tied:
            kept_float[name] = f"tied to {tied}: stays float"
            continue
        v, d = module.weight.shape
        plans[name] = EmbeddingPlan(name, role_of(name) if role_of else "other", v, d, int(bits))
    return plans, kept_float


# ---------------------------------------------------------------------------------------------------------------
# the source model's structure and fingerprint, seen through packed embeddings


def source_structure(model: nn.Module) -> list[list]:
    """`fingerprint.model_structure` of the source model, also when some tables are packed or dropped (they report
    the weight they replaced): equal for the float model, its quantized model and an empty skeleton."""
    entries = list(model_structure(model))
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, EMBEDDING_MODULES):
            weight = f"{name}.weight" if name else "weight"
            entries.append([weight, list(mod.weight_shape), dtype_name(mod.source_dtype)])
    return sorted(entries, key=lambda e: e[0])


def source_fingerprint(model: nn.Module) -> dict:
    """`fingerprint.model_fingerprint`, also for a model with packed or dropped tables: the fingerprint recorded at
    quantization when its structure matches (`source_structure`), else one without weights."""
    if not any(isinstance(m, EMBEDDING_MODULES) for m in model.modules()):
        return model_fingerprint(model)
    entries = source_structure(model)
    structure = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    recorded = getattr(model, SOURCE_FINGERPRINT_ATTR, None)
    if isinstance(recorded, dict) and recorded.get("structure") == structure:
        return dict(recorded)
    n_params = sum(int(torch.Size(shape).numel()) for _, shape, _ in entries)
    return {"structure": structure, "weights": None, "n_tensors": len(entries), "n_parameters": n_params,
            "weights_algorithm": FINGERPRINT_ALGORITHM}  # fmt: skip


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds any packed layer or packed / dropped embedding."""
    return any(isinstance(m, (PackedLinear, *EMBEDDING_MODULES)) for m in model.modules())


def embedding_summary(qmodel: nn.Module, plan: Plan) -> dict:
    """Per-table and total bytes of the planned embeddings of a quantized model (before: the source table in its
    dtype; after: as stored, 0 when dropped)."""
    mods = dict(embedding_modules(qmodel))
    per = {}
    for name, ep in plan.embeddings.items():
        m = mods[name]
        before = ep.n_weights * m.source_dtype.itemsize
        after = m.weight_bytes()
        per[name] = {
            "role": ep.role, "bits": ep.bits, "num_embeddings": ep.num_embeddings, "embedding_dim": ep.embedding_dim,
            "source_dtype": dtype_name(m.source_dtype), "bytes_before": before, "bytes_after": after,
            "bytes_planned": predicted_embedding_bytes(ep, m.source_dtype),
            "stored_bits_per_weight": 8.0 * after / ep.n_weights,
        }  # fmt: skip
    return {
        "embedding_format_version": EMBEDDING_FORMAT_VERSION,
        "embeddings": per,
        "embedding_bytes_before": sum(e["bytes_before"] for e in per.values()),
        "embedding_bytes_after": sum(e["bytes_after"] for e in per.values()),
    }
