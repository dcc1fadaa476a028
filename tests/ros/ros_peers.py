"""Small ROS 2 programs that the interface tests start as separate processes (real rclpy over DDS).

Each prints one JSON line with what it saw, so the test process never has to import rclpy itself.
    python ros_peers.py publish-chunks --count N
    python ros_peers.py subscribe-chunks --count N --timeout S
    python ros_peers.py serve           (ReloadPolicy service + Calibrate action server until killed)
    python ros_peers.py call-reload --path P
    python ros_peers.py call-calibrate --budget B
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import rclpy
from builtin_interfaces.msg import Duration
from rclpy.action import ActionClient, ActionServer
from rclpy.node import Node

from qvla_msgs.action import Calibrate
from qvla_msgs.msg import ActionChunk
from qvla_msgs.srv import ReloadPolicy

JOINTS = [f"{arm}_joint{i}" for arm in ("left", "right") for i in range(1, 7)]


def make_chunk(seq: int) -> ActionChunk:
    horizon = 4
    msg = ActionChunk()
    msg.header.frame_id = str(seq)
    msg.model_id = "test-model"
    msg.joint_names = JOINTS
    msg.horizon = horizon
    msg.step_period = Duration(sec=0, nanosec=33_333_333)
    msg.positions = [seq + 0.001 * k for k in range(horizon * len(JOINTS))]
    msg.inference_latency = 0.01 * seq
    return msg


def wait_for_subscribers(node: Node, pub, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    return pub.get_subscription_count() > 0


def publish_chunks(args) -> dict:
    node = Node("chunk_publisher")
    pub = node.create_publisher(ActionChunk, "/qvla_test/chunks", 10)
    matched = wait_for_subscribers(node, pub, args.timeout)
    for seq in range(args.count):
        pub.publish(make_chunk(seq))
        time.sleep(0.02)
    time.sleep(0.5)  # let the last messages leave before the participant goes away
    return {"matched": matched, "published": args.count}


def subscribe_chunks(args) -> dict:
    node = Node("chunk_subscriber")
    got = []
    node.create_subscription(
        ActionChunk,
        "/qvla_test/chunks",
        lambda m: got.append(
            {
                "seq": int(m.header.frame_id),
                "joints": list(m.joint_names),
                "horizon": m.horizon,
                "period_ns": m.step_period.nanosec,
                "positions": list(m.positions),
                "latency": m.inference_latency,
                "model_id": m.model_id,
            }
        ),
        10,
    )
    deadline = time.monotonic() + args.timeout
    while len(got) < args.count and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    return {"received": got}


def serve(args) -> dict:
    node = Node("interface_server")

    def reload(request, response):
        response.success = request.artifact_path.endswith(".ok")
        response.message = f"reloaded {request.artifact_path}" if response.success else "refused"
        return response

    def calibrate(goal_handle):
        goal = goal_handle.request
        for i, stage in enumerate(("loading", "proxy", "exact", "allocate", "pack")):
            fb = Calibrate.Feedback(stage=stage, progress=(i + 1) / 5.0, detail=f"{len(goal.recordings)} recordings")
            goal_handle.publish_feedback(fb)
            time.sleep(0.05)
        goal_handle.succeed()
        return Calibrate.Result(
            artifact_path=goal.output_path or "/tmp/artifact",
            average_bits=goal.budget,
            summary=f"bits {list(goal.bit_set)}",
        )

    node.create_service(ReloadPolicy, "/qvla_test/reload_policy", reload)
    ActionServer(node, Calibrate, "/qvla_test/calibrate", calibrate)
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    return {"stopped": True}


def call_reload(args) -> dict:
    node = Node("reload_client")
    client = node.create_client(ReloadPolicy, "/qvla_test/reload_policy")
    if not client.wait_for_service(timeout_sec=args.timeout):
        return {"error": "service not available"}
    future = client.call_async(ReloadPolicy.Request(artifact_path=args.path))
    rclpy.spin_until_future_complete(node, future, timeout_sec=args.timeout)
    res = future.result()
    return {"success": res.success, "message": res.message}


def call_calibrate(args) -> dict:
    node = Node("calibrate_client")
    client = ActionClient(node, Calibrate, "/qvla_test/calibrate")
    if not client.wait_for_server(timeout_sec=args.timeout):
        return {"error": "action server not available"}
    feedback = []
    goal = Calibrate.Goal(
        recordings=["a.mcap", "b.mcap"], budget=args.budget, bit_set=[0, 2, 4, 8, 16], output_path="/tmp/out"
    )
    send = client.send_goal_async(
        goal, feedback_callback=lambda f: feedback.append({"stage": f.feedback.stage, "progress": f.feedback.progress})
    )
    rclpy.spin_until_future_complete(node, send, timeout_sec=args.timeout)
    handle = send.result()
    if not handle.accepted:
        return {"error": "goal rejected"}
    result_future = handle.get_result_async()
    rclpy.spin_until_future_complete(node, result_future, timeout_sec=args.timeout)
    res = result_future.result().result
    return {
        "artifact_path": res.artifact_path,
        "average_bits": res.average_bits,
        "summary": res.summary,
        "feedback": feedback,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--path", default="")
    parser.add_argument("--budget", type=float, default=4.0)
    args = parser.parse_args()
    modes = {
        "publish-chunks": publish_chunks,
        "subscribe-chunks": subscribe_chunks,
        "serve": serve,
        "call-reload": call_reload,
        "call-calibrate": call_calibrate,
    }
    rclpy.init()
    try:
        out = modes[args.mode](args)
    finally:
        rclpy.try_shutdown()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
