"""Fixtures for the runtime tests: real tiny π0 policies, and the node set started through the bring-up runner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_policies(tmp_path_factory):
    """Two random-weight π0 policies (different seeds, so different model ids and actions)."""
    from qvla_ros.policy.tiny import make_tiny_policy

    root = tmp_path_factory.mktemp("policies")
    return make_tiny_policy(root / "tiny_a", seed=0), make_tiny_policy(root / "tiny_b", seed=1)


class Rig:
    """The node set of `qvla-bringup` (same code path), its output in a log file for failure messages."""

    def __init__(self, ros_env, log: Path, launch="bimanual", overrides=None, **args):
        from qvla_ros.bringup import Bringup, node_set

        specs, _ = node_set(args, launch=launch)
        overrides = overrides or {}
        specs = [dataclasses.replace(s, parameters={**s.parameters, **overrides.get(s.name, {})}) for s in specs]
        self.log_path = log
        self._log = open(log, "w")
        self.runner = Bringup(specs, domain_id=int(ros_env["ROS_DOMAIN_ID"]), output=self._log, base_env=ros_env)
        self.runner.start()

    def log(self, tail: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-tail:]

    def stop(self):
        self.runner.stop()
        self._log.close()


@pytest.fixture
def rig(ros_env, tmp_path):
    """rig(**launch_args, overrides={node: {param: value}}) -> Rig, stopped at teardown."""
    started: list[Rig] = []

    def _start(**kw) -> Rig:
        r = Rig(ros_env, tmp_path / f"nodes{len(started)}.log", **kw)
        started.append(r)
        return r

    yield _start
    for r in started:
        r.stop()
