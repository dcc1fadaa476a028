"""Read an episode (rosbag2 + MCAP) into time-aligned 30 Hz training/calibration samples.

    ep = read_episode("demos/episode_000000", horizon=50)
    s = ep.samples[0]
    s.images["top"]       # uint8 HxWx3 RGB, the latest frame not after the sample's command
    s.state               # float[14]: both arms' latest measured state not after it (left 6+g, right 6+g)
    s.actions             # float[50, 14]: this tick's command and the next 49 (the last one repeated at the end)
    ep.success, ep.metadata, ep.instruction

Alignment: samples sit on a `rate_hz` grid anchored at the first complete command (both arms); each takes the
latest command per arm at its grid time (within a quarter period of jitter), then, for that command's stamp,
the latest image per camera and the latest state per arm not after it. A sample whose image, state or command
is older than `max_staleness_s` is dropped and counted in `Episode.dropped` (a camera that froze must not
become training data).

Every problem with a file raises EpisodeError, whose message names the file, what is wrong and what to do. A
chunk whose CRC does not match (bytes changed after writing: disk, copy) raises EpisodeChecksumError, naming the
chunk's time range; `check_integrity` checks a whole file's CRCs (`qvla-episodes info` does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Reader

from qvla_ros.episodes.errors import EpisodeChecksumError, EpisodeError
from qvla_ros.episodes.repair import scan_mcap
from qvla_ros.episodes.topics import ARM_JOINTS, TopicConfig, load_topic_config
from qvla_ros.episodes.writer import CUSTOM_DATA_KEY, MCAP_MAGIC, typestore

SUPPORTED_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
REPAIR_HINT = "recover the complete part with `qvla-episodes repair {path}` (writes a new episode next to it)"
DAMAGE_HINT = "recover the intact chunks with `qvla-episodes repair {path}` (writes a new episode next to it)"


@dataclass
class Sample:
    images: dict[str, np.ndarray]  # camera -> uint8 HxWx3 RGB, read-only (shared between samples)
    state: np.ndarray  # float64[14]
    instruction: str
    actions: np.ndarray  # float64[H, 14]
    timestamp: float  # seconds since the episode's first message
    stamp_ns: int  # the bag timestamp of the sample's command


@dataclass
class Stream:
    """One topic's decoded messages: stamps (ns, sorted) and values in the same order."""

    stamps: np.ndarray
    values: list


@dataclass
class Streams:
    """All of an episode's decoded topics, keyed by role rather than topic name."""

    images: dict[str, Stream]  # camera name -> frames (uint8 HxWx3)
    state: dict[str, Stream]  # arm -> float[7] positions
    commands: dict[str, Stream]  # arm -> float[7]
    instruction: Stream  # str
    success: Stream  # bool
    metadata: Stream  # dict
    start_ns: int


@dataclass
class Episode:
    path: Path
    samples: list[Sample]
    instruction: str
    success: bool | None  # None when the episode has no success message (unfinished recording)
    metadata: dict
    camera_names: tuple[str, ...]
    joint_names: tuple[str, ...]
    rate_hz: float
    horizon: int
    start_ns: int
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)


# ---------------------------------------------------------------------------- opening
def _bag_dir(path: Path) -> Path:
    if not path.exists():
        raise EpisodeError(
            f"{path}: no such episode (expected a rosbag2 directory with metadata.yaml and an .mcap file); "
            "check the path"
        )
    if path.is_file():
        if path.suffix == ".mcap" and (path.parent / "metadata.yaml").exists():
            return path.parent
        if path.suffix == ".mcap":
            _check_magic(path)
            raise EpisodeError(
                f"{path}: a bare MCAP file without the episode's metadata.yaml (an unfinished recording, or "
                f"copied alone); " + REPAIR_HINT.format(path=path)
            )
        raise EpisodeError(f"{path}: not an episode (expected a rosbag2 directory or its .mcap file)")
    if not (path / "metadata.yaml").exists():
        mcaps = sorted(path.glob("*.mcap"))
        if mcaps:
            _check_magic(mcaps[0])
            raise EpisodeError(
                f"{path}: the recording was never closed (no metadata.yaml beside {mcaps[0].name}: the recorder "
                "crashed or is still running); " + REPAIR_HINT.format(path=path)
            )
        raise EpisodeError(f"{path}: not an episode (no metadata.yaml and no .mcap file in the directory)")
    return path


def _not_mcap(path: Path, why: str) -> EpisodeError:
    return EpisodeError(
        f"{path}: {why}, so it holds no recording and `qvla-episodes repair` cannot recover anything from it; "
        "restore the episode from a copy or record it again"
    )


def _check_magic(path: Path) -> None:
    """EpisodeError unless the file starts like an MCAP file (an empty file, or another file under an .mcap name)."""
    with open(path, "rb") as f:
        magic = f.read(len(MCAP_MAGIC))
    if not magic:
        raise _not_mcap(path, "the file is empty (0 bytes)")
    if magic != MCAP_MAGIC[: len(magic)]:
        raise _not_mcap(path, f"not an MCAP file (it starts with {magic!r}, not the MCAP magic)")


def _mcap_files(bag: Path) -> list[Path]:
    return sorted(bag.glob("*.mcap"))


def _damage_error(bag: Path, scan) -> EpisodeError | None:
    """The EpisodeError for what `scan_mcap` found wrong in one of the bag's files, or None."""
    if scan.not_mcap:
        return _not_mcap(scan.path, scan.not_mcap)
    if scan.damaged:
        n = len(scan.damaged)
        return EpisodeChecksumError(
            f"{scan.path}: {n} damaged MCAP chunk{'s' if n > 1 else ''}: {scan.describe_damage()}; the bytes "
            "changed after they were written (disk, copy); " + DAMAGE_HINT.format(path=bag),
            scan.damaged,
        )
    if scan.problems:
        return EpisodeChecksumError(f"{scan.path}: {scan.describe_damage()}; " + DAMAGE_HINT.format(path=bag))
    return None


def _corrupt(bag: Path, err: Exception) -> EpisodeError:
    """rosbags could not read the bag: find out why, independently of rosbags, and say so."""
    for f in _mcap_files(bag):
        try:
            scan = scan_mcap(f, keep_messages=False)
        except OSError:
            continue
        error = _damage_error(bag, scan)
        if error is not None:
            return error
        if scan.stop:
            return EpisodeError(f"{f}: the MCAP file is incomplete: {scan.stop}; " + REPAIR_HINT.format(path=bag))
    return EpisodeError(
        f"{bag}: the MCAP file is truncated or corrupt ({type(err).__name__}: {err}); " + REPAIR_HINT.format(path=bag)
    )


def check_integrity(path: str | Path) -> str:
    """Check every CRC of an episode's MCAP file(s): raises EpisodeError (EpisodeChecksumError for a CRC
    mismatch); returns 'ok' when every chunk and section CRC matches, 'none' when the file carries no CRCs
    (written before qvla wrote them), or 'partial' when only some parts carry one."""
    bag = _bag_dir(Path(path))
    files = _mcap_files(bag)
    if not files:
        raise EpisodeError(f"{bag}: no .mcap file beside metadata.yaml (only MCAP episodes are supported)")
    states = set()
    for f in files:
        scan = scan_mcap(f, keep_messages=False)
        error = _damage_error(bag, scan)
        if error is not None:
            raise error
        if scan.stop:
            raise EpisodeError(f"{f}: {scan.stop}; " + REPAIR_HINT.format(path=bag))
        parts = [bool(c.crc) for c in scan.chunks] + [scan.data_crc == "ok", scan.summary_crc == "ok"]
        states.add("ok" if all(parts) else "none" if not any(parts) else "partial")
    return states.pop() if len(states) == 1 else "partial"


# ---------------------------------------------------------------------------- decoding
def decode_image(msg, where: str) -> np.ndarray:
    """sensor_msgs/Image -> uint8 HxWx3 RGB; mono8 is replicated to three channels, alpha dropped."""
    enc = str(msg.encoding).lower()
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}.get(enc)
    if channels is None:
        raise EpisodeError(
            f"{where}: image encoding {msg.encoding!r} is not supported (supported: {', '.join(SUPPORTED_ENCODINGS)}); "
            "record colour images as rgb8 (e.g. set the camera driver's color format to RGB8)"
        )
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if h <= 0 or w <= 0 or step < w * channels or data.size != step * h:
        raise EpisodeError(
            f"{where}: inconsistent image ({h}x{w} {enc}, step {step}, {data.size} bytes; expected step >= "
            f"{w * channels} and {step * h} bytes); the publisher filled the Image message wrongly"
        )
    img = data.reshape(h, step)[:, : w * channels].reshape(h, w, channels)
    if enc == "mono8":
        img = np.repeat(img, 3, axis=2)
    elif enc in ("bgr8", "bgra8"):
        img = img[:, :, 2::-1]
    img = np.ascontiguousarray(img[:, :, :3])
    # Samples share frames (a frame serves every sample until the next one): never let one be edited in place.
    img.setflags(write=False)
    return img


def decode_joint_state(msg, joints: tuple[str, ...], where: str) -> np.ndarray:
    """sensor_msgs/JointState -> float[7] in the configured joint order (by name when names are given)."""
    pos = np.asarray(msg.position, dtype=np.float64).reshape(-1)
    names = list(msg.name)
    if names:
        if len(names) != pos.size:
            raise EpisodeError(f"{where}: {len(names)} joint names but {pos.size} positions")
        index = {n: i for i, n in enumerate(names)}
        missing = [j for j in joints if j not in index]
        if missing:
            raise EpisodeError(
                f"{where}: joints {missing} missing (message has {names}); the arm's joint names must match "
                "config/topics.yaml (is this the other arm, or a differently named driver?)"
            )
        return pos[[index[j] for j in joints]]
    if pos.size != ARM_JOINTS:
        raise EpisodeError(f"{where}: {pos.size} positions without joint names; expected {ARM_JOINTS}")
    return pos


def read_streams(path: str | Path, topics: TopicConfig | None = None, cameras=None) -> Streams:
    """Decode every configured topic of an episode into time series (no alignment)."""
    path = Path(path)
    cfg = topics or load_topic_config()
    bag = _bag_dir(path)
    cameras = tuple(cameras or cfg.camera_names)
    ts = typestore()

    wanted: dict[str, tuple[str, str]] = {}  # topic -> (role, key)
    for c in cameras:
        wanted[cfg.camera(c).topic] = ("image", c)
    for a in cfg.arms:
        wanted[a.state.topic] = ("state", a.name)
        wanted[a.command.topic] = ("command", a.name)
    wanted[cfg.instruction.topic] = ("instruction", "")
    wanted[cfg.success.topic] = ("success", "")
    wanted[cfg.metadata.topic] = ("metadata", "")
    types = cfg.all_topics()

    raw: dict[str, list] = {t: [] for t in wanted}
    stamps: dict[str, list] = {t: [] for t in wanted}
    custom = {}
    try:
        with Reader(bag) as reader:
            # rosbags has no public accessor for metadata.yaml's custom_data.
            meta = getattr(getattr(reader, "storage", None), "metadata", None)
            custom = dict(getattr(meta, "custom", None) or {})
            present = {c.topic: c.msgtype for c in reader.connections}
            for t in wanted:
                if t in present and present[t] != types[t]:
                    raise EpisodeError(
                        f"{bag}: topic {t} has type {present[t]}, expected {types[t]} ({cfg.source}); "
                        "convert vendor messages to the configured types when recording"
                    )
            required = [t for t, (role, _) in wanted.items() if role in ("image", "state", "command")]
            missing = [t for t in required if present.get(t) is None or not _count(reader, t)]
            if missing:
                raise EpisodeError(
                    f"{bag}: required topic(s) missing or empty: {', '.join(missing)} (present: "
                    f"{', '.join(sorted(present)) or 'none'}); record with the topics of {cfg.source}, or pass "
                    "the topic configuration the episode was recorded with"
                )
            conns = [c for c in reader.connections if c.topic in wanted]
            for conn, stamp, data in reader.messages(connections=conns):
                raw[conn.topic].append(data)
                stamps[conn.topic].append(stamp)
    except EpisodeError:
        raise
    except Exception as e:
        # Truncation, corrupt length fields and bad zstd frames surface from inside rosbags as ReaderError,
        # struct.error, OverflowError, zstd errors, ...: all mean the file cannot be trusted.
        raise _corrupt(bag, e) from e

    def decode(topic: str, fn) -> Stream:
        order = np.argsort(np.asarray(stamps[topic], dtype=np.int64), kind="stable")
        st = np.asarray(stamps[topic], dtype=np.int64)[order]
        values = []
        for i in order:
            try:
                msg = ts.deserialize_cdr(raw[topic][i], types[topic])
            except Exception as e:
                raise EpisodeError(
                    f"{bag}: message {i} on {topic} does not decode as {types[topic]} ({e}); the file is corrupt "
                    "or was written with another type"
                ) from e
            values.append(fn(msg, f"{bag} {topic} @ {stamps[topic][i]}"))
        return Stream(st, values)

    images, state, commands = {}, {}, {}
    for t, (role, key) in wanted.items():
        if role == "image":
            images[key] = decode(t, decode_image)
        elif role in ("state", "command"):
            joints = cfg.arm(key).joints
            s = decode(t, lambda m, w, j=joints: decode_joint_state(m, j, w))
            (state if role == "state" else commands)[key] = s
    instruction = decode(cfg.instruction.topic, lambda m, w: str(m.data))
    success = decode(cfg.success.topic, lambda m, w: bool(m.data))

    def parse_meta(m, where):
        try:
            return json.loads(m.data)
        except json.JSONDecodeError as e:
            raise EpisodeError(f"{where}: metadata is not JSON ({e})") from e

    metadata = decode(cfg.metadata.topic, parse_meta)
    if not metadata.values and CUSTOM_DATA_KEY in custom:
        metadata = Stream(np.zeros(1, dtype=np.int64), [json.loads(custom[CUSTOM_DATA_KEY])])
    all_stamps = [s.stamps[0] for s in (*images.values(), *state.values(), *commands.values()) if s.stamps.size]
    return Streams(images, state, commands, instruction, success, metadata, int(min(all_stamps)))


def _count(reader, topic: str) -> int:
    return sum(c.msgcount for c in reader.connections if c.topic == topic)


# ---------------------------------------------------------------------------- alignment
def _latest(stamps: np.ndarray, t: int) -> int:
    """Index of the last stamp <= t, or -1."""
    return int(np.searchsorted(stamps, t, side="right")) - 1


def build_samples(
    streams: Streams,
    horizon: int = 50,
    rate_hz: float = 30.0,
    max_staleness_s: float = 0.1,
    instruction: str = "",
    arm_order: tuple[str, ...] = ("left", "right"),
) -> tuple[list[Sample], dict[str, int]]:
    """Align decoded streams into samples (see the module docstring); returns (samples, dropped counts)."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if rate_hz <= 0:
        raise ValueError(f"rate_hz must be positive, got {rate_hz}")
    cmds = [streams.commands[a] for a in arm_order]
    start = max(int(c.stamps[0]) for c in cmds)
    end = max(int(c.stamps[-1]) for c in cmds)
    period_ns = 1e9 / rate_hz
    jitter = int(0.25 * period_ns)
    stale = int(max_staleness_s * 1e9)
    grid = start + np.round(np.arange(int((end + jitter - start) // period_ns) + 1) * period_ns).astype(np.int64)

    # The 14-dim command at every grid time, and the stamp at which it was complete.
    cmd_idx = np.array([[_latest(c.stamps, int(g) + jitter) for c in cmds] for g in grid])
    command = np.array([np.concatenate([cmds[a].values[i] for a, i in enumerate(row)]) for row in cmd_idx])
    cmd_stamp = np.array([max(int(cmds[a].stamps[i]) for a, i in enumerate(row)) for row in cmd_idx])
    cmd_oldest = np.array([min(int(cmds[a].stamps[i]) for a, i in enumerate(row)) for row in cmd_idx])

    samples: list[Sample] = []
    dropped: dict[str, int] = {}
    for k, g in enumerate(grid):
        ref = int(cmd_stamp[k])
        reason = None
        if g - cmd_oldest[k] > stale:
            reason = "stale command"
        images = {}
        for cam, s in streams.images.items():
            i = _latest(s.stamps, ref)
            if i < 0:
                reason = reason or f"no {cam} image yet"
            elif ref - s.stamps[i] > stale:
                reason = reason or f"stale {cam} image"
            else:
                images[cam] = s.values[i]
        state = []
        for arm in arm_order:
            s = streams.state[arm]
            i = _latest(s.stamps, ref)
            if i < 0:
                reason = reason or f"no {arm} state yet"
            elif ref - s.stamps[i] > stale:
                reason = reason or f"stale {arm} state"
            else:
                state.append(s.values[i])
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        j = np.minimum(np.arange(k, k + horizon), len(grid) - 1)
        text = instruction
        if streams.instruction.values:
            i = _latest(streams.instruction.stamps, ref)
            text = streams.instruction.values[max(i, 0)]
        samples.append(
            Sample(
                images=images,
                state=np.concatenate(state),
                instruction=text,
                actions=command[j].copy(),
                timestamp=(ref - streams.start_ns) / 1e9,
                stamp_ns=ref,
            )
        )
    return samples, dropped


def read_episode(
    path: str | Path,
    horizon: int = 50,
    rate_hz: float = 30.0,
    topics: TopicConfig | None = None,
    max_staleness_s: float = 0.1,
    cameras: tuple[str, ...] | None = None,
) -> Episode:
    """Read an episode into aligned samples; see the module docstring. Raises EpisodeError."""
    path = Path(path)
    cfg = topics or load_topic_config()
    streams = read_streams(path, cfg, cameras)
    metadata = dict(streams.metadata.values[-1]) if streams.metadata.values else {}
    instruction = streams.instruction.values[0] if streams.instruction.values else metadata.get("instruction")
    if not instruction:
        raise EpisodeError(
            f"{path}: no instruction (nothing on {cfg.instruction.topic} and none in the metadata); "
            "publish the task instruction while recording"
        )
    samples, dropped = build_samples(
        streams, horizon, rate_hz, max_staleness_s, instruction=instruction, arm_order=cfg.arm_order
    )
    if not samples:
        raise EpisodeError(
            f"{path}: no sample has fresh images, state and commands (dropped: {dropped}); check that every "
            f"camera and arm was recording, or raise max_staleness_s (now {max_staleness_s} s)"
        )
    success = bool(streams.success.values[-1]) if streams.success.values else None
    return Episode(
        path=path,
        samples=samples,
        instruction=instruction,
        success=success,
        metadata=metadata,
        camera_names=tuple(streams.images),
        joint_names=cfg.joint_names,
        rate_hz=float(rate_hz),
        horizon=int(horizon),
        start_ns=streams.start_ns,
        dropped=dropped,
    )
