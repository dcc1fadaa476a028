"""bench_policy's calibration / held-out split follows the policy's recorded episode names."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bench_policy import held_out_episodes  # noqa: E402


def _policy(tmp_path: Path, names: list[str], val: list[str]) -> Path:
    d = tmp_path / "policy"
    d.mkdir()
    record = {"train_config": {"val_episodes": len(val), "data_seed": 0}, "episodes": names, "val_episodes": val}
    (d / "train_config.json").write_text(json.dumps(record))
    return d


def _episodes(tmp_path: Path, n: int) -> list[Path]:
    root = tmp_path / "demos"
    paths = [root / f"episode_{i:06d}" for i in range(n)]
    for p in paths:
        p.mkdir(parents=True)
    return paths


def test_split_ignores_episodes_the_policy_never_saw(tmp_path):
    names = [f"episode_{i:06d}" for i in range(10)]
    policy = _policy(tmp_path, names, ["episode_000003", "episode_000007"])
    train, val = held_out_episodes(policy, _episodes(tmp_path, 15))  # 5 more demos recorded since
    assert [p.name for p in val] == ["episode_000003", "episode_000007"]
    assert [p.name for p in train] == [n for n in names if n not in ("episode_000003", "episode_000007")]


def test_split_names_a_missing_training_episode(tmp_path):
    names = [f"episode_{i:06d}" for i in range(10)]
    policy = _policy(tmp_path, names, ["episode_000003"])
    with pytest.raises(SystemExit, match="not in the episodes directory"):
        held_out_episodes(policy, _episodes(tmp_path, 8))


def test_split_of_the_committed_policy_matches_its_record():
    root = Path(__file__).resolve().parents[2]
    policy = root / "models" / "sim_transfer_cube_fp"
    record = json.loads((policy / "train_config.json").read_text())
    episodes = [Path("/nonexistent") / n for n in sorted(set(record["episodes"]) | {"episode_999999"})]
    train, val = held_out_episodes(policy, episodes)
    assert sorted(p.name for p in val) == sorted(record["val_episodes"])
    assert len(train) + len(val) == len(record["episodes"])
