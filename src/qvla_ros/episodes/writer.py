"""Write one episode as a rosbag2 (MCAP storage) that ROS 2 tools, rclpy and plain MCAP readers can open.

    with EpisodeWriter("demos/episode_000000", metadata={"task": "transfer_cube", "seed": 0}) as w:
        w.write_instruction(t0, "pick up the red cube ...")
        w.write_state(t_ns, qpos14, qvel14)          # both arms, on their own topics
        w.write_image("top", t_ns, rgb)              # uint8 HxWx3
        w.write_command(t_ns, q14)                   # the 30 Hz command stream, per arm
        w.finish(t_end_ns, success=True, metadata={"duration_s": 8.0})

Topics and types come from config/topics.yaml. Messages are serialized with rosbags' ROS 2 Kilted typestore
(type hashes match rclpy's). The MCAP chunks are zstd-compressed and written to disk at least once per
`flush_every_s` of message time, so a recorder that crashes loses at most that much; the reader detects such an
unfinished file and `qvla-episodes repair` recovers everything up to the last complete chunk.

Every chunk carries the CRC32 of its uncompressed records, and a closed file the CRC32 of its data section (in
DataEnd) and of its summary (in the Footer), as the MCAP specification describes: rosbags' MCAP writer leaves them
all 0 ("not computed"), so `_ChecksummedMcapWriter` fills them in as each chunk is written (a crashed recording's
flushed chunks are checksummed too). The reader and `qvla-episodes repair` check them; files written before
(CRC 0) still read, unchecked.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Writer
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode, StoragePlugin
from rosbags.rosbag2.storage_mcap import McapWriter
from rosbags.typesys import Stores, get_typestore

from qvla_ros.episodes.topics import ARM_JOINTS, TopicConfig, load_topic_config

FORMAT_NAME = "qvla-episode"
FORMAT_VERSION = 1
ROSBAG_VERSION = 9
# Simulated episodes are stamped with sim time from this fixed epoch (2023-11-14T22:13:20Z), so two recordings of
# the same seed are identical and every stamp is a plausible wall-clock time for ROS tools.
SIM_EPOCH_NS = 1_700_000_000 * 10**9
CUSTOM_DATA_KEY = "qvla.metadata"

_TYPESTORE = None


def typestore():
    """The ROS 2 Kilted type store shared by the writer and the reader."""
    global _TYPESTORE
    if _TYPESTORE is None:
        _TYPESTORE = get_typestore(Stores.ROS2_KILTED)
    return _TYPESTORE


def sim_stamp_ns(t: float) -> int:
    """Bag timestamp of sim time t (seconds since reset)."""
    return SIM_EPOCH_NS + int(round(t * 1e9))


# ---------------------------------------------------------------------------- MCAP checksums
MCAP_MAGIC = b"\x89MCAP0\r\n"
_OP_FOOTER, _OP_CHUNK, _OP_DATA_END = 0x02, 0x06, 0x0F
_CHUNK_CRC_AT = 9 + 8 + 8 + 8  # opcode, length, message_start_time, message_end_time, uncompressed_size
_FOOTER_SIZE = 9 + 8 + 8 + 4  # opcode, length, summary_start, summary_offset_start, summary_crc


class _CrcFile:
    """The file rosbags' MCAP writer writes to: passes every byte on while keeping the CRC32 of all of them, and
    can hold the next writes back so that their CRC fields are filled in before they reach the file."""

    def __init__(self, raw, written: bytes):
        self.raw = raw
        self.crc = zlib.crc32(written)  # of every byte that reached `raw`, from the start of the file
        self.pos = len(written)
        self.held: bytearray | None = None
        self._close_asked = False

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if self.held is not None:
            self.held += data
        else:
            self.crc = zlib.crc32(data, self.crc)
            self.raw.write(data)
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        if self.held is not None:
            self._close_asked = True  # McapWriter.close closes the file before its CRCs are filled in
        else:
            self.raw.close()

    def hold(self) -> int:
        """Keep the following writes in memory; returns the file offset they start at."""
        self.held = bytearray()
        return self.pos

    def take(self) -> bytearray:
        held, self.held = self.held, None
        return held

    def put(self, data: bytearray) -> None:
        """Write what `take` returned (patched), then close the file if that was asked for meanwhile."""
        self.pos -= len(data)
        self.write(data)
        if self._close_asked:
            self.raw.close()

    def drop(self) -> None:
        """Forget what was held (a write failed half-way): the file keeps its last complete record."""
        self.pos -= len(self.take())
        if self._close_asked:
            self.raw.close()


class _ChecksummedMcapWriter(McapWriter):
    """rosbags' MCAP storage writer, plus the chunk, data-section and summary CRCs it leaves at 0."""

    def __init__(self, path: Path, compression: CompressionMode) -> None:
        super().__init__(path, compression)
        self.bio.flush()  # the magic and the Header record, which the data-section CRC covers too
        self.bio = _CrcFile(self.bio, self.path.read_bytes())

    def close_chunk(self) -> None:
        with self.chunk.bio.getbuffer() as records:
            crc = zlib.crc32(records)
        self.bio.hold()
        try:
            super().close_chunk()  # the Chunk record (CRC 0), then its MessageIndex records
        except BaseException:
            self.bio.drop()
            raise
        out = self.bio.take()
        if out[0] != _OP_CHUNK:
            raise RuntimeError(f"rosbags' MCAP writer wrote opcode {out[0]:#x} where a Chunk was expected")
        struct.pack_into("<I", out, _CHUNK_CRC_AT, crc)
        self.bio.put(out)

    def close(self, version: int, metadata: str) -> None:
        if self.chunk.bio.tell():
            self.close_chunk()
        start = self.bio.hold()
        try:
            super().close(version, metadata)  # Metadata, DataEnd, the summary, Footer, magic
            out = self.bio.take()
            self._fill_tail_crcs(out, start)
        except BaseException:
            self.bio.drop()  # left unfinished (no DataEnd): `qvla-episodes repair` recovers it
            raise
        self.bio.put(out)

    def _fill_tail_crcs(self, out: bytearray, start: int) -> None:
        at = 0
        while out[at] != _OP_DATA_END:  # the data section goes on (rosbags: the Metadata record) up to DataEnd
            (length,) = struct.unpack_from("<Q", out, at + 1)
            at += 9 + length
        struct.pack_into("<I", out, at + 9, zlib.crc32(out[:at], self.bio.crc))
        footer = len(out) - len(MCAP_MAGIC) - _FOOTER_SIZE
        if out[footer] != _OP_FOOTER or out[-len(MCAP_MAGIC) :] != MCAP_MAGIC:
            raise RuntimeError("rosbags' MCAP writer did not end the file with a Footer record and the magic")
        (summary_start,) = struct.unpack_from("<Q", out, footer + 9)
        if summary_start:
            crc_at = footer + _FOOTER_SIZE - 4
            struct.pack_into("<I", out, crc_at, zlib.crc32(out[summary_start - start : crc_at]))


class _Bag(Writer):
    STORAGE_PLUGINS = {**Writer.STORAGE_PLUGINS, StoragePlugin.MCAP: _ChecksummedMcapWriter}


def open_bag(path: str | Path, compress: bool = True) -> Writer:
    """A new rosbags rosbag2 writer (MCAP storage, zstd chunks when `compress`) that writes MCAP CRCs; opened."""
    w = _Bag(path, version=ROSBAG_VERSION, storage_plugin=StoragePlugin.MCAP)
    if compress:
        w.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    w.open()
    return w


class EpisodeWriter:
    """Writes one episode directory (rosbag2 metadata.yaml + one .mcap file); see the module docstring.

    Args:
        path: the episode directory to create (must not exist).
        topics: topic configuration (default: config/topics.yaml).
        metadata: JSON-serializable facts about the episode, written at the start and again (updated with
            `finish`'s) at the end, on the metadata topic and in the bag's custom data.
        compress: zstd-compress MCAP chunks (sim images shrink ~20x).
        flush_every_s: close the pending MCAP chunk and flush the file once this much message time has passed.
    """

    def __init__(
        self,
        path: str | Path,
        topics: TopicConfig | None = None,
        metadata: dict | None = None,
        compress: bool = True,
        flush_every_s: float = 1.0,
    ):
        self.path = Path(path)
        self.topics = topics or load_topic_config()
        self.metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "arm_order": list(self.topics.arm_order),
            "joint_names": list(self.topics.joint_names),
            "camera_names": list(self.topics.camera_names),
            "gripper_units": self.topics.gripper_units,
            **(metadata or {}),
        }
        self.compress = compress
        self.flush_every_ns = int(flush_every_s * 1e9)
        self._writer: Writer | None = None
        self._conn = {}
        self._last_flush_ns: int | None = None
        self._last_stamp_ns = 0
        self._chunks_seen = 0
        self.finished = False
        self.counts: dict[str, int] = {}
        self.flushed: dict[str, int] = {}  # per topic: messages in complete chunks handed to the OS

    # ---------------------------------------------------------------- lifetime
    def open(self) -> EpisodeWriter:
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists already: episodes are never overwritten; choose a new path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        w = open_bag(self.path, self.compress)
        ts = typestore()
        for topic, msgtype in self.topics.all_topics().items():
            self._conn[topic] = w.add_connection(topic, msgtype, typestore=ts)
            self.counts[topic] = 0
        self._writer = w
        return self

    def __enter__(self) -> EpisodeWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.finished and self._writer is not None:
            # Keep what was recorded: close properly, saying why the episode ended.
            self.metadata["aborted"] = f"{exc_type.__name__}: {exc}"
        self.close()

    def close(self) -> None:
        """Close the bag (writes the MCAP summary and metadata.yaml). Unfinished episodes are marked so."""
        if self._writer is None:
            return
        if not self.finished:
            self.metadata.setdefault("complete", False)
        self._writer.set_custom_data(CUSTOM_DATA_KEY, json.dumps(self.metadata, sort_keys=True))
        self._writer.close()
        self._writer = None

    # ---------------------------------------------------------------- messages
    def _header(self, stamp_ns: int, frame_id: str = ""):
        ts = typestore()
        Header = ts.types["std_msgs/msg/Header"]
        Time = ts.types["builtin_interfaces/msg/Time"]
        return Header(stamp=Time(sec=int(stamp_ns // 10**9), nanosec=int(stamp_ns % 10**9)), frame_id=frame_id)

    def _write(self, topic: str, stamp_ns: int, msg) -> None:
        if self._writer is None:
            raise RuntimeError(f"episode {self.path} is not open (use `with EpisodeWriter(...)` or .open())")
        data = typestore().serialize_cdr(msg, self.topics.all_topics()[topic])
        self.write_raw(topic, stamp_ns, data)

    def write_raw(self, topic: str, stamp_ns: int, cdr: bytes | memoryview) -> None:
        """Write an already CDR-serialized message (a recorder's raw subscription) on a configured topic."""
        if self._writer is None:
            raise RuntimeError(f"episode {self.path} is not open (use `with EpisodeWriter(...)` or .open())")
        if topic not in self._conn:
            raise KeyError(f"topic {topic} is not in {self.topics.source}")
        stamp_ns = int(stamp_ns)
        self._writer.write(self._conn[topic], stamp_ns, cdr)
        self.counts[topic] += 1
        self._last_stamp_ns = max(self._last_stamp_ns, stamp_ns)
        self._maybe_flush(stamp_ns)

    def flush(self, fsync: bool = False) -> dict[str, int]:
        """Close the pending MCAP chunk and hand the file to the OS now (`fsync`: and to the disk), whatever the
        message time: a recorder calls it when messages pause, so that a crash keeps everything written so far.
        Returns the per-topic counts of the messages that are now in complete chunks (`flushed`)."""
        if self._writer is None:
            raise RuntimeError(f"episode {self.path} is not open (use `with EpisodeWriter(...)` or .open())")
        storage = getattr(self._writer, "storage", None)
        chunk = getattr(storage, "chunk", None)
        if chunk is not None and getattr(chunk, "msgs", None) and hasattr(storage, "close_chunk"):
            storage.close_chunk()
            self._chunks_seen = len(storage.chunks)
        if storage is not None:
            storage.bio.flush()
            if fsync:
                os.fsync(getattr(storage.bio, "raw", storage.bio).fileno())
        self._last_flush_ns = self._last_stamp_ns or self._last_flush_ns
        self.flushed = dict(self.counts)
        return dict(self.flushed)

    def _maybe_flush(self, stamp_ns: int) -> None:
        storage = getattr(self._writer, "storage", None)
        n_chunks = len(getattr(storage, "chunks", ()))
        if n_chunks != self._chunks_seen:
            # rosbags wrote a full chunk on its own: hand it to the OS now rather than when the buffer fills.
            self._chunks_seen = n_chunks
            storage.bio.flush()
            self.flushed = dict(self.counts)  # rosbags closes a chunk right after the message that filled it
        if self._last_flush_ns is None:
            self._last_flush_ns = stamp_ns
            return
        if stamp_ns - self._last_flush_ns < self.flush_every_ns:
            return
        self._last_flush_ns = stamp_ns
        # rosbags keeps up to 1 MiB of messages in memory before it writes a chunk: close the chunk early and
        # push it to the OS so that a crash loses at most flush_every_s of data. Internal API, hence the guard.
        chunk = getattr(storage, "chunk", None)
        if chunk is not None and getattr(chunk, "msgs", None) and hasattr(storage, "close_chunk"):
            storage.close_chunk()
            self._chunks_seen = len(storage.chunks)
            storage.bio.flush()
            self.flushed = dict(self.counts)

    def write_image(self, camera: str, stamp_ns: int, image: np.ndarray, encoding: str = "rgb8") -> None:
        """One camera frame: uint8 HxWx3 (rgb8/bgr8) or HxWx4 (rgba8/bgra8) or HxW (mono8)."""
        cam = self.topics.camera(camera)
        img = np.ascontiguousarray(image)
        channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}.get(encoding)
        if channels is None:
            raise ValueError(f"unsupported image encoding {encoding!r}")
        expected = img.shape[2] if img.ndim == 3 else 1
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or expected != channels:
            raise ValueError(f"{camera}: expected uint8 image with {channels} channel(s), got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        Image = typestore().types["sensor_msgs/msg/Image"]
        msg = Image(
            header=self._header(stamp_ns, cam.frame_id),
            height=h,
            width=w,
            encoding=encoding,
            is_bigendian=0,
            step=w * channels,
            data=img.reshape(-1),
        )
        self._write(cam.topic, stamp_ns, msg)

    def _joint_state(self, arm: str, stamp_ns: int, position, velocity=None):
        spec = self.topics.arm(arm)
        pos = np.asarray(position, dtype=np.float64).reshape(-1)
        if pos.shape != (ARM_JOINTS,):
            raise ValueError(f"{arm} arm: expected {ARM_JOINTS} positions (6 joints + gripper), got {pos.shape}")
        vel = np.zeros(0) if velocity is None else np.asarray(velocity, dtype=np.float64).reshape(-1)
        if vel.size not in (0, ARM_JOINTS):
            raise ValueError(f"{arm} arm: expected {ARM_JOINTS} velocities, got {vel.shape}")
        JointState = typestore().types["sensor_msgs/msg/JointState"]
        return JointState(
            header=self._header(stamp_ns, f"{arm}_base_link"),
            name=list(spec.joints),
            position=pos,
            velocity=vel,
            effort=np.zeros(0),
        )

    def write_joint_state(self, arm: str, stamp_ns: int, position, velocity=None) -> None:
        """One arm's measured state (7 values: 6 joints in rad + normalized gripper opening)."""
        self._write(self.topics.arm(arm).state.topic, stamp_ns, self._joint_state(arm, stamp_ns, position, velocity))

    def write_state(self, stamp_ns: int, qpos14, qvel14=None) -> None:
        """Both arms' measured state from 14-dim vectors (left then right)."""
        for arm in self.topics.arm_order:
            sl = self.topics.arm_slice(arm)
            vel = None if qvel14 is None else np.asarray(qvel14)[sl]
            self.write_joint_state(arm, stamp_ns, np.asarray(qpos14)[sl], vel)

    def write_command(self, stamp_ns: int, q14) -> None:
        """One tick of the command stream (14-dim, left then right), one message per arm."""
        q = np.asarray(q14, dtype=np.float64).reshape(-1)
        if q.shape != (2 * ARM_JOINTS,):
            raise ValueError(f"a command has {2 * ARM_JOINTS} entries (left then right arm), got {q.shape}")
        for arm in self.topics.arm_order:
            topic = self.topics.arm(arm).command.topic
            self._write(topic, stamp_ns, self._joint_state(arm, stamp_ns, q[self.topics.arm_slice(arm)]))

    def write_instruction(self, stamp_ns: int, text: str) -> None:
        String = typestore().types["std_msgs/msg/String"]
        self._write(self.topics.instruction.topic, stamp_ns, String(data=str(text)))

    def write_metadata(self, stamp_ns: int, extra: dict | None = None) -> None:
        """Publish the episode's metadata (updated with `extra`) as JSON on the metadata topic."""
        if extra:
            self.metadata.update(extra)
        String = typestore().types["std_msgs/msg/String"]
        self._write(self.topics.metadata.topic, stamp_ns, String(data=json.dumps(self.metadata, sort_keys=True)))

    def finish(self, stamp_ns: int, success: bool, metadata: dict | None = None) -> None:
        """End the episode: success flag and final metadata, then close the bag."""
        Bool = typestore().types["std_msgs/msg/Bool"]
        self.metadata.update(metadata or {})
        self.metadata["success"] = bool(success)
        self.metadata["complete"] = True
        self._write(self.topics.success.topic, stamp_ns, Bool(data=bool(success)))
        self.write_metadata(stamp_ns)
        self.finished = True
        self.close()
