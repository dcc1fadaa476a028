"""The sim rig node (MuJoCo ALOHA scene) and the policy node together, as `make demo` runs them."""

from __future__ import annotations

import pytest
from runtime_helpers import PROBE, report

pytestmark = [pytest.mark.ros, pytest.mark.sim, pytest.mark.slow]


def test_mujoco_rig_and_policy_node_over_ros(rig, ros_env, spawn, tiny_policies, request):
    r = rig(sim="true", policy=str(tiny_policies[0]))
    p = spawn([PROBE, "sim", "--seconds", "5"], ros_env)
    try:
        out = p.finish(timeout=240)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- node output ---\n{r.log()}") from None
    s = out["stream"]
    report(request, "sim", {k: s[k] for k in ("rate_hz", "period_p99_ms", "period_max_ms", "count")})
    # cameras: rgb8 at the configured size, frame ids from config/topics.yaml
    assert out["frame"] == [320, 240, "rgb8", 960, 320 * 240 * 3, "camera_high_color_optical_frame"], out
    assert out["success_msgs"][:1] == [False], out  # latched: a late subscriber still gets it
    assert out["start"][0] and out["start"][1] == "transfer_cube-1000", out
    assert out["policy_start"][0] and out["policy_stop"][0], out
    # the policy drives the simulated arms at 30 Hz through the shared adapter
    assert abs(s["rate_hz"] - 30.0) <= 1.5 and s["distinct_commands"] > 50, out
    assert s["non_finite"] == 0 and s["outside_limits"] == 0 and not s["malformed"], out
    stop = out["stop"]
    assert stop["seed"] == 1000 and stop["succeeded"] is False and stop["commands"] >= 100 and stop["sim_time"] > 4, out
    assert out["held_after_stop"] and "episode stopped" in out["held_after_stop"][0], out
