"""Recording throughput of the recorder node: three 30 Hz cameras at 480x640 rgb8 (+ both arms' states at 50 Hz and
commands at 30 Hz), separate processes over real DDS (the shared-memory profile), for --minutes.

    PYTHONPATH=src .venv/bin/python bench/bench_recorder.py --minutes 10            # the claim: 10 min, no drops
    PYTHONPATH=src .venv/bin/python bench/bench_recorder.py --minutes 0.5 --compress off

A publisher process sends the camera frames (pre-rendered, camera-like: smooth gradients, moving shapes and sensor
noise, so that compression does what it would on real images) and joint states; the recorder node records one
episode over the window (EpisodeControl START/STOP from this process). Printed: per topic messages, rate, MB/s and
drops (the recorder's queue, gaps in the publisher's DDS sequence numbers, samples the middleware reported lost), the
totals (messages/s, payload MB/s, MB/s written to disk), and the CPU time of the recorder and the publisher.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def publish(args) -> int:
    """The publisher process: cameras, states, commands, the instruction, until killed."""
    import numpy as np
    import rclpy
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    from qvla_ros.episodes.topics import load_topic_config

    cfg = load_topic_config()
    rclpy.init()
    node = rclpy.create_node("bench_publisher")
    sensor = QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)
    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    h, w = args.height, args.width
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = {}
    for ci, cam in enumerate(cfg.cameras):
        frames[cam.name] = []
        for k in range(30):
            img = np.empty((h, w, 3), np.uint8)
            img[..., 0] = (xx * 200 // w + 20 * ci).astype(np.uint8)
            img[..., 1] = (yy * 180 // h + 3 * k).astype(np.uint8)
            img[..., 2] = 90
            cx, cy = int(w * (0.3 + 0.4 * k / 30)), int(h * 0.5)
            img[max(0, cy - 40) : cy + 40, max(0, cx - 40) : cx + 40] = (200, 30, 30)
            noise = rng.integers(-4, 5, size=img.shape)
            frames[cam.name].append(np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8).reshape(-1))
    cams = [(cam, node.create_publisher(Image, cam.topic, sensor)) for cam in cfg.cameras]
    states = [(a, node.create_publisher(JointState, a.state.topic, sensor)) for a in cfg.arms]
    cmds = [(a, node.create_publisher(JointState, a.command.topic, reliable)) for a in cfg.arms]
    node.create_publisher(String, cfg.instruction.topic, latched).publish(String(data="benchmark the recorder"))
    sent = {"camera": 0, "state": 0, "command": 0}
    k = {"cam": 0}

    def camera_tick():
        stamp = node.get_clock().now().to_msg()
        i = k["cam"] % 30
        k["cam"] += 1
        for cam, pub in cams:
            msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=3 * w)
            msg.header.stamp, msg.header.frame_id = stamp, cam.frame_id
            msg.data = frames[cam.name][i].tobytes()
            pub.publish(msg)
            sent["camera"] += 1

    def joints(pubs, key):
        stamp = node.get_clock().now().to_msg()
        for arm, pub in pubs:
            msg = JointState(name=list(arm.joints), position=[0.1 * (time.monotonic() % 1)] * 7)
            msg.header.stamp = stamp
            pub.publish(msg)
            sent[key] += 1

    node.create_timer(1 / 30, camera_tick)
    node.create_timer(1 / 50, lambda: joints(states, "state"))
    node.create_timer(1 / 30, lambda: joints(cmds, "command"))
    print(json.dumps({"ready": True}), flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, Exception):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--compress", choices=("on", "off"), default="on", help="zstd MCAP chunks (the node's default)")
    ap.add_argument("--fsync", choices=("on", "off"), default="on")
    ap.add_argument("--dataset", default=None, help="where to record (default: a temporary directory, removed)")
    ap.add_argument("--domain-id", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--publish", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publish:
        return publish(args)

    from qvla_ros.dds import local_dds_environment

    domain = args.domain_id if args.domain_id is not None else 150 + os.getpid() % 50
    env = local_dds_environment(domain)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    os.environ.update(env)
    tmp = tempfile.TemporaryDirectory(prefix="qvla_bench_recorder_")
    dataset = Path(args.dataset or Path(tmp.name) / "ds")
    from qvla_ros.episodes.recorder import free_bytes

    need = args.minutes * 60 * 3 * 30 * args.width * args.height * 3 * 1.05 + 2e9  # uncompressed, plus the margin
    if free_bytes(dataset) < need:
        print(
            f"bench_recorder: error: {free_bytes(dataset) / 1e9:.1f} GB free where {dataset} goes, {need / 1e9:.1f} "
            "GB needed: pass --dataset on a bigger disk or fewer --minutes",
            file=sys.stderr,
        )
        return 2
    pub = subprocess.Popen(
        [sys.executable, __file__, "--publish", "--width", str(args.width), "--height", str(args.height)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    rec = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qvla_ros.nodes.recorder_node",
            "--ros-args",
            "-r",
            "__ns:=/qvla",
            "-p",
            f"recorder.dataset:={dataset}",
            "-p",
            "recorder.keyboard:=false",
            "-p",
            f"recorder.compress:={'true' if args.compress == 'on' else 'false'}",
            "-p",
            f"recorder.fsync:={'true' if args.fsync == 'on' else 'false'}",
            "-p",
            "recorder.min_free_gb:=1.0",
            "-p",
            "recorder.status_period:=0.0",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    from qvla_msgs.srv import EpisodeControl

    rclpy.init()
    node = rclpy.create_node("bench_recorder")
    status = []
    node.create_subscription(
        String,
        "/qvla/recorder/status",
        lambda m: status.append(json.loads(m.data)),
        QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
    )
    client = node.create_client(EpisodeControl, "/qvla/recorder/episode")

    def call(command):
        fut = client.call_async(EpisodeControl.Request(command=command))
        rclpy.spin_until_future_complete(node, fut, timeout_sec=120)
        if not fut.done() or not fut.result().success:
            raise RuntimeError(f"EpisodeControl {command}: {fut.result().message if fut.done() else 'no answer'}")
        return fut.result()

    try:
        pub.stdout.readline()  # ready
        if not client.wait_for_service(timeout_sec=60):
            raise RuntimeError(f"the recorder did not start: {rec.stderr.read()[-2000:] if rec.poll() else ''}")
        time.sleep(3.0)  # discovery, and the first frames through
        cpu0 = {n: cpu_seconds(p.pid) for n, p in (("recorder", rec), ("publisher", pub))}
        t0 = time.monotonic()
        call(EpisodeControl.Request.START)
        print(
            f"recording {args.minutes:g} min of 3 x {args.width}x{args.height} rgb8 @ 30 Hz (+ states 50 Hz, "
            f"commands 30 Hz), compress {args.compress}, fsync {args.fsync} ...",
            flush=True,
        )
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.5)
            if rec.poll() is not None:
                raise RuntimeError(f"the recorder exited: {rec.stderr.read()[-2000:]}")
        stop = json.loads(call(EpisodeControl.Request.STOP).message)
        wall = time.monotonic() - t0
        cpu = {n: cpu_seconds(p.pid) - cpu0[n] for n, p in (("recorder", rec), ("publisher", pub))}
    finally:
        for p in (rec, pub):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        node.destroy_node()
        rclpy.try_shutdown()

    import yaml

    # the episode's final metadata (metadata.yaml's custom data): decoding 10 minutes of frames would take longer
    info = yaml.safe_load((Path(stop["path"]) / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    meta = json.loads(info["custom_data"]["qvla.metadata"])
    dur = stop["duration_s"]
    rows = []
    for topic, v in sorted(meta["topics"].items()):
        rows.append(
            (
                topic,
                v["messages"],
                v["rate_hz"],
                v["bytes"] / dur / 1e6,
                v["drops"]["queue"],
                v["drops"]["sequence_gaps"],
                v["drops"]["middleware_lost"],
            )
        )
    print(f"\n{'topic':<42} {'messages':>9} {'rate Hz':>8} {'MB/s':>7} {'queue':>6} {'seq gap':>8} {'lost':>5}")
    for r in rows:
        print(f"{r[0]:<42} {r[1]:>9} {r[2]:>8.2f} {r[3]:>7.2f} {r[4]:>6} {r[5]:>8} {r[6]:>5}")
    total_msgs = sum(r[1] for r in rows)
    payload = sum(v["bytes"] for v in meta["topics"].values())
    summary = {
        "minutes": dur / 60,
        "image": f"{args.width}x{args.height}",
        "compress": args.compress,
        "fsync": args.fsync,
        "messages": total_msgs,
        "messages_per_s": total_msgs / dur,
        "payload_mb_per_s": payload / dur / 1e6,
        "disk_mb_per_s": stop["file_bytes"] / dur / 1e6,
        "file_mb": stop["file_bytes"] / 1e6,
        "compression_ratio": payload / max(1, stop["file_bytes"]),
        "dropped": stop["dropped"],
        "recorder_cpu_percent": 100 * cpu["recorder"] / wall,
        "publisher_cpu_percent": 100 * cpu["publisher"] / wall,
    }
    print(
        f"\ntotal: {summary['messages_per_s']:.1f} messages/s, {summary['payload_mb_per_s']:.1f} MB/s payload, "
        f"{summary['disk_mb_per_s']:.1f} MB/s to disk ({summary['file_mb']:.0f} MB, compression "
        f"{summary['compression_ratio']:.2f}x), drops {summary['dropped']} over {summary['minutes']:.2f} min; "
        f"CPU: recorder {summary['recorder_cpu_percent']:.0f}% of a core, publisher "
        f"{summary['publisher_cpu_percent']:.0f}%"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "topics": rows}, indent=1))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
