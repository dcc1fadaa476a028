"""Public API and the `qvla-quant` CLI, end to end on the tiny π0: calibrate -> allocate -> quantize (packed, equal to
the fake-quant reference) -> save -> load (identical outputs); clear errors for bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvla_quant import (
    AllocationConfig,
    CalibrationConfig,
    Pi0Adapter,
    PlanTemplate,
    allocate,
    calibrate,
    load,
    quantize,
    save,
)
from qvla_quant.adapters.pi0 import tiny_pi0_config
from qvla_quant.api import load_policy
from qvla_quant.artifact import artifact_summary, read_plan
from qvla_quant.cli import main, save_batches

REPO = Path(__file__).resolve().parents[2]


PATCH_CONV = "model.vlm.vision_tower.embeddings.patch_embedding"


@pytest.mark.parametrize(
    "template",
    [
        # the default plan packs SigLIP's patch conv too, whose forward reads patch_embedding.weight.dtype
        pytest.param(None, id="default-template"),
        pytest.param(PlanTemplate(names={PATCH_CONV: "skip"}), id="patch-conv-kept"),
    ],
)
def test_quantize_save_load_round_trip(tiny_pi0, tiny_sensitivity, tiny_batches, tmp_path, template):
    from qvla_quant.transforms import fake_quantize_model

    sens, _ = tiny_sensitivity
    plan = allocate(sens, 3.0, AllocationConfig(solver="lagrangian", template=template))
    assert (PATCH_CONV in plan.layers) == (template is None)
    batch = tiny_batches[0]
    full = tiny_pi0.predict(batch)
    reference = Pi0Adapter(fake_quantize_model(tiny_pi0.model, plan)).predict(batch)
    quantize(tiny_pi0, plan)  # in place: the adapter now runs the packed model
    packed = tiny_pi0.predict(batch)
    scale = full.abs().max()
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-4 * scale)
    assert (packed - full).abs().max() > 1e-4 * scale  # it did quantize something

    save(tmp_path / "artifact", tiny_pi0, plan)
    loaded = load(tmp_path / "artifact")
    assert isinstance(loaded, Pi0Adapter)
    assert torch.equal(loaded.predict(batch), packed)
    assert torch.equal(load_policy(tmp_path / "artifact").predict(batch), packed)
    assert json.loads((tmp_path / "artifact" / "config.json").read_text())["model_type"] == "pi0"


def test_load_refuses_a_mismatched_model(tiny_pi0, tiny_sensitivity, tmp_path):
    from transformers import PI0ForConditionalGeneration

    sens, _ = tiny_sensitivity
    save(tmp_path / "artifact", tiny_pi0, allocate(sens, 4.0))
    with torch.device("meta"):
        other = PI0ForConditionalGeneration(tiny_pi0_config(max_action_dim=7))
    with pytest.raises(ValueError, match="does not match the artifact"):
        load(tmp_path / "artifact", model=other)
    save(tmp_path / "bare", tiny_pi0.model, allocate(sens, 4.0))  # a model without its adapter config
    with pytest.raises(ValueError, match="does not say how to rebuild"):
        load(tmp_path / "bare")


def test_quantize_refuses_a_plan_made_for_another_checkpoint(tiny_sensitivity):
    from transformers import PI0ForConditionalGeneration

    sens, _ = tiny_sensitivity
    plan = allocate(sens, 4.0)
    torch.manual_seed(1)
    other = Pi0Adapter(PI0ForConditionalGeneration(tiny_pi0_config()).eval())
    with pytest.raises(ValueError, match="weights differ"):
        quantize(other, plan)
    quantize(other, plan, check_source=False)


def test_api_rejects_wrong_types(tiny_pi0, tiny_batches):
    with pytest.raises(TypeError, match="PolicyAdapter"):
        calibrate(tiny_pi0.model, tiny_batches)
    with pytest.raises(TypeError, match="Sensitivity"):
        allocate({}, 4.0)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(tiny_pi0, [], CalibrationConfig(progress=False))


# ---- the CLI
def test_cli_calibrate_allocate_apply_inspect(tiny_pi0_dir, tiny_batches, tmp_path, capsys):
    data = tmp_path / "data"
    save_batches(data, tiny_batches)
    store, plan, artifact, plots = tmp_path / "sens", tmp_path / "plan.json", tmp_path / "artifact", tmp_path / "plots"
    calibrate_args = [
        "calibrate", "--policy", str(tiny_pi0_dir), "--data", str(data), "--out", str(store),
        "--exact-fraction", "0.005", "--rank-sample", "16", "--max-exact-dims", "8", "--n-probes", "4",
        "--no-clip-search", "--quiet", "--plots", str(plots),
    ]  # fmt: skip
    assert main(calibrate_args) == 0
    out = capsys.readouterr().out
    assert "dead layers (5)" in out and "spearman(exact, aligned proxy)" in out
    assert (plots / "sensitivity_map.png").stat().st_size > 1000
    assert main(calibrate_args) == 0  # a finished store is reused, not recomputed

    assert (
        main(["allocate", "--sensitivity", str(store), "--budget", "4", "--out", str(plan), "--plots", str(plots)]) == 0
    )
    out = capsys.readouterr().out
    assert "bytes before" in out and "total" in out and "vision" in out
    assert (plots / "bit_histogram.png").is_file() and (plots / "layer_bits.png").is_file()
    assert json.loads(plan.read_text())["average_bits"] <= 4.0

    assert main(["apply", "--policy", str(tiny_pi0_dir), "--plan", str(plan), "--out", str(artifact)]) == 0
    assert "measured packed weights" in capsys.readouterr().out
    for target in (artifact, plan, store):
        assert main(["inspect", str(target)]) == 0
    out = capsys.readouterr().out
    assert out.count("avg bits") == 2 and "sensitivity store" in out
    assert main(["inspect", str(artifact), "--plots", str(tmp_path / "plots2")]) == 0
    assert (tmp_path / "plots2" / "bit_histogram.png").is_file()


@pytest.fixture
def cli_store(tiny_pi0_dir, tiny_batches, tmp_path):
    store = tmp_path / "cli_sens"
    config = CalibrationConfig(
        store_dir=str(store), exact_fraction=0.0, rank_sample=0, max_exact_dims=8, n_probes=2, progress=False
    )
    calibrate(load_policy(tiny_pi0_dir), tiny_batches[:1], config)
    return store


def bad_invocations(tmp: Path, store: Path, policy: Path):
    plan = str(tmp / "plan.json")
    return [
        (["allocate", "--sensitivity", str(store), "--out", plan], "the following arguments are required: --budget"),
        (["allocate", "--sensitivity", str(tmp / "nope"), "--budget", "4", "--out", plan], "not a sensitivity store"),
        (["allocate", "--sensitivity", str(store), "--budget", "-1", "--out", plan], "expected a positive number"),
        (["allocate", "--sensitivity", str(store), "--budget", "1.5", "--bits", "2,4,8,16", "--out", plan],
         "lowest reachable average is 2.0000"),
        (["allocate", "--sensitivity", str(store), "--budget", "4", "--bits", "5,16", "--out", plan], "bits must be"),
        # 3 is a row width of the format, but this store was not calibrated for it
        (["allocate", "--sensitivity", str(store), "--budget", "4", "--bits", "3,16", "--out", plan],
         "no sensitivity for candidate bit-widths [3]"),
        (["calibrate", "--policy", str(tmp / "nope"), "--data", str(tmp), "--out", str(tmp / "s")], "does not exist"),
        (["calibrate", "--policy", str(policy), "--data", str(tmp / "nodata"), "--out", str(tmp / "s")],
         "calibration data"),
        (["apply", "--policy", str(policy), "--plan", str(tmp / "nope.json"), "--out", str(tmp / "a")],
         "plan file"),
        (["inspect", str(tmp / "nope")], "neither an artifact"),
        (["inspect", str(store), "--dtype", "float13"], "not a torch dtype"),
        (["frobnicate"], "invalid choice"),
    ]  # fmt: skip


def test_cli_bad_inputs_give_one_line_and_exit_code_2(cli_store, tiny_pi0_dir, tmp_path, capsys):
    for argv, message in bad_invocations(tmp_path, cli_store, tiny_pi0_dir):
        with pytest.raises(SystemExit) as exit_info:
            sys.exit(main(argv))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2, (argv, err)
        assert err.startswith("qvla-quant: error:") and message in err, (argv, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)


def test_cli_entry_point_in_a_fresh_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    run = subprocess.run(
        [sys.executable, "-m", "qvla_quant.cli", "inspect", str(tmp_path / "missing")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().startswith("qvla-quant: error:") and len(run.stderr.strip().splitlines()) == 1


def test_qvla_with_3_and_6_bit_choices_end_to_end(tiny_pi0, tiny_batches, tiny_calibration, tmp_path):
    """3 and 6 are opt-in row widths: calibrated, allocated (both solvers), packed, saved and loaded like the rest,
    and at an average of 3 bits the optimal allocation really uses 3-bit rows (greedy may stop before its 4->3
    stage: it demotes stage by stage and ends as soon as the budget holds)."""
    from qvla_quant import CalibrationConfig, calibrate
    from qvla_quant.transforms import fake_quantize_model

    bits = (0, 2, 3, 4, 6, 8, 16)
    config = CalibrationConfig(bits=bits, store_dir=str(tmp_path / "store"), **tiny_calibration)
    sens = calibrate(tiny_pi0, tiny_batches, config)
    batch = tiny_batches[0]
    for solver in ("greedy", "lagrangian"):
        plan = allocate(sens, 3.0, AllocationConfig(bits=bits, solver=solver))
        assert plan.average_bits() <= 3.0 + 1e-9
        hist = plan.bit_histogram()
        assert solver == "greedy" or hist.get(3, 0) > 0, (solver, hist)
    reference = Pi0Adapter(fake_quantize_model(tiny_pi0.model, plan)).predict(batch)
    quantize(tiny_pi0, plan)
    packed = tiny_pi0.predict(batch)
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-4 * reference.abs().max())
    save(tmp_path / "artifact", tiny_pi0, plan)
    assert torch.equal(load(tmp_path / "artifact").predict(batch), packed)


def test_cli_apply_with_embedding_bits(cli_store, tiny_pi0_dir, tiny_batches, tmp_path, capsys):
    # --embedding-bits packs the VLM's token table and drops the action expert's (which sampling never reads);
    # the loaded artifact predicts what the same plan without embeddings predicts, up to the table's 8-bit rounding
    plan = tmp_path / "plan.json"
    assert main(["allocate", "--sensitivity", str(cli_store), "--budget", "8", "--out", str(plan)]) == 0
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    assert main(["apply", "--policy", str(tiny_pi0_dir), "--plan", str(plan), "--out", str(plain)]) == 0
    args = ["apply", "--policy", str(tiny_pi0_dir), "--plan", str(plan), "--out", str(packed), "--embedding-bits", "8"]
    assert main(args) == 0
    capsys.readouterr()
    embeddings = read_plan(packed).embeddings
    assert {e.bits for e in embeddings.values()} == {0, 8} and len(embeddings) == 2
    assert artifact_summary(packed)["parameter_bytes_after"] < artifact_summary(plain)["parameter_bytes_after"]
    a, b = load_policy(plain), load_policy(packed)
    for batch in tiny_batches[:1]:
        ref, got = a.predict(batch), b.predict(batch)
        assert torch.isfinite(got).all()
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max()  # an 8-bit table: small, not zero
