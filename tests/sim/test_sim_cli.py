"""`qvla-sim`: record-demos, expert-eval, snapshot; bad flags give a message, not a traceback."""

from __future__ import annotations

import json

import pytest

from qvla_ros.episodes import read_episode
from qvla_ros.sim import cli
from qvla_ros.sim.expert import TransferCubeExpert

pytestmark = pytest.mark.sim


@pytest.fixture
def short_episodes(monkeypatch):
    """Demos of 7.5 s would make the CLI test slow; the script still succeeds at its handover (~6 s)."""
    original = TransferCubeExpert.__init__

    def short(self, meet=(0.0, 0.5, 0.25), duration=6.2):
        original(self, meet, duration)

    monkeypatch.setattr(TransferCubeExpert, "__init__", short)


def test_record_demos_writes_successful_episodes_and_resumes(tmp_path, short_episodes, capsys):
    out = tmp_path / "demos"
    assert cli.main(["record-demos", "--out", str(out), "-n", "1", "--image-size", "24x32", "--seed0", "5"]) == 0
    assert cli.main(["record-demos", "--out", str(out), "-n", "1", "--image-size", "24x32", "--seed0", "5"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["episode_000000", "episode_000001"]
    seeds = []
    for name in names:
        ep = read_episode(out / name, horizon=4)
        assert ep.success is True and ep.samples[0].images["top"].shape == (24, 32, 3)
        seeds.append(ep.metadata["seed"])
    assert seeds == [5, 6]  # the second run skipped the seed already recorded
    assert "recorded 1 successful episode" in capsys.readouterr().out


def test_expert_eval_json(capsys):
    assert cli.main(["expert-eval", "--seeds", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["episodes"] == 2 and summary["success"] == 2 and summary["failed_seeds"] == []


def test_snapshot(tmp_path):
    png = tmp_path / "cams.png"
    assert cli.main(["snapshot", "--out", str(png), "--image-size", "24x32", "--cameras", "top,left_wrist"]) == 0
    assert png.stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["record-demos", "--out", "x", "--image-size", "big"], "HEIGHTxWIDTH"),
        (["record-demos", "--out", "x", "-n", "0"], "positive integer"),
        (["expert-eval", "--seeds", "-3"], "positive integer"),
        (["snapshot", "--out", "x.png", "--cameras", "top,belly"], "unknown camera"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_flags_give_a_message_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.main(["record-demos", "--out", str(blocker / "demos"), "-n", "1", "--image-size", "24x32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qvla-sim: error:") and "Traceback" not in err
