"""The policy node's control loop without ROS: observation gating (waiting for cameras and states, a stale camera,
cameras out of sync, stamps going backwards, a camera clock that restarts), the hold reasons, fault epochs that void
the plan, episodes, parameters, and the diagnostics built from it all. Real components throughout: the parameter
defaults of config/bimanual.yaml, the sim arm profile, the synchronizer, the scheduler, the safety filter and the
image conversion; the frames are sensor_msgs/Image-shaped objects."""

from types import SimpleNamespace

import numpy as np
import pytest

from qvla_ros.control.images import image_to_rgb, rgb_to_image_fields
from qvla_ros.control.loop import ERROR, OK, WARN, ControlLoop, WorkerReport, diagnostics
from qvla_ros.control.params import POLICY_NODE
from qvla_ros.control.safety import load_arm_description
from qvla_ros.control.worker import PolicyInfo
from qvla_ros.paths import config_path
from qvla_ros.policy.types import PredictedChunk

CAMS = ("top", "left_wrist", "right_wrist")
ARMS = ("left", "right")
DT = 1 / 30
RUNNING = "running"


def image(value: int = 0, size=(4, 6)):
    return SimpleNamespace(**rgb_to_image_fields(np.full((*size, 3), value, np.uint8)))


class Rig:
    """Feeds a ControlLoop the way the node does: three cameras and two arm states, on one clock."""

    def __init__(self, **overrides):
        cfg = {**POLICY_NODE.defaults(), "instruction.default": "transfer the cube", **overrides}
        self.desc = load_arm_description(config_path("y1_arms.yaml"), "sim", cfg["arms.joint_names"])
        self.loop = ControlLoop(cfg, self.desc, decode=image_to_rgb)
        self.pose = (self.desc.lower + self.desc.upper) / 2
        self.last = None  # the last tick's decision (run)

    def cameras(self, t: float, names=CAMS, stamp: float | None = None, value: int = 7):
        for name in names:
            s = t if stamp is None else stamp
            self.loop.add_frame(name, s, t, image(value), source_stamp=("stamp", name, s))

    def states(self, t: float, arms=ARMS, q=None):
        q = self.pose if q is None else np.asarray(q, dtype=np.float64)
        for k, arm in enumerate(ARMS):
            if arm in arms:
                self.loop.add_state(arm, t, t, q[7 * k : 7 * k + 7].copy())

    def feed(self, t: float):
        self.cameras(t)
        self.states(t)

    def run(self, t0: float, periods: int) -> float:
        """Inputs, then a tick, every control period from t0 on; returns the time of the next period."""
        for k in range(periods):
            t = t0 + k * DT
            self.feed(t)
            self.last = self.loop.tick(t + 0.001, RUNNING)
        return t0 + periods * DT

    def chunk(self, stamp: float, offset: float = 0.0, rows: int = 30) -> PredictedChunk:
        actions = np.tile(self.pose + offset, (rows, 1))
        return PredictedChunk(actions=actions, step_period=DT, stamp=stamp, latency=0.05, model_id="tiny")


# ---------------------------------------------------------------- gating
def test_waits_for_every_camera_and_arm_state():
    r = Rig()
    loop = r.loop
    assert loop.next_observation(1.0) is None
    reasons = loop.hold_reasons(1.0, RUNNING)
    assert set(reasons) == {f"camera:{c}" for c in CAMS} | {f"state:{a}" for a in ARMS}
    assert all("no message yet" in text for text in reasons.values())
    d = loop.tick(1.0, RUNNING)
    assert d.command is None and d.held and "no_state" in d.reasons  # nothing safe to send: no arm state yet

    r.cameras(1.0)
    assert loop.next_observation(1.01) is None  # no arm state yet
    assert set(loop.hold_reasons(1.01, RUNNING)) == {"state:left", "state:right"}
    r.states(1.0, arms=("left",))
    assert loop.next_observation(1.01) is None  # the right arm's state is missing
    r.states(1.0)
    got = loop.next_observation(1.01)
    assert got is not None
    obs, epoch = got
    assert epoch == loop.epoch and obs.stamp == 1.0 and obs.instruction == "transfer the cube"
    assert set(obs.images) == set(CAMS) and obs.images["top"].shape == (4, 6, 3) and obs.images["top"][0, 0, 0] == 7
    assert obs.images["top"].flags.writeable  # a copy, not a view of the message buffer
    np.testing.assert_array_equal(obs.state, r.pose)
    assert loop.next_observation(1.02) is None  # nothing newer than the observation just handed out
    r.feed(1.0 + DT)
    assert loop.next_observation(1.0 + DT + 0.01)[0].stamp == pytest.approx(1.0 + DT)


def test_no_observation_without_an_instruction_under_estop_or_stop():
    r = Rig(**{"instruction.default": ""})
    loop = r.loop
    r.feed(1.0)
    assert loop.next_observation(1.01) is None
    assert "/qvla/instruction" in loop.hold_reasons(1.01, RUNNING)["instruction"]
    loop.instruction = "pick"
    loop.estop = True
    assert loop.next_observation(1.01) is None
    assert "/qvla/estop" in loop.hold_reasons(1.01, RUNNING)["estop"]
    loop.estop = False
    loop.stop_episode()
    assert loop.paused and loop.next_observation(1.01) is None and "paused" in loop.hold_reasons(1.01, RUNNING)
    loop.start_episode(1.02)
    assert loop.next_observation(1.03) is None  # the frames and states came before START
    r.states(1.03)
    assert loop.next_observation(1.03) is None  # the states are new, the frames are not
    r.feed(1.04)
    assert loop.next_observation(1.05)[0].instruction == "pick"


def test_a_stale_camera_holds_and_names_the_camera():
    r = Rig()
    loop = r.loop
    t = r.run(1.0, 15)
    for k in range(6):  # the top camera stops; the others and the arms go on
        r.cameras(t + k * DT, names=("left_wrist", "right_wrist"))
        r.states(t + k * DT)
    now = t + 5 * DT + 0.001
    reasons = loop.hold_reasons(now, RUNNING)
    assert set(reasons) == {"camera:top"}
    assert "camera 'top' stale" in reasons["camera:top"] and "limit 120 ms" in reasons["camera:top"]
    assert loop.next_observation(now) is None


def test_cameras_out_of_sync_are_named_as_such():
    r = Rig()
    loop = r.loop
    r.states(1.0)
    r.cameras(1.0, names=("top", "left_wrist"))
    r.cameras(1.0, names=("right_wrist",), stamp=1.0 - 0.3)  # fresh on arrival, but stamped 300 ms earlier
    reasons = loop.hold_reasons(1.01, RUNNING)
    assert set(reasons) == {"sync"} and "cameras out of sync" in reasons["sync"] and "right_wrist" in reasons["sync"]
    assert loop.next_observation(1.01) is None
    assert loop.cameras.unmatched == 1  # counted by the observation request, not by the status check of a tick


def test_stamps_going_backwards_hold_and_a_restarted_clock_starts_over():
    r = Rig()
    loop = r.loop
    t0 = r.run(10.0, 15)
    assert loop.next_observation(t0)[0].stamp == pytest.approx(10.0 + 14 * DT)
    # the top camera's stamps go 2 s back while its frames keep arriving
    for k in range(4):
        t = t0 + k * DT
        r.cameras(t, names=("left_wrist", "right_wrist"))
        r.cameras(t, names=("top",), stamp=t - 2.0)
        r.states(t)
    now = t0 + 3 * DT + 0.001
    reasons = loop.hold_reasons(now, RUNNING)
    assert set(reasons) == {"camera:top"} and "went backwards by" in reasons["camera:top"]
    assert loop.next_observation(now) is None

    # every driver restarts its clock (10 s back): after restart_after (1 s) of older stamps the streams start over
    t = 11.0
    while loop.cameras.resets < len(CAMS):
        assert t < 13.0, "the streams never restarted"
        r.cameras(t, stamp=t - 10.0)
        r.states(t)
        t += DT
    r.cameras(t, stamp=t - 10.0)
    r.states(t)
    obs, _ = loop.next_observation(t + 0.001)  # older than the last observation's stamp, yet new
    assert obs.stamp == pytest.approx(t - 10.0)


def test_refused_frames_and_impossible_states_are_named_until_the_next_good_one():
    r = Rig()
    loop = r.loop
    r.feed(1.0)
    loop.refuse_frame("top", "camera 'top': encoding 'yuv422' is not supported")
    bad = r.pose.copy()
    bad[9] = np.nan  # right_joint3
    r.states(1.0, arms=("right",), q=bad)
    reasons = loop.hold_reasons(1.01, RUNNING)
    assert reasons["camera:top"] == "camera 'top': encoding 'yuv422' is not supported"
    assert "arm state of right" in reasons["state:right"] and "right_joint3" in reasons["state:right"]
    assert "sync" not in reasons  # a refused frame says more than the sync status would
    assert loop.next_observation(1.01) is None
    far = r.pose.copy()
    far[2] = 100.0
    r.states(1.0, arms=("left",), q=far)
    assert "left_joint3 = 100" in loop.hold_reasons(1.01, RUNNING)["state:left"]
    loop.refuse_state("left", "JointState for left lacks left_gripper")
    assert loop.hold_reasons(1.01, RUNNING)["state:left"] == "arm state: JointState for left lacks left_gripper"

    r.feed(1.0 + DT)  # good messages clear every refusal
    assert loop.hold_reasons(1.0 + DT, RUNNING) == {}
    assert loop.next_observation(1.0 + DT) is not None


def test_a_frame_that_cannot_be_converted_is_an_input_error():
    r = Rig()
    loop = r.loop
    r.states(1.0)
    r.cameras(1.0)
    truncated = image()
    truncated.data = truncated.data[:10]  # the node's field check would refuse it; here it reaches the decoder
    loop.add_frame("top", 1.0 + DT, 1.0 + DT, truncated)
    r.cameras(1.0 + DT, names=("left_wrist", "right_wrist"))
    assert loop.next_observation(1.0 + DT) is None
    assert "camera 'top'" in loop.input_error and "truncated" in loop.input_error
    assert loop.hold_reasons(1.0 + DT, RUNNING)["input"] == loop.input_error
    r.feed(1.0 + 2 * DT)
    assert loop.next_observation(1.0 + 2 * DT) is not None and loop.input_error == ""


# ---------------------------------------------------------------- the tick: commands, holds, fault epochs
def test_streams_the_plan_and_holds_the_last_command_with_the_reasons():
    r = Rig()
    loop = r.loop
    r.feed(1.0)
    d = loop.tick(1.0, RUNNING)
    assert d.held and set(d.reasons) == {"no_action"} and d.command is not None  # the measured state, held
    np.testing.assert_allclose(d.command, r.pose)
    obs, epoch = loop.next_observation(1.0)
    current, inputs = loop.add_chunk(r.chunk(obs.stamp, offset=0.01), epoch, 1.05)
    assert current and len(loop.scheduler) == 1
    assert inputs.episode == 0 and inputs.instruction == "transfer the cube" and inputs.camera_names == list(CAMS)
    assert inputs.camera_stamps == [("stamp", c, 1.0) for c in CAMS]  # the stamps as the senders wrote them
    np.testing.assert_array_equal(inputs.state, r.pose)
    r.feed(1.06)
    d = loop.tick(1.07, RUNNING)
    assert not d.held and d.changed and d.reasons == {}
    assert np.all(d.command >= r.pose) and np.any(d.command > r.pose)  # towards the plan, rate-limited
    assert loop.camera_to_command.count == 1 and loop.inference_latency.last == 0.05

    loop.estop = True
    d = loop.tick(1.08, RUNNING)
    assert d.held and set(d.reasons) == {"estop"} and d.changed
    held = d.command.copy()
    r.feed(1.1)
    d = loop.tick(1.1, "loading", "no such file")
    assert set(d.reasons) == {"estop", "policy"} and d.reasons["policy"] == "policy loading: no such file"
    np.testing.assert_array_equal(d.command, held)  # the same safe command while held


def test_a_new_fault_advances_the_epoch_and_voids_the_plan():
    r = Rig()
    loop = r.loop
    t = r.run(1.0, 6)
    assert set(r.last.reasons) == {"no_action"} and loop.epoch == 0  # nothing planned yet is not a fault
    obs, epoch = loop.next_observation(t)
    loop.add_chunk(r.chunk(obs.stamp), epoch, t)
    assert len(loop.scheduler) == 1
    r.feed(t)
    in_flight, old_epoch = loop.next_observation(t)  # its chunk is still being predicted when the fault comes
    assert old_epoch == 0

    # the top camera stops: a fault
    t += DT
    for k in range(6):
        r.cameras(t + k * DT, names=("left_wrist", "right_wrist"))
        r.states(t + k * DT)
        d = loop.tick(t + k * DT, RUNNING)
    assert d.held and "camera:top" in d.reasons
    assert loop.epoch == old_epoch + 1 and len(loop.scheduler) == 0  # once, when the fault appeared
    # the chunk predicted from before the fault comes back: dropped, not to be published
    dropped = loop.chunks_dropped
    current, _ = loop.add_chunk(r.chunk(in_flight.stamp), old_epoch, t + 6 * DT)
    assert not current and loop.chunks_dropped == dropped + 1 and len(loop.scheduler) == 0

    # the camera is back: new observations carry the new epoch, their chunks drive the arms again
    t += 6 * DT
    r.feed(t)
    d = loop.tick(t, RUNNING)
    assert set(d.reasons) == {"no_action"} and loop.epoch == old_epoch + 1
    obs, epoch = loop.next_observation(t)
    assert epoch == loop.epoch
    assert loop.add_chunk(r.chunk(obs.stamp), epoch, t)[0] and len(loop.scheduler) == 1
    r.feed(t + DT)
    assert not loop.tick(t + DT, RUNNING).held


def test_an_episode_start_voids_the_plan_and_waits_for_a_state_measured_after_it():
    r = Rig()
    loop = r.loop
    t = r.run(1.0, 6)
    obs, epoch = loop.next_observation(t)
    loop.add_chunk(r.chunk(obs.stamp), epoch, t)
    assert loop.start_episode(1.25, instruction="stack the cubes") == 1
    assert loop.epoch == epoch + 1 and len(loop.scheduler) == 0 and loop.safety.last is None
    d = loop.tick(1.26, RUNNING)  # the states are fresh, but measured before START
    assert d.held and d.command is None and "waiting for an arm state newer than the episode START" in d.why
    r.feed(1.27)
    obs, epoch = loop.next_observation(1.28)
    assert obs.instruction == "stack the cubes" and epoch == loop.epoch
    assert loop.add_chunk(r.chunk(obs.stamp), epoch, 1.28)[1].episode == 1
    assert loop.stop_episode() == 1 and loop.paused and len(loop.scheduler) == 0


def test_policy_checks_and_parameters():
    r = Rig()
    loop = r.loop
    joints = list(loop.joint_names)
    info = PolicyInfo(camera_names=list(CAMS), joint_names=joints, horizon=30, step_period=DT, model_id="m", path="/p")
    assert loop.check_policy(info) == ""
    assert "differ from arms.joint_names" in loop.check_policy(
        PolicyInfo(**{**info.__dict__, "joint_names": joints[::-1]})
    )
    assert "missing ['front']" in loop.check_policy(PolicyInfo(**{**info.__dict__, "camera_names": ["front"]}))
    assert loop.inference_failed("inference failed: boom") and not loop.inference_failed("inference failed: boom")
    assert loop.hold_reasons(0.0, RUNNING)["inference"] == "inference failed: boom"
    loop.policy_loaded(info)
    assert loop.inference_error == "" and loop.policy_info is info

    scheduler = loop.scheduler
    loop.cfg["cameras.max_age"] = 0.5
    loop.apply_parameters(["cameras.max_age"])
    assert loop.cameras.max_age == 0.5 and loop.scheduler is scheduler
    loop.cfg["control.blending"] = "latest"
    loop.apply_parameters(["control.blending"])
    assert loop.scheduler is not scheduler and loop.scheduler.mode == "latest"


# ---------------------------------------------------------------- diagnostics
def test_diagnostics_report_commands_inference_cameras_and_arms():
    r = Rig()
    loop = r.loop
    worker = WorkerReport(mode="process", status="loading", child_pids=(11, 12))
    reports = diagnostics(loop, 1.0, "/qvla/policy_node", worker, "joint_state", "SCHED_FIFO 10")
    names = [s.name for s in reports]
    assert names == ["/qvla/policy_node: commands", "/qvla/policy_node: inference"] + [
        f"/qvla/policy_node: camera {c}" for c in CAMS
    ] + [f"/qvla/policy_node: arm {a} state" for a in ARMS]
    cmd, inf, top = reports[0], reports[1], reports[2]
    assert (cmd.level, cmd.message) == (ERROR, "no command sent: starting")
    assert cmd.values["adapter"] == "joint_state" and cmd.values["scheduling"] == "SCHED_FIFO 10"
    assert cmd.values["held"] == "False" and cmd.values["expected_hz"] == "30" and cmd.values["episode"] == "0"
    assert (inf.level, inf.message) == (ERROR, "policy loading ")
    assert inf.values["worker_pids"] == "11,12" and inf.values["status"] == "loading"
    assert (top.level, top.message, top.hardware_id) == (WARN, "no frame yet", "top")
    assert all(isinstance(v, str) for s in reports for v in s.values.values())

    t = r.run(1.0, 9)
    obs, epoch = loop.next_observation(t)
    loop.policy_loaded(PolicyInfo(list(CAMS), list(loop.joint_names), 30, DT, "tiny", "/p"))
    loop.add_chunk(r.chunk(obs.stamp, offset=0.01), epoch, t)
    t = r.run(t, 6)
    running = WorkerReport(mode="process", status=RUNNING, predictions=1)
    reports = diagnostics(loop, t, "/qvla/policy_node", running, "joint_state")
    cmd, inf, top, left = reports[0], reports[1], reports[2], reports[5]
    assert cmd.level == OK and cmd.message.startswith("streaming at ") and cmd.values["held"] == "False"
    assert int(cmd.values["ticks"]) == 0  # the rate monitor is the caller's: nothing ticked it here
    assert (inf.level, inf.message.split(":")[0]) == (OK, "tiny") and inf.values["model_id"] == "tiny"
    assert inf.values["predictions"] == "1" and inf.values["chunks_dropped"] == "0"
    assert float(inf.values["latency_p50_ms"]) == pytest.approx(50.0)
    assert (top.level, top.message) == (OK, "ok") and top.values["frames"] == "15"
    assert (left.level, left.message, left.hardware_id) == (OK, "ok", "left")

    loop.estop = True
    loop.tick(t, RUNNING)
    cmd = diagnostics(loop, t, "n", running)[0]
    assert cmd.level == WARN and cmd.message.startswith("holding: e-stop engaged")
    assert cmd.values["held"] == "True" and cmd.values["hold_reasons"] == "estop"
    loop.inference_failed("inference failed: boom")
    inf = diagnostics(loop, t, "n", running)[1]
    assert (inf.level, inf.message) == (ERROR, "inference failed: boom")
    stale = diagnostics(loop, t + 1.0, "n", running)[2]
    assert stale.level == WARN and stale.message.startswith("stale (")
