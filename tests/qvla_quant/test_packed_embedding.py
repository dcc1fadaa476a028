"""Packed token embeddings: lookups equal the reference rows exactly, sizes follow the formula, tied and unsupported
tables are refused, π0's unused expert table can go without changing a bit of the chunk, and artifacts (new and
old) load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvla_quant import packed_embedding
from qvla_quant.adapters.pi0 import EXPERT_EMBEDDING, VLM_EMBEDDING, Pi0Adapter, example_batch, tiny_pi0_config
from qvla_quant.artifact import (
    ARTIFACT_FILE,
    TENSORS_FILE,
    ArtifactError,
    artifact_summary,
    load_artifact,
    read_plan,
    save_artifact,
)
from qvla_quant.baselines import uniform_plan
from qvla_quant.config import WeightQuantConfig
from qvla_quant.fingerprint import model_fingerprint, model_structure
from qvla_quant.packed_embedding import (
    DroppedEmbedding,
    PackedEmbedding,
    embedding_plans,
    embedding_row_bytes,
    planned_embeddings,
    predicted_embedding_bytes,
    source_fingerprint,
    source_structure,
)
from qvla_quant.plan import EmbeddingPlan, LayerPlan, Plan
from qvla_quant.quantizer import code_bytes, fake_quantize_rows
from qvla_quant.transforms import fake_quantize_model, quantize_model

DATA = Path(__file__).resolve().parent / "data"
CLIP = WeightQuantConfig(clip_grid=4)  # a real clip search, kept cheap


def table(v: int = 300, d: int = 37, dtype=torch.float32, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    emb = nn.Embedding(v, d, padding_idx=0)
    with torch.no_grad():
        emb.weight.mul_(torch.linspace(0.01, 3.0, v)[:, None])  # rows of very different ranges
    return emb.to(dtype)


# ---- the module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4, 6, 3, 2])
def test_lookups_equal_the_reference_dequantized_rows_exactly(bits, dtype, monkeypatch):
    emb = table(dtype=dtype)
    ids = torch.tensor([[0, 5, 5, 299], [17, 1, 298, 0]])
    ref_table = fake_quantize_rows(emb.weight.detach(), bits, CLIP)  # the whole table at once
    monkeypatch.setattr(packed_embedding, "QUANTIZE_BLOCK_BYTES", 4 * 37 * 64)  # 64 rows per block: 5 blocks
    packed = PackedEmbedding.from_float(emb, bits, CLIP)
    out = packed(ids)
    assert out.dtype == dtype and out.shape == (2, 4, 37)
    assert torch.equal(out, F.embedding(ids, ref_table))
    assert torch.equal(packed.dequantized_weight(), ref_table)  # blocks quantize exactly like the whole table
    assert packed.weight.is_meta and packed.weight.dtype == dtype and packed.weight.shape == (300, 37)
    packed.validate()


def test_only_the_looked_up_rows_are_dequantized(monkeypatch):
    packed = PackedEmbedding.from_float(table(v=5000, d=64), 4)
    seen = []
    real = packed_embedding.dequantize_rows

    def spy(codes, scale, zero, *args):
        seen.append(tuple(codes.shape))
        return real(codes, scale, zero, *args)

    monkeypatch.setattr(packed_embedding, "dequantize_rows", spy)
    packed(torch.tensor([[3, 4000, 3]]))
    assert seen == [(3, 64)]  # three rows of a 5000-row table


def test_kept_rows_are_exact_and_bad_ids_raise():
    bf16 = table(dtype=torch.bfloat16)
    ids = torch.arange(300).reshape(3, 100)
    assert torch.equal(PackedEmbedding.from_float(bf16, 16)(ids), bf16(ids))  # bit-exact in the source dtype
    fp32 = table()
    kept = PackedEmbedding.from_float(fp32, 16)
    assert kept.kept.dtype == torch.bfloat16
    assert torch.equal(kept(ids), fp32.weight.detach().bfloat16().float()[ids])  # fp32: rounded once to bf16
    packed = PackedEmbedding.from_float(fp32, 8)
    assert packed(torch.tensor(7)).shape == (37,)  # a 0-d id, as PaliGemma's placeholder check looks one up
    for bad in (-1, 300):
        with pytest.raises(IndexError):
            packed(torch.tensor([1, bad]))


@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2, 16])
def test_sizes_are_as_predicted(bits):
    for d in (2048, 37):
        emb = table(v=64, d=d, dtype=torch.bfloat16)
        packed = PackedEmbedding.from_float(emb, bits)
        ep = EmbeddingPlan("e", "other", 64, d, bits)
        row = code_bytes(d, bits) + 5 if bits != 16 else 2 * d  # codes + fp32 scale + uint8 zero, no row index
        assert packed.weight_bytes() == predicted_embedding_bytes(ep, torch.bfloat16) == 64 * row
        assert embedding_row_bytes(d, bits, torch.bfloat16) == row
    assert PackedEmbedding.from_float(table(v=64, d=2048), 4).stored_bits_per_weight() == 4 + 40 / 2048
    assert predicted_embedding_bytes(EmbeddingPlan("e", "other", 64, 2048, 0), torch.bfloat16) == 0


def test_a_cast_changes_what_lookups_return_not_the_format():
    packed = PackedEmbedding.from_float(table(), 4)
    ids = torch.tensor([1, 2])
    before = packed(ids)
    packed.to(torch.float16)
    assert packed.scale.dtype == torch.float32 and packed.weight.dtype == torch.float16
    assert torch.equal(packed(ids), before.half())
    kept = PackedEmbedding.from_float(table(dtype=torch.bfloat16), 16).float()
    assert kept.kept.dtype == torch.bfloat16 and kept(ids).dtype == torch.float32


# ---- what can be packed


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.other = nn.Embedding(40, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as an lm_head usually is


class Scaled(nn.Embedding):  # a subclass with its own forward: not something a lookup can stand in for
    def forward(self, ids):
        return super().forward(ids) * 2


def test_tied_and_unsupported_tables_are_refused_and_kept_float():
    model = TiedLM()
    plan = Plan({}, embeddings={"embed": EmbeddingPlan("embed", "language", 50, 16, 4)})
    with pytest.raises(ValueError, match=r"'embed': its weight is tied to \['head.weight'\].*stays float"):
        quantize_model(model, plan)
    assert isinstance(model.embed, nn.Embedding) and model.head.weight is model.embed.weight  # nothing changed
    plans, kept_float = embedding_plans(model, {"re:.*": 8})
    assert set(plans) == {"other"} and "tied to ['head.weight']" in kept_float["embed"]

    for bad, why in ((nn.Embedding(40, 16, max_norm=1.0), "max_norm"), (Scaled(40, 16), "its own forward")):
        model.other = bad
        with pytest.raises(ValueError, match=why):
            planned_embeddings(model, Plan({}, embeddings={"other": EmbeddingPlan("other", "other", 40, 16, 8)}))
    model.other = nn.Embedding(40, 16)
    with pytest.raises(ValueError, match=r"expects a 41 x 16 table, the model has \(40, 16\)"):
        planned_embeddings(model, Plan({}, embeddings={"other": EmbeddingPlan("other", "other", 41, 16, 8)}))
    with pytest.raises(ValueError, match="bits must be one of"):
        EmbeddingPlan("other", "other", 40, 16, 5)


def test_plans_without_embeddings_keep_their_dictionary_and_hash():
    layer = LayerPlan("fc", "language", "linear", 2, 8, [4, 8])
    plain = Plan({"fc": layer})
    assert "embeddings" not in plain.to_dict() and plain.to_dict()["format_version"] == 1
    with_table = dataclasses.replace(plain, embeddings={"e": EmbeddingPlan("e", "language", 10, 8, 4)})
    assert with_table.to_dict()["format_version"] == 1 and with_table.hash() != plain.hash()  # an optional key
    back = Plan.from_json(with_table.to_json())
    assert back.embeddings == with_table.embeddings and back.hash() == with_table.hash()
    assert Plan.from_json(plain.to_json()).hash() == plain.hash()


# ---- π0


def tiny_pi0(dtype=torch.float32):
    from transformers import PI0ForConditionalGeneration

    torch.manual_seed(0)
    return Pi0Adapter(PI0ForConditionalGeneration(tiny_pi0_config()).to(dtype).eval())


def quantized_layers(adapter) -> list:
    return [i for i in adapter.layers() if i.role in ("vision", "language", "action")]


def test_the_expert_table_is_never_read_and_dropping_it_changes_no_bit():
    adapter = tiny_pi0()
    batch = example_batch(adapter.model.config, 2)
    before = adapter.predict(batch)
    assert adapter.unused_embeddings() == [EXPERT_EMBEDDING]
    # a stand-in that raises on any lookup: sampling never calls it
    adapter.model.model.dit.embed_tokens = DroppedEmbedding.replacing(
        EXPERT_EMBEDDING, adapter.model.model.dit.embed_tokens
    )
    assert torch.equal(adapter.predict(batch), before)
    with pytest.raises(RuntimeError, match="was not stored"):
        adapter.model.model.dit.embed_tokens(torch.tensor([1]))

    # the same W8 plan with and without the dropped table: bit-identical chunks
    a, b = tiny_pi0(), tiny_pi0()
    plan = uniform_plan(quantized_layers(a), 8)
    quantize_model(a.model, plan)
    quantize_model(b.model, dataclasses.replace(plan, embeddings=b.embedding_plans(None)))
    assert isinstance(b.model.model.dit.embed_tokens, DroppedEmbedding)
    assert isinstance(b.model.model.vlm.language_model.embed_tokens, nn.Embedding)  # None: left float
    assert torch.equal(a.predict(batch), b.predict(batch))


def test_a_16_bit_table_of_a_bf16_policy_changes_no_bit():
    adapter = tiny_pi0(torch.bfloat16)
    batch = example_batch(adapter.model.config, 2)
    before = adapter.predict(batch)
    plan = Plan({}, embeddings=adapter.embedding_plans(16))
    quantize_model(adapter.model, plan)
    assert isinstance(adapter.model.model.vlm.language_model.embed_tokens, PackedEmbedding)
    assert adapter.dtype == torch.bfloat16  # read through the packed table's meta stand-in
    assert torch.equal(adapter.predict(batch), before)


def test_packed_tables_in_an_artifact(tmp_path):
    from qvla_quant.api import load, save

    adapter = tiny_pi0()
    batch = example_batch(adapter.model.config, 2)
    float_structure = model_structure(adapter.model)
    source = model_fingerprint(adapter.model)
    plan = dataclasses.replace(uniform_plan(quantized_layers(adapter), 4, quant=None),
                               embeddings=adapter.embedding_plans(4))  # fmt: skip
    reference = fake_quantize_model(adapter.model, plan)  # the float reference, tables as looked up
    quantize_model(adapter.model, plan)
    assert source_structure(adapter.model) == float_structure  # packed and dropped tables report what they replaced
    assert source_fingerprint(adapter.model) == source
    chunk = adapter.predict(batch)
    ref_chunk = Pi0Adapter(reference).predict(batch)
    assert (chunk - ref_chunk).abs().max() <= 1e-4 * ref_chunk.abs().max()
    table = adapter.model.model.vlm.language_model.embed_tokens
    ref_table = reference.model.vlm.language_model.embed_tokens
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == adapter.model.config.vlm_config.image_token_id, 0)
    assert torch.equal(table(ids), ref_table(ids))  # the looked-up rows exactly

    save(tmp_path, adapter, plan)
    stored = json.loads((tmp_path / ARTIFACT_FILE).read_text())
    assert stored["format_version"] == 3  # what an older qvla_quant refuses (it reads 1 and 2)
    from safetensors import safe_open

    with safe_open(str(tmp_path / TENSORS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith(EXPERT_EMBEDDING) for k in keys)  # the dead table is not stored at all
    assert {f"{VLM_EMBEDDING}.{b}" for b in ("qweight", "scale", "zero", "kept")} <= keys
    assert f"{VLM_EMBEDDING}.weight" not in keys
    assert read_plan(tmp_path).embeddings == plan.embeddings
    summary = artifact_summary(tmp_path)
    v, d = 300, 64
    assert summary["embedding_format_version"] == 1
    assert summary["embeddings"][VLM_EMBEDDING]["bytes_after"] == v * (d // 2 + 5)
    assert summary["embeddings"][EXPERT_EMBEDDING]["bytes_after"] == 0
    assert summary["embedding_bytes_before"] == 4 * v * (64 + 32)
    float_bytes = sum(p.numel() * p.element_size() for p in tiny_pi0().model.parameters())
    assert summary["parameter_bytes_before"] == float_bytes
    assert stored["source_fingerprint"] == source

    loaded = load(tmp_path)  # a meta skeleton from the stored config
    dit_table = loaded.model.model.dit.embed_tokens
    assert isinstance(dit_table, DroppedEmbedding) and not list(dit_table.buffers())  # nothing allocated
    assert isinstance(loaded.model.model.vlm.language_model.embed_tokens, PackedEmbedding)
    assert torch.equal(loaded.predict(batch), chunk)

    # a quantized model whose tables disagree with the plan is refused
    other = dataclasses.replace(plan, embeddings={**plan.embeddings,
                                                  VLM_EMBEDDING: dataclasses.replace(plan.embeddings[VLM_EMBEDDING],
                                                                                     bits=8)})  # fmt: skip
    with pytest.raises(ArtifactError, match=f"embedding '{VLM_EMBEDDING}' is stored at 4 bits"):
        save_artifact(tmp_path / "x", adapter.model, other)


def test_an_artifact_of_a_newer_embedding_format_is_refused(tmp_path):
    adapter = tiny_pi0()
    plan = dataclasses.replace(uniform_plan(quantized_layers(adapter), 8), embeddings=adapter.embedding_plans(8))
    save_artifact(tmp_path, adapter.model, plan)
    manifest = json.loads((tmp_path / ARTIFACT_FILE).read_text())
    manifest["summary"]["embedding_format_version"] = 99
    (tmp_path / ARTIFACT_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="packed embedding format version 99 is not supported"):
        load_artifact(tmp_path, tiny_pi0().model)


class Layout2Fixture(nn.Module):
    """The model of tests/qvla_quant/data/layout2 (as `test_groups.Fixture`)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 13, kernel_size=3, stride=3)
        self.fc1 = nn.Linear(13 * 4, 37)
        self.fc2 = nn.Linear(37, 11, bias=False)

    def forward(self, x):
        h = self.patch(x).flatten(1)
        return self.fc2(F.gelu(self.fc1(h)))


def test_old_artifacts_still_load_unchanged():
    """Artifacts written before packed embeddings (packed layout 2 here, format 1 for the committed π0) load with
    their outputs and tables as they were: no table is packed, the structure check still passes."""
    from safetensors.torch import load_file

    from qvla_quant.api import load

    directory = DATA / "layout2"
    expected = load_file(str(directory / "expected.safetensors"))
    with torch.device("meta"):
        skeleton = Layout2Fixture()
    loaded = load_artifact(directory, skeleton)
    assert torch.equal(loaded(expected["x"]), expected["y"])
    assert not read_plan(directory).embeddings and "embeddings" not in artifact_summary(directory)

    w4 = Path(__file__).resolve().parent / "data" / "sim_transfer_cube_w4_format1"  # an artifact from before tables
    policy = load(w4)
    assert not read_plan(w4).embeddings
    assert type(policy.model.model.vlm.language_model.embed_tokens).__name__ == "GemmaTextScaledWordEmbedding"
    assert not any(isinstance(m, (PackedEmbedding, DroppedEmbedding)) for m in policy.model.modules())
