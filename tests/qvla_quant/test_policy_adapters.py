"""Policy adapters: the π0 adapter on a tiny random checkpoint saved to disk, the generic adapter, role rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvla_quant.adapters import GenericAdapter, Pi0Adapter, adapter_class
from qvla_quant.adapters.pi0 import example_batch, tiny_pi0_config
from qvla_quant.api import load_policy
from qvla_quant.roles import DEFAULT_ROLE_RULES, NameRules, PlanTemplate

LAST_VLM = "model.vlm.language_model.layers.1"


# ---- π0
def test_pi0_layers_have_roles_and_the_patch_conv_is_a_row_map(tiny_pi0):
    layers = {info.name: info for info in tiny_pi0.layers()}
    conv = layers["model.vlm.vision_tower.embeddings.patch_embedding"]
    assert (conv.role, conv.kind, conv.out_features, conv.fan_in) == ("vision", "conv", 32, 3 * 8 * 8)
    assert layers["model.vlm.multi_modal_projector.linear"].role == "projector"
    assert layers["model.vlm.language_model.layers.0.mlp.down_proj"].role == "language"
    assert layers["model.dit.layers.1.self_attn.q_proj"].role == "action"
    for name in ("embed_action_time.action_in_proj", "embed_action_time.state_proj", "action_out_proj"):
        assert layers[name].role == "action_head"
    assert {i.role for i in layers.values()} == {"vision", "projector", "language", "action", "action_head"}
    # every nn.Linear / Conv2d of the model is listed once
    n_modules = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in tiny_pi0.model.modules())
    assert len(layers) == n_modules


def test_pi0_predict_is_deterministic_and_matches_transformers(tiny_pi0, tiny_batches):
    batch = tiny_batches[0]
    a1, a2 = tiny_pi0.predict(batch), tiny_pi0.predict(batch)
    assert a1.shape == (2, 5, 6) and torch.equal(a1, a2)
    noise = tiny_pi0.make_noise(2, tiny_pi0.noise_seed)
    reference = tiny_pi0.model.sample_actions(noise=noise, **batch)  # transformers' own no_grad path
    assert torch.equal(a1, reference)
    assert not torch.equal(a1, tiny_pi0.actions(batch, tiny_pi0.make_noise(2, 1)))  # the noise matters


def test_pi0_action_dim_slices_padding(tiny_pi0_dir, tiny_batches):
    adapter = load_policy(tiny_pi0_dir, action_dim=4)
    full = load_policy(tiny_pi0_dir).predict(tiny_batches[0])
    assert torch.equal(adapter.predict(tiny_batches[0]), full[..., :4])
    with pytest.raises(ValueError, match="action_dim"):
        load_policy(tiny_pi0_dir, action_dim=7)


def test_pi0_actions_are_differentiable(tiny_pi0, tiny_batches):
    batch = dict(tiny_batches[0])
    batch["pixel_values"] = batch["pixel_values"].clone().requires_grad_(True)
    with torch.enable_grad():
        actions = tiny_pi0.actions(batch, tiny_pi0.make_noise(2, 0))
        actions.square().sum().backward()
    assert batch["pixel_values"].grad.abs().sum() > 0
    assert tiny_pi0.model.model.vlm.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_pi0_dead_layers_are_reported_not_errors(tiny_pi0, tiny_batches):
    expected = [f"{LAST_VLM}.self_attn.q_proj", f"{LAST_VLM}.self_attn.o_proj"]
    expected += [f"{LAST_VLM}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert tiny_pi0.known_dead_layers() == expected
    assert tiny_pi0.dead_layers(tiny_batches[0]) == expected
    # the gradient probe alone finds them too (no structural knowledge)
    generic_view = GenericAdapter(tiny_pi0.model, lambda m, b, n: tiny_pi0.actions(b, n), noise_shape=(5, 6))
    assert generic_view.dead_layers(tiny_batches[0]) == expected
    # the probe leaves the model as it found it
    assert all(p.requires_grad for p in tiny_pi0.model.parameters())
    assert all(not m._forward_hooks for m in tiny_pi0.model.modules())


def test_pi0_bad_batches_are_named(tiny_pi0, tiny_batches):
    batch = dict(tiny_batches[0])
    del batch["state"]
    with pytest.raises(ValueError, match=r"missing keys \['state'\]"):
        tiny_pi0.predict(batch)
    bad = dict(tiny_batches[0], pixel_values=tiny_batches[0]["pixel_values"][:, 0])
    with pytest.raises(ValueError, match="pixel_values must be"):
        tiny_pi0.predict(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        tiny_pi0.predict(dict(tiny_batches[0], labels=torch.zeros(2)))


def test_pi0_skeleton_from_config(tiny_pi0, tiny_batches):
    config = tiny_pi0.config_dict()
    meta = adapter_class(config["adapter"]).from_config(config)
    assert isinstance(meta, Pi0Adapter) and next(meta.model.parameters()).is_meta
    assert [i.name for i in meta.layers()] == [i.name for i in tiny_pi0.layers()]
    cpu = Pi0Adapter.from_config(config, device="cpu")
    cpu.model.load_state_dict(tiny_pi0.model.state_dict())
    assert torch.equal(cpu.predict(tiny_batches[0]), tiny_pi0.predict(tiny_batches[0]))


def test_load_policy_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nope")
    with pytest.raises(ValueError, match="no adapter recognizes"):
        load_policy(tmp_path)
    with pytest.raises(ValueError, match="unknown policy adapter"):
        adapter_class("openvla-7b")


def test_example_batch_follows_the_processor_layout():
    config = tiny_pi0_config()
    batch = example_batch(config, 3, n_cameras=3, text_len=4)
    image = config.vlm_config.image_token_id
    n_image = (batch["input_ids"] == image).sum(1)
    assert n_image.tolist() == [48, 32, 32]  # sample 0 has 3 cameras, the others miss their last one
    assert torch.equal(batch["pixel_attention_mask"].sum(1) * 16, n_image)
    assert (batch["attention_mask"].sum(1) == n_image + torch.tensor([4, 3, 2])).all()


# ---- generic
class TinyPolicy(nn.Module):
    """A conv stem, an MLP and a head; actions = head(features) + 0.1 * noise (a noise-driven policy)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 4, stride=4)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 6)
        self.unused = nn.Linear(32, 32)

    def forward(self, image, noise):
        x = self.stem(image).flatten(1)
        return self.head(self.body(x)).view(-1, 3, 2) + 0.1 * noise


def tiny_policy_actions(model, batch, noise):
    return model(batch["image"], noise)


def tiny_generic(seed=0):
    torch.manual_seed(seed)
    rules = {"re:stem": "vision", r"re:body\..*": "language", "head": "action_head"}
    return GenericAdapter(TinyPolicy().eval(), tiny_policy_actions, role_rules=rules, noise_shape=(3, 2))


def test_generic_adapter_roles_noise_and_batches():
    adapter = tiny_generic()
    roles = {i.name: (i.role, i.kind) for i in adapter.layers()}
    assert roles == {
        "stem": ("vision", "conv"),
        "body.0": ("language", "linear"),
        "body.2": ("language", "linear"),
        "head": ("action_head", "linear"),
        "unused": ("other", "linear"),
    }
    assert torch.equal(adapter.make_noise(3, 5), adapter.make_noise(3, 5))
    assert not torch.equal(adapter.make_noise(3, 5), adapter.make_noise(3, 6))
    batch = {"image": torch.randn(3, 3, 8, 8)}
    rep = adapter.repeat_batch(batch, 4)
    assert adapter.batch_size(rep) == 12 and torch.equal(rep["image"][6:9], batch["image"])
    parts = adapter.split_batch(rep, 5)
    assert [adapter.batch_size(p) for p in parts] == [5, 5, 2]
    assert torch.equal(adapter.concat_batches(parts)["image"], rep["image"])
    with pytest.raises(ValueError, match="disagree on the batch size"):
        adapter.batch_size({"a": torch.zeros(2), "b": torch.zeros(3)})
    assert adapter.dead_layers(batch) == ["unused"]
    with pytest.raises(ValueError, match="pass the model skeleton"):
        GenericAdapter.from_config(adapter.config_dict())


def test_generic_adapter_leaves_out_multihead_out_proj():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

    adapter = GenericAdapter(WithMHA(), lambda m, b, n: b["x"][:, None])
    assert [i.name for i in adapter.layers()] == ["head"]  # out_proj is read as a weight, never called


def test_generic_adapter_rejects_unknown_roles():
    with pytest.raises(ValueError, match="unknown role"):
        GenericAdapter(TinyPolicy(), tiny_policy_actions, role_rules={"head": "decoder"})


# ---- roles and templates
def test_name_rule_precedence():
    rules = NameRules({r"re:model\..*": "a", r"re:model\.dit\..*": "b", "model.dit.layers.0.mlp": "c"})
    assert rules.resolve("model.dit.layers.0.mlp") == "c"  # exact name first
    assert rules.resolve("model.dit.layers.1.mlp") == "b"  # then the longest matching pattern
    assert rules.resolve("model.vlm.x") == "a"
    assert rules.resolve("other") is None  # patterns match the whole name
    assert NameRules({"re:a.*": 1, "re:.*b": 2}).resolve("ab") == 1  # equal length: first declared


def test_plan_template_rules_and_json():
    template = PlanTemplate(
        names={r"re:model\.dit\.layers\.0\..*": 8, "model.vlm.multi_modal_projector.linear": "auto"}
    )
    assert template.rule_for("model.dit.layers.0.mlp.up_proj", "action") == 8
    assert template.rule_for("model.dit.layers.1.mlp.up_proj", "action") == "auto"
    assert template.rule_for("model.vlm.multi_modal_projector.linear", "projector") == "auto"
    assert template.rule_for("action_out_proj", "action_head") == "skip"
    assert PlanTemplate().roles == DEFAULT_ROLE_RULES
    assert PlanTemplate.from_dict(template.to_dict()) == template
    with pytest.raises(ValueError, match="rule must be"):
        PlanTemplate(names={"x": 5})  # 3 and 6 are row widths now; 5 is none
    with pytest.raises(ValueError, match="not a valid regular expression"):
        PlanTemplate(names={"re:(": "auto"})
    with pytest.raises(ValueError, match="unknown role"):
        PlanTemplate(roles={"decoder": "auto"})
