"""Loading damaged policy directories: every case is refused with one clear error that names the file.

Missing, extra, wrongly shaped or typed tensors (never initialized at random), truncated files, corrupt JSON and
tokenizers, pickle payloads under any file name (never unpickled), an artifact that lost its artifact.json; through
the runtime, the inference worker's reload (what ReloadPolicy answers), qvla_quant's loader and every CLI.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qvla_ros.policy.model import load_pi0_model
from qvla_ros.policy.processor import PolicyFormatError
from qvla_ros.policy.runtime import PolicyRuntime
from qvla_ros.policy.tiny import make_tiny_policy

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
HEAD = "action_out_proj.weight"  # [14, 64] in the tiny policy


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("loaders") / "tiny", seed=5)


def copy_of(src: Path, tmp_path: Path, name: str = "policy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(directory: Path, edit) -> Path:
    """Rewrite model.safetensors with edit(tensors) -> tensors (a consistent, readable, wrong file)."""
    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(edit(load_file(str(path))), str(path), metadata=metadata)
    return path


class Trap:
    """Unpickling this creates `marker`: proof that a loader unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def write_pickle(path: Path, marker: Path, kind: str) -> None:
    if kind == "torch.save":
        torch.save({"weight": torch.zeros(2), "trap": Trap(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"trap": Trap(marker)}))


def assert_refused(path: Path, *fragments: str) -> str:
    with pytest.raises(PolicyFormatError) as e:
        PolicyRuntime.load(path, warmup=False)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------- tensors
def test_a_missing_tensor_is_named_with_its_expected_shape(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != HEAD})
    assert_refused(d, str(d / "model.safetensors"), "1 tensors missing", "action_out_proj.weight [14, 64]")


def test_a_checkpoint_without_the_action_expert_is_refused(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if "gemma_expert" not in k})
    message = assert_refused(
        d, str(d / "model.safetensors"), "20 tensors missing", "model.dit.embed_tokens.weight [9, 64]"
    )
    assert "and 8 more" in message  # long lists are cut, with a count
    # the qvla_quant loader refuses it too (qvla-quant calibrate/apply, qvla_quant.load_policy)
    from qvla_quant.api import load_policy
    from qvla_quant.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="20 tensors missing"):
        load_policy(d)


def test_an_extra_tensor_is_refused(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    rewrite_tensors(d, lambda t: {**t, "action_expert_v2.weight": torch.zeros(3, 5)})
    assert_refused(d, str(d / "model.safetensors"), "1 unexpected tensors: action_expert_v2.weight [3, 5]")


def test_a_tensor_of_the_wrong_shape_is_refused(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    rewrite_tensors(d, lambda t: {**t, HEAD: torch.zeros(14, 32)})
    assert_refused(d, str(d / "model.safetensors"), "action_out_proj.weight is [14, 32], expected [14, 64]")


def test_a_tensor_of_the_wrong_dtype_is_refused(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    rewrite_tensors(d, lambda t: {**t, HEAD: t[HEAD].to(torch.int32)})
    assert_refused(d, str(d / "model.safetensors"), "non-floating dtype", "action_out_proj.weight is int32")


def test_a_float_checkpoint_of_another_width_is_cast(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    rewrite_tensors(d, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    model = load_pi0_model(d)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0])
def test_a_truncated_file_is_refused(tiny_dir, tmp_path, keep):
    d = copy_of(tiny_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    assert_refused(d, str(d / "model.safetensors"), "cannot be read as safetensors", "truncated or corrupt")


def test_the_committed_checkpoint_reports_nothing_missing():
    """transformers reports no missing, unexpected or mismatched key for the committed π0 (strict load passes)."""
    from transformers import PI0ForConditionalGeneration

    from qvla_quant.checkpoint import load_pretrained_strict

    model = load_pretrained_strict(PI0ForConditionalGeneration, MODELS / "sim_transfer_cube_fp")
    assert sum(p.numel() for p in model.parameters()) > 2_000_000


# ---------------------------------------------------------------- pickle payloads: never unpickled
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_pickle_under_the_name_model_safetensors_is_never_unpickled(tiny_dir, tmp_path, kind):
    d = copy_of(tiny_dir, tmp_path)
    marker = tmp_path / "unpickled"
    write_pickle(d / "model.safetensors", marker, kind)
    assert_refused(d, str(d / "model.safetensors"), "not safetensors", "never unpickles")
    assert not marker.exists()


@pytest.mark.parametrize("instead", [True, False], ids=["instead-of-safetensors", "beside-safetensors"])
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_a_pickle_weights_file_is_never_unpickled(tiny_dir, tmp_path, instead, name):
    d = copy_of(tiny_dir, tmp_path)
    marker = tmp_path / "unpickled"
    if instead:
        (d / "model.safetensors").unlink()
    write_pickle(d / name, marker, "torch.save")
    assert_refused(d, str(d / name), "pickle-based weights file", "never unpickles")
    assert not marker.exists()
    from qvla_quant.api import load_policy
    from qvla_quant.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=name):
        load_policy(d)
    assert not marker.exists()


# ---------------------------------------------------------------- artifacts without artifact.json
@pytest.mark.parametrize("remove_plan", [False, True], ids=["plan-json-left", "packed-tensors-only"])
def test_an_artifact_without_artifact_json_is_not_loaded_as_a_float_model(tmp_path, remove_plan):
    d = copy_of(MODELS / "sim_transfer_cube_w4", tmp_path)
    (d / "artifact.json").unlink()
    if remove_plan:
        (d / "plan.json").unlink()
    assert_refused(d, "looks like a qvla_quant artifact but", str(d / "artifact.json"), "is missing")
    from qvla_quant.api import load_policy
    from qvla_quant.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="looks like a qvla_quant artifact"):
        load_policy(d)


# ---------------------------------------------------------------- JSON and tokenizer files
@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("tokenizer.json", "{1: 2}", "is not a valid `tokenizers` tokenizer"),
        ("tokenizer.json", '{"version": "1.0"}', "is not a valid `tokenizers` tokenizer"),
        ("processor.json", '{"camera_names": ', "is not a valid processor config"),
        ("processor.json", "[1, 2]", "is not a valid processor config"),
        ("processor.json", '{"camera_names": ["top"]}', "is not a valid processor config"),
        ("config.json", '{"model_type": "pi0", ', "is not a π0 config"),
    ],
)
def test_corrupt_json_files_are_named(tiny_dir, tmp_path, name, text, fragment):
    d = copy_of(tiny_dir, tmp_path)
    (d / name).write_text(text)
    assert_refused(d, str(d / name), fragment)


# (an artifact's config.json is not in the list: the artifact is rebuilt from artifact.json, config.json is there for
# other tools and never read)
@pytest.mark.parametrize(
    "artifact, name",
    [(False, "tokenizer.json"), (False, "processor.json"), (False, "config.json"), (True, "tokenizer.json"),
     (True, "processor.json"), (True, "artifact.json"), (True, "plan.json")],
)  # fmt: skip
def test_a_pickle_under_a_json_name_is_never_unpickled(tiny_dir, tmp_path, artifact, name):
    d = copy_of(MODELS / "sim_transfer_cube_w4" if artifact else tiny_dir, tmp_path)
    marker = tmp_path / "unpickled"
    write_pickle(d / name, marker, "pickle")
    with pytest.raises(ValueError) as e:  # PolicyFormatError, or qvla_quant's ArtifactError for an artifact
        PolicyRuntime.load(d, warmup=False)
    assert str(d / name) in str(e.value), str(e.value)
    assert not marker.exists()


def test_reload_answers_false_naming_the_file(tiny_dir, tmp_path):
    """What ReloadPolicy answers: the inference worker's reload of a damaged policy."""
    from qvla_ros.control.worker import InferenceWorker

    bad_tokenizer = copy_of(tiny_dir, tmp_path, "bad_tokenizer")
    (bad_tokenizer / "tokenizer.json").write_text("{1: 2}")
    missing = copy_of(tiny_dir, tmp_path, "missing")
    rewrite_tensors(missing, lambda t: {k: v for k, v in t.items() if "gemma_expert" not in k})
    worker = InferenceWorker(
        "thread",
        str(tiny_dir),
        get_observation=lambda: None,
        on_chunk=lambda c, t: None,
        on_error=lambda m, t: None,
        warmup=False,
    )
    try:
        ok, message = worker.reload(str(bad_tokenizer))
        assert not ok and str(bad_tokenizer / "tokenizer.json") in message, message
        ok, message = worker.reload(str(missing))
        assert not ok and str(missing / "model.safetensors") in message and "tensors missing" in message, message
    finally:
        worker.stop()


# ---------------------------------------------------------------- the CLIs: one line naming the file, exit code 2
def damaged_policies(tiny_dir: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    """(policy directory, the file its error must name)"""
    cases = []
    d = copy_of(tiny_dir, tmp_path, "tokenizer")
    (d / "tokenizer.json").write_text("{1: 2}")
    cases.append((d, "tokenizer.json"))
    d = copy_of(tiny_dir, tmp_path, "missing")
    rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != HEAD})
    cases.append((d, "model.safetensors"))
    d = copy_of(tiny_dir, tmp_path, "truncated")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:4000])
    cases.append((d, "model.safetensors"))
    d = copy_of(tiny_dir, tmp_path, "pickled")
    write_pickle(d / "model.safetensors", tmp_path / "unpickled", "torch.save")
    cases.append((d, "model.safetensors"))
    d = copy_of(tiny_dir, tmp_path, "config")
    (d / "config.json").write_text("{")
    cases.append((d, "config.json"))
    return cases


def assert_one_line_error(err: str, prog: str, path: Path):
    err = err.strip()
    assert err.startswith(f"{prog}: error:"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err, err


def test_qvla_eval_names_the_damaged_file(tiny_dir, tmp_path, capsys):
    from qvla_ros.policy.evaluate import main

    for policy, name in damaged_policies(tiny_dir, tmp_path):
        assert main(["--policy", str(policy), "--seeds", "1"]) == 2, name
        assert_one_line_error(capsys.readouterr().err, "qvla-eval", policy / name)
        assert main(["--policy", str(tiny_dir), "--reference", str(policy), "--seeds", "1"]) == 2, name
        assert_one_line_error(capsys.readouterr().err, "qvla-eval", policy / name)
    assert not (tmp_path / "unpickled").exists()


def test_qvla_policy_quantize_names_the_damaged_file(tiny_dir, tmp_path, capsys):
    from qvla_ros.policy.quantize import main

    episodes = tmp_path / "episodes"
    episodes.mkdir()
    for policy, name in damaged_policies(tiny_dir, tmp_path):
        argv = ["--policy", str(policy), "--episodes", str(episodes), "--budget", "4", "--out", str(tmp_path / "q")]
        assert main(argv) == 2, name
        assert_one_line_error(capsys.readouterr().err, "qvla-policy-quantize", policy / name)
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("command", ["apply", "calibrate"])
def test_qvla_quant_names_the_damaged_file(tiny_dir, tmp_path, capsys, command):
    from qvla_quant.cli import main
    from qvla_quant.plan import Plan

    plan = tmp_path / "plan.json"
    plan.write_text(Plan({}).to_json())
    import numpy as np

    from qvla_ros.policy.processor import Pi0Processor
    from qvla_ros.policy.types import Observation

    obs = Observation(
        images={c: np.zeros((32, 32, 3), np.uint8) for c in ("top", "left_wrist", "right_wrist")},
        state=np.zeros(14),
        instruction="transfer the cube",
    )
    data = tmp_path / "data.safetensors"  # a valid batch of the tiny policy: only the checkpoint is damaged
    save_file(Pi0Processor.load(tiny_dir).batch([obs]), str(data))
    for policy, name in damaged_policies(tiny_dir, tmp_path):
        if name == "tokenizer.json":
            continue  # qvla-quant reads the model only
        extra = ["--plan", str(plan)] if command == "apply" else ["--data", str(data)]
        assert main([command, "--policy", str(policy), *extra, "--out", str(tmp_path / "out")]) == 2, name
        assert_one_line_error(capsys.readouterr().err, "qvla-quant", policy / name)
    assert not (tmp_path / "unpickled").exists()


def test_qvla_train_names_a_damaged_training_record(tiny_dir, tmp_path, capsys):
    from qvla_ros.policy.train import main

    source = copy_of(tiny_dir, tmp_path, "source")
    (source / "train_config.json").write_text('{"kind": ')
    assert main(["--episodes", str(tmp_path), "--out", str(tmp_path / "run"), "--init-from", str(source)]) == 2
    assert_one_line_error(capsys.readouterr().err, "qvla-train", source / "train_config.json")
    run = tmp_path / "resumed"
    (run / "last").mkdir(parents=True)
    (run / "train_state.json").write_text("{}")
    (run / "last" / "train_config.json").write_text(json.dumps({"kind": "no train_config here"}))
    assert main(["--episodes", str(tmp_path), "--out", str(run), "--resume"]) == 2
    assert_one_line_error(capsys.readouterr().err, "qvla-train", run / "last" / "train_config.json")


def test_cli_in_a_fresh_process_prints_no_traceback(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    (d / "tokenizer.json").write_text("{1: 2}")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "qvla_ros.policy.evaluate", "--policy", str(d)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert_one_line_error(run.stderr, "qvla-eval", d / "tokenizer.json")


@pytest.mark.sim  # imports MuJoCo (qvla_ros.sim.rig); the rig itself is never started here
def test_qvla_sim_names_a_corrupt_topic_config_on_one_line(tmp_path, capsys):
    from qvla_ros.sim.cli import main

    topics = tmp_path / "topics.yaml"
    topics.write_text("cameras: [\n")
    assert main(["record-demos", "--out", str(tmp_path / "demos"), "-n", "1", "--topics", str(topics)]) == 2
    assert_one_line_error(capsys.readouterr().err, "qvla-sim", topics)


def test_the_calibration_job_knows_every_row_width_of_the_format():
    from qvla_quant.quantizer import BIT_CHOICES, ROW_BITS
    from qvla_ros.policy import calibration_job

    assert calibration_job.ROW_BITS == ROW_BITS and calibration_job.BIT_SET == BIT_CHOICES
