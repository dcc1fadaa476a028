"""Artifact: save -> load gives the same model, on a fresh or a meta-device skeleton; bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qvla_quant.artifact import (
    ARTIFACT_FILE,
    PLAN_FILE,
    TENSORS_FILE,
    ArtifactError,
    artifact_summary,
    load_artifact,
    read_plan,
    save_artifact,
)
from qvla_quant.config import ActivationQuantConfig, QuantConfig
from qvla_quant.fingerprint import model_fingerprint
from qvla_quant.packed import PackedLinear, predicted_weight_bytes
from qvla_quant.plan import LayerPlan, Plan
from qvla_quant.transforms import quantize_model


class TinyPolicy(nn.Module):
    """Patch embedding + MLP + two tied heads (not quantized) + a non-persistent buffer, like real policies."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.fc1 = nn.Linear(16 * 4, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 24, bias=False)
        self.head_a = nn.Linear(24, 6)
        self.head_b = nn.Linear(24, 6)
        self.head_b.weight = self.head_a.weight  # tied
        self.register_buffer("offset", torch.linspace(-1, 1, 6), persistent=False)

    def forward(self, img):
        h = self.patch(img).flatten(1)
        h = self.fc2(torch.relu(self.norm(self.fc1(h))))
        return self.head_a(h) + self.head_b(h) + self.offset


def make_plan(model: TinyPolicy, act_bits: int = 16) -> Plan:
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, role in (("patch", "vision"), ("fc1", "language"), ("fc2", "action")):
        w = model.get_submodule(name).weight
        bits = torch.tensor([0, 2, 4, 8, 16])[torch.randint(0, 5, (w.shape[0],), generator=g)]
        layers[name] = LayerPlan(
            name, role, "conv" if w.dim() == 4 else "linear", w.shape[0], w[0].numel(), bits.tolist()
        )
    return Plan(layers, quant=QuantConfig(activation=ActivationQuantConfig(act_bits)), budget=6.0)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TinyPolicy()
    plan = make_plan(model)
    save_artifact(tmp_path, model, plan, model_config={"hidden": 32}, adapter="tiny", extra={"note": "test"})
    return tmp_path, model, plan


def test_save_load_identical_outputs(saved, monkeypatch):
    directory, model, plan = saved
    x = torch.randn(2, 3, 8, 8)
    expected = quantize_model(model, plan, inplace=False).eval()(x)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must never be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    torch.manual_seed(123)  # a fresh skeleton with other random weights
    loaded = load_artifact(directory, TinyPolicy())
    assert not loaded.training
    assert isinstance(loaded.fc1, PackedLinear) and isinstance(loaded.patch, PackedLinear)
    assert torch.equal(loaded(x), expected)

    with torch.device("meta"):
        skeleton = TinyPolicy()
    from_meta = load_artifact(directory, skeleton)
    assert torch.equal(from_meta.offset, torch.linspace(-1, 1, 6))  # non-persistent buffer restored
    assert torch.equal(from_meta(x), expected)
    assert torch.equal(from_meta.head_a.weight, from_meta.head_b.weight)
    with torch.device("meta"):
        skeleton = TinyPolicy()
    cached = load_artifact(directory, skeleton, cache_dequantized=True)  # other summation order: close, not equal
    assert (cached(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_files_and_summary(saved):
    directory, model, plan = saved
    assert {p.name for p in directory.iterdir()} == {PLAN_FILE, TENSORS_FILE, ARTIFACT_FILE, "config.json"}
    stored = read_plan(directory)
    assert stored.hash() == json.loads((directory / ARTIFACT_FILE).read_text())["plan_hash"]
    assert {n: lp.bits for n, lp in stored.layers.items()} == {n: lp.bits for n, lp in plan.layers.items()}
    assert stored.budget == 6.0 and stored.model_fingerprint  # filled in from the source model
    summary = artifact_summary(directory)
    assert summary["adapter"] == "tiny" and summary["layers"] == 3
    assert summary["average_bits"] == pytest.approx(plan.average_bits())
    assert set(summary["average_bits_by_role"]) == {"vision", "language", "action"}
    predicted = sum(predicted_weight_bytes(lp, torch.float32) for lp in plan.layers.values())
    assert summary["quantized_weight_bytes_after"] == predicted
    assert summary["quantized_weight_bytes_before"] == sum(4 * lp.n_weights for lp in plan.layers.values())
    assert summary["parameter_bytes_before"] == sum(4 * p.numel() for p in model.parameters())  # tied: once
    saved_bytes = summary["quantized_weight_bytes_before"] - summary["quantized_weight_bytes_after"]
    assert summary["parameter_bytes_before"] - summary["parameter_bytes_after"] == saved_bytes
    manifest = json.loads((directory / ARTIFACT_FILE).read_text())
    assert manifest["tied_tensors"] == {"head_b.weight": "head_a.weight"}
    assert manifest["model_config"] == {"hidden": 32} and manifest["extra"] == {"note": "test"}


def test_save_quantized_model_and_a8(tmp_path):
    torch.manual_seed(1)
    model = TinyPolicy()
    plan = make_plan(model, act_bits=8)
    qmodel = quantize_model(model, plan, inplace=False)
    save_artifact(tmp_path, qmodel, plan)
    assert model_fingerprint(qmodel)["weights"] == model_fingerprint(model)["weights"]  # recorded at quantization
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(load_artifact(tmp_path, TinyPolicy())(x), qmodel(x))
    other = make_plan(model)
    other.layers["fc1"].bits[0] = 16 if other.layers["fc1"].bits[0] != 16 else 8
    with pytest.raises(ArtifactError, match="'fc1' is packed with other row bit-widths"):
        save_artifact(tmp_path / "x", qmodel, other)


def test_fingerprint_structure_and_weights():
    torch.manual_seed(0)
    model = TinyPolicy()
    fp = model_fingerprint(model)
    with torch.device("meta"):
        meta_fp = model_fingerprint(TinyPolicy())
    assert meta_fp["structure"] == fp["structure"] and meta_fp["weights"] is None
    q_fp = model_fingerprint(quantize_model(model, make_plan(model), inplace=False))
    assert q_fp["structure"] == fp["structure"]
    with torch.no_grad():
        model.fc1.weight[0, 0] += 1.0
    assert model_fingerprint(model)["weights"] != fp["weights"]
    assert model_fingerprint(TinyPolicy(hidden=40))["structure"] != fp["structure"]


def test_mismatched_skeleton_is_refused(saved):
    directory, _, _ = saved
    with pytest.raises(ArtifactError) as e:
        load_artifact(directory, TinyPolicy(hidden=40))
    msg = str(e.value)
    assert "fc1.weight: skeleton float32 [40, 64], artifact float32 [32, 64]" in msg and "model_config" in msg

    class Missing(TinyPolicy):
        def __init__(self):
            super().__init__()
            del self.fc2

    with pytest.raises(ArtifactError, match="in the artifact but not in the skeleton \\(1\\): fc2.weight"):
        load_artifact(directory, Missing())
    with pytest.raises(ArtifactError, match="fc1.weight: skeleton bfloat16"):
        load_artifact(directory, TinyPolicy().to(torch.bfloat16))


def test_missing_and_corrupt_files(saved):
    directory, _, _ = saved
    plan_text = (directory / PLAN_FILE).read_text()
    tensors = (directory / TENSORS_FILE).read_bytes()

    (directory / PLAN_FILE).write_text("{ not json")
    with pytest.raises(ArtifactError, match="plan.json is not valid JSON"):
        load_artifact(directory, TinyPolicy())
    (directory / PLAN_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="plan.json: file not found"):
        read_plan(directory)
    edited = json.loads(plan_text)
    edited["layers"][1]["bits"][0] = 16 if edited["layers"][1]["bits"][0] != 16 else 8
    (directory / PLAN_FILE).write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="plan.json does not match .*artifact.json"):
        load_artifact(directory, TinyPolicy())
    (directory / PLAN_FILE).write_text(plan_text)

    (directory / TENSORS_FILE).write_bytes(tensors[: len(tensors) // 2])
    with pytest.raises(ArtifactError, match="model.safetensors does not have the checksum"):
        load_artifact(directory, TinyPolicy())
    with pytest.raises(ArtifactError, match="model.safetensors cannot be read as safetensors"):
        load_artifact(directory, TinyPolicy(), verify_checksum=False)
    (directory / TENSORS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="model.safetensors cannot be read as safetensors"):
        load_artifact(directory, TinyPolicy(), verify_checksum=False)
    flipped = bytearray(tensors)
    flipped[-1] ^= 0xFF  # a damaged weight byte: only the checksum can tell
    (directory / TENSORS_FILE).write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="damaged or replaced"):
        load_artifact(directory, TinyPolicy())
    (directory / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: file not found"):
        load_artifact(directory, TinyPolicy())
    (directory / TENSORS_FILE).write_bytes(tensors)
    assert isinstance(load_artifact(directory, TinyPolicy()).fc2, PackedLinear)

    with pytest.raises(FileNotFoundError, match="artifact.json: file not found"):
        load_artifact(directory / "nowhere", TinyPolicy())
    manifest = json.loads((directory / ARTIFACT_FILE).read_text())
    (directory / ARTIFACT_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        artifact_summary(directory)


def test_quantized_skeleton_is_refused(saved):
    directory, model, plan = saved
    with pytest.raises(ArtifactError, match="fresh float skeleton"):
        load_artifact(directory, quantize_model(TinyPolicy(), plan))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sequential_round_trip(tmp_path, dtype):
    def build():
        return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24), nn.LayerNorm(24), nn.Linear(24, 8)).to(
            dtype
        )

    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    plan = Plan(
        {
            n: LayerPlan(
                n,
                "language",
                "linear",
                m.out_features,
                m.in_features,
                torch.tensor([0, 2, 4, 8, 16])[torch.randint(0, 5, (m.out_features,), generator=g)].tolist(),
            )
            for n, m in model.named_children()
            if isinstance(m, nn.Linear)
        }
    )
    qmodel = quantize_model(model, plan, inplace=False)
    save_artifact(tmp_path, qmodel, plan)
    x = torch.randn(4, 16, dtype=dtype)
    with torch.device("meta"):
        skeleton = build()
    for fresh in (build(), skeleton):
        loaded = load_artifact(tmp_path, fresh)
        assert loaded[0].source_dtype == loaded[0].bias.dtype == dtype and loaded[1].__class__ is nn.GELU
        assert loaded[0].kept.dtype == (torch.bfloat16 if dtype == torch.float32 else dtype)  # 16-bit rows
        assert torch.equal(loaded(x), qmodel(x))


# ---- damaged tensors: named with the expected shapes, and never a pickle
def rewrite_tensors(directory, edit):
    """Rewrite model.safetensors with edit(tensors) and record its new checksum (a consistently edited artifact)."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = directory / TENSORS_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(edit(load_file(str(path))), str(path), metadata=metadata)
    manifest = json.loads((directory / ARTIFACT_FILE).read_text())
    manifest["tensors_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / ARTIFACT_FILE).write_text(json.dumps(manifest))


def test_a_missing_packed_tensor_is_named_with_its_expected_shape(saved):
    directory, _, _ = saved
    from safetensors.torch import load_file

    name = next(k for k in load_file(str(directory / TENSORS_FILE)) if k.startswith("fc1.qweight_"))
    shape = load_file(str(directory / TENSORS_FILE))[name].shape
    rewrite_tensors(directory, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ArtifactError) as e:
        load_artifact(directory, TinyPolicy())
    expected = f"missing (1): {name} uint8 [{', '.join(map(str, shape))}]"
    assert str(directory / TENSORS_FILE) in str(e.value) and expected in str(e.value), str(e.value)


def test_an_extra_packed_tensor_is_named_with_its_shape(saved):
    directory, _, _ = saved
    rewrite_tensors(directory, lambda t: {**t, "fc1.qweight_5": torch.zeros(2, 5, dtype=torch.uint8)})
    with pytest.raises(ArtifactError, match=r"unexpected \(1\): fc1.qweight_5 uint8 \[2, 5\]"):
        load_artifact(directory, TinyPolicy())


def test_a_packed_tensor_of_the_wrong_dtype_is_refused(saved):
    directory, _, _ = saved
    from safetensors.torch import load_file

    name = next(k for k in load_file(str(directory / TENSORS_FILE)) if k.startswith("fc1.scale_"))
    rewrite_tensors(directory, lambda t: {**t, name: t[name].double()})
    with pytest.raises(ArtifactError, match=f"{name}: file float64 .*, expected float32"):
        load_artifact(directory, TinyPolicy())


class _Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("verify_checksum", [True, False])
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_pickle_under_the_tensors_name_is_never_unpickled(saved, tmp_path_factory, kind, verify_checksum):
    import pickle

    directory, _, _ = saved
    marker = tmp_path_factory.mktemp("trap") / "unpickled"
    if kind == "pickle":
        (directory / TENSORS_FILE).write_bytes(pickle.dumps({"trap": _Trap(marker)}))
    else:
        torch.save({"trap": _Trap(marker)}, directory / TENSORS_FILE)
    with pytest.raises(ArtifactError, match="model.safetensors holds a .*pickle.* payload, not safetensors"):
        load_artifact(directory, TinyPolicy(), verify_checksum=verify_checksum)
    assert not marker.exists()


def test_a_pickle_weights_file_beside_the_artifact_is_refused(saved, tmp_path_factory):
    directory, _, _ = saved
    marker = tmp_path_factory.mktemp("trap") / "unpickled"
    torch.save({"trap": _Trap(marker)}, directory / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="pytorch_model.bin is a pickle-based weights file"):
        load_artifact(directory, TinyPolicy())
    assert not marker.exists()


# ---- issue 11: stored bytes == what the plan implies; format-1 artifacts; the full-byte fingerprint
def odd_model(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(37, 23), nn.GELU(), nn.Linear(23, 11, bias=False)).to(dtype)


def odd_plan(model: nn.Sequential) -> Plan:
    layers = {}
    for name, role in (("0", "language"), ("2", "action")):
        m = model.get_submodule(name)
        bits = ([0, 2, 4, 8, 16] * m.out_features)[: m.out_features]  # every bit-width, odd K and row counts
        layers[name] = LayerPlan(name, role, "linear", m.out_features, m.in_features, bits)
    return Plan(layers, budget=6.0)


def formula_bytes(lp: LayerPlan) -> int:
    """The documented formula: ceil(K b / 8) + 9 per quantized row, 2 K + 4 per kept row, 0 per pruned row."""
    k = lp.fan_in
    return sum({0: 0, 16: 2 * k + 4}.get(b, -(-k * b // 8) + 9) for b in lp.bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_summary_and_inspect_stored_bytes_match_the_plan(tmp_path, capsys, dtype):
    from qvla_quant.cli import main

    model = odd_model(dtype)
    plan = odd_plan(model)
    save_artifact(tmp_path, model, plan)
    summary = artifact_summary(tmp_path)
    expected = sum(formula_bytes(lp) for lp in plan.layers.values())
    assert summary["quantized_weight_bytes_after"] == summary["quantized_weight_bytes_planned"] == expected
    n = sum(lp.n_weights for lp in plan.layers.values())
    assert summary["average_bits_stored"] == pytest.approx(8 * expected / n)
    assert summary["overhead_bits_per_weight"] == pytest.approx(8 * expected / n - plan.average_bits())
    for role in ("language", "action"):
        lp = next(lp for lp in plan.layers.values() if lp.role == role)
        assert summary["overhead_bits_per_weight_by_role"][role] == pytest.approx(
            8 * formula_bytes(lp) / lp.n_weights - plan.average_bits(role)
        )
    name = str(dtype).removeprefix("torch.")
    assert summary["source_dtype"] == [name]
    assert summary["kept_dtype"] == ["bfloat16" if dtype == torch.float32 else name]
    assert summary["row_overhead_bytes"] == {"quantized": 9, "kept": 4, "pruned": 0}
    assert summary["quantized_weight_bytes_before"] == n * dtype.itemsize
    # the bytes the safetensors file holds for the packed weights are these bytes
    from safetensors import safe_open

    with safe_open(str(tmp_path / TENSORS_FILE), framework="pt") as f:
        stored = sum(
            f.get_tensor(k).numel() * f.get_tensor(k).element_size()
            for k in f.keys()
            if k.split(".")[-1].startswith(("qweight_", "scale_", "zero_", "kept", "row_index"))
        )
    assert stored == expected

    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"stored: quantized weights {expected:,} B" in out and f"plan-implied {expected:,} B: equal" in out
    assert f"{plan.average_bits():.4f} planned + {summary['overhead_bits_per_weight']:.4f} overhead" in out
    assert "+overhead" in out and f"+{summary['overhead_bits_per_weight']:.3f}" in out


def to_format_1(directory, source: nn.Module) -> None:
    """Rewrite a saved artifact into the layout older qvla_quant wrote (packed layout 1, artifact format 1): fp16
    scales and zero points, kept rows in the source dtype, sampled fingerprint, summary without the new fields."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from qvla_quant.fingerprint import LEGACY_FINGERPRINT_ALGORITHM

    path = directory / TENSORS_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata(), qvla_artifact_version="1", qvla_packed_version="1")
    tensors = load_file(str(path))
    plan = read_plan(directory)
    for name, lp in plan.layers.items():
        for b in (8, 4, 2):
            tensors[f"{name}.scale_{b}"] = tensors[f"{name}.scale_{b}"].half()
            tensors[f"{name}.zero_{b}"] = tensors[f"{name}.zero_{b}"].half()
        w = source.get_submodule(name).weight.detach().reshape(lp.out_features, -1)
        tensors[f"{name}.kept"] = w[torch.tensor(lp.bits) == 16].contiguous()  # the source rows, unrounded
    save_file(tensors, str(path), metadata=metadata)
    manifest = json.loads((directory / ARTIFACT_FILE).read_text())
    manifest.update(format_version=1, packed_format_version=1)
    manifest["tensors_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["source_fingerprint"] = model_fingerprint(source, algorithm=LEGACY_FINGERPRINT_ALGORITHM)
    for key in ("average_bits_stored", "overhead_bits_per_weight", "average_bits_stored_by_role",
                "overhead_bits_per_weight_by_role", "quantized_weight_bytes_planned", "packed_format_version",
                "source_dtype", "kept_dtype", "scale_dtype", "zero_dtype", "row_overhead_bytes"):  # fmt: skip
        manifest["summary"].pop(key)
    layer_bytes = {
        n: sum(tensors[f"{n}.{b}"].numel() * tensors[f"{n}.{b}"].element_size()
               for b in ("qweight_8", "qweight_4", "qweight_2", "scale_8", "scale_4", "scale_2", "zero_8", "zero_4",
                         "zero_2", "kept", "row_index"))
        for n in plan.layers
    }  # fmt: skip
    manifest["summary"]["quantized_weight_bytes_after"] = sum(layer_bytes.values())
    (directory / ARTIFACT_FILE).write_text(json.dumps(manifest))


def layout_1_weight(raw: dict, name: str, lp: LayerPlan) -> torch.Tensor:
    """What a layout-1 layer computes with, from its file tensors: (q - z) * s from the fp16 s and z, kept as is."""
    from qvla_quant.packed import unpack_codes

    ref = torch.zeros(lp.out_features, lp.fan_in)
    bits = torch.tensor(lp.bits)
    for b in (8, 4, 2):
        codes = unpack_codes(raw[f"{name}.qweight_{b}"], b, lp.fan_in).float()
        z, s = raw[f"{name}.zero_{b}"], raw[f"{name}.scale_{b}"]
        assert z.dtype == s.dtype == torch.float16
        ref[bits == b] = (codes - z.float()[:, None]) * s.float()[:, None]
    ref[bits == 16] = raw[f"{name}.kept"].float()
    return ref


def test_a_format_1_artifact_loads_with_its_own_outputs(tmp_path):
    from qvla_quant.transforms import repack_kept

    model = odd_model(torch.float32)
    plan = odd_plan(model)
    save_artifact(tmp_path, model, plan)
    to_format_1(tmp_path, model)
    summary = artifact_summary(tmp_path)
    assert summary["format_version"] == 1 and summary["packed_format_version"] == 1
    # layout 1: 8 bytes per quantized row, kept rows in fp32: what the file holds, now with its overhead reported
    assert summary["quantized_weight_bytes_planned"] == summary["quantized_weight_bytes_after"]
    assert summary["row_overhead_bytes"]["quantized"] == 8 and summary["kept_dtype"] == ["float32"]
    assert summary["overhead_bits_per_weight"] > 0

    loaded = load_artifact(tmp_path, odd_model(torch.float32))
    layer = loaded[0]
    assert layer.scale_4.dtype == torch.float32 and layer.zero_4.dtype == torch.uint8
    assert layer.kept.dtype == torch.float32  # as stored
    # its outputs are those of layout 1: (q - z) * s from the fp16 s and z, the kept rows unrounded
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / TENSORS_FILE))
    x = torch.randn(3, 37)
    ref = torch.nn.functional.linear(x, layout_1_weight(raw, "0", plan.layers["0"]), model[0].bias)
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(ref), layout_1_weight(raw, "2", plan.layers["2"]))
    assert (loaded(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name, lp in plan.layers.items():
        assert torch.equal(loaded.get_submodule(name).dequantized_weight(), layout_1_weight(raw, name, lp))

    with pytest.raises(ArtifactError, match="repack_kept"):  # re-saving it as layout 2 needs 16-bit kept rows
        save_artifact(tmp_path / "resaved", loaded, plan)
    assert repack_kept(loaded) == 2 and loaded[0].kept.dtype == torch.bfloat16
    save_artifact(tmp_path / "resaved", loaded, plan)
    assert artifact_summary(tmp_path / "resaved")["quantized_weight_bytes_after"] == sum(
        formula_bytes(lp) for lp in plan.layers.values()
    )

    # a layout-1 zero point that is not an integer code is refused, naming the tensor
    rewrite_tensors(tmp_path, lambda t: {**t, "0.zero_4": t["0.zero_4"] + 0.5})
    with pytest.raises(ArtifactError, match="0.zero_4 holds zero points that are not integers in \\[0, 15\\]"):
        load_artifact(tmp_path, odd_model(torch.float32))


def test_committed_format_1_artifact_loads_exactly():
    """The formerly committed W4 artifact (written in format 1) computes with exactly what its stored fp16 s, z say."""
    from pathlib import Path

    from safetensors.torch import load_file

    from qvla_quant.api import load
    from qvla_quant.transforms import packed_layers

    # the W4 artifact committed before format 2 (of the previous policy), kept as a fixture of the old format
    w4 = Path(__file__).resolve().parent / "data" / "sim_transfer_cube_w4_format1"
    summary = artifact_summary(w4)
    assert summary["format_version"] == 1
    assert summary["quantized_weight_bytes_planned"] == summary["quantized_weight_bytes_after"] == 1502184
    assert summary["average_bits"] == 4.0 and 0 < summary["overhead_bits_per_weight"] < 1
    raw, plan = load_file(str(w4 / TENSORS_FILE)), read_plan(w4)
    layers = dict(packed_layers(load(w4).model))
    assert len(layers) == 81
    for name in list(layers)[::8]:
        assert layers[name].kept.dtype == torch.float32
        ref = layout_1_weight(raw, name, plan.layers[name])
        assert torch.equal(layers[name].dequantized_weight().reshape(ref.shape), ref)


def test_the_fingerprint_hashes_every_byte_and_still_knows_old_ids():
    from qvla_quant.api import check_plan_source
    from qvla_quant.fingerprint import LEGACY_FINGERPRINT_ALGORITHM, fingerprint_id

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))  # 16 KiB of weights: the old sample read the first and last 4 KiB
    fp = model_fingerprint(model)
    legacy = model_fingerprint(model, algorithm=LEGACY_FINGERPRINT_ALGORITHM)
    assert fp["weights_algorithm"] == "sha256-all-bytes" and "weights_algorithm" not in legacy
    with torch.no_grad():
        model[0].weight[32, 0] += 1.0  # the middle of the tensor
    assert model_fingerprint(model)["weights"] != fp["weights"]  # issue 11.6: the sample did not see this
    assert model_fingerprint(model, algorithm=LEGACY_FINGERPRINT_ALGORITHM)["weights"] == legacy["weights"]
    with torch.no_grad():
        model[0].weight[32, 0] -= 1.0
    # a plan written before (sampled id) still applies to its model, and still refuses another checkpoint
    plan = Plan({"0": LayerPlan("0", "language", "linear", 64, 64, [4] * 64)}, model_fingerprint=fingerprint_id(legacy))
    check_plan_source(model, plan)
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="its weights differ"):
        check_plan_source(model, plan)
