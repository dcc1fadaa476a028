"""Record demonstrations into a dataset directory, one episode (rosbag2 + MCAP) per demonstration. No ROS here:
the recorder node feeds it the raw CDR bytes its `raw=True` subscriptions receive, and it writes them unchanged.

    rec = DatasetRecorder("data/my_task", load_topic_config(), min_free_bytes=2 * 2**30)
    rec.open()                                    # disk margin, resume numbering, interrupted episodes (see below)
    rec.start(instruction="pick up the cube")     # episode_000007 (in data/my_task/.partial/ while recording)
    rec.put(topic, stamp_ns, cdr_bytes)           # from any thread; never blocks (a full queue counts a drop)
    rec.count_lost(topic, n)                      # drops seen by the middleware (lost samples, sequence gaps)
    info = rec.stop(success=True)                 # closed, moved to data/my_task/episode_000007, summary returned
    rec.discard()                                 # or: deleted
    rec.close()

Writing happens in one thread of its own (compression, flushing), so a subscription callback only queues bytes.
Durability: every `flush_every_s` (wall clock, also while messages pause) the pending MCAP chunk is closed and
handed to the OS (`fsync` also to the disk), so a process that dies, even by SIGKILL, leaves an .mcap whose chunks
up to the last flush are complete and checksummed; `flushed_counts()` says how many messages of each topic that is.
On the next `open()`, an episode left in `.partial/` is detected and, by `recover`:
"aside" (default) repaired into `.recovered/<name>` (outside the dataset: a person decides whether to keep it),
"keep" repaired into the dataset under its own number (marked incomplete), "report" left where it is.
Every outcome is appended to `episodes.jsonl` (kept, discarded, recovered, with counts and drops).

Each episode's metadata (topic /qvla/episode/metadata and the bag's custom data) carries per-topic message counts,
bytes, rates and drops (queue overflows in the recorder, samples the middleware reported lost, publisher sequence
gaps), so a recording that lost frames says so where the calibration reads it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qvla_ros.episodes.topics import TopicConfig
from qvla_ros.episodes.writer import EpisodeWriter, typestore

EPISODE_PREFIX = "episode_"
PARTIAL_DIR = ".partial"
RECOVERED_DIR = ".recovered"
LOG_FILE = "episodes.jsonl"
RECOVER_MODES = ("aside", "keep", "report")
RECORDER_VERSION = 1


class RecorderError(RuntimeError):
    """The recorder cannot do what was asked; the message names the directory or topic and what to do."""


def free_bytes(path: str | Path) -> int:
    """Free bytes for an unprivileged user on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def episode_index(name: str) -> int | None:
    """7 for 'episode_000007' (also 'episode_000007_repaired'), None for any other name."""
    if not name.startswith(EPISODE_PREFIX):
        return None
    digits = name[len(EPISODE_PREFIX) :].split("_", 1)[0]
    return int(digits) if digits.isdigit() else None


def list_episodes(root: str | Path) -> list[Path]:
    """The dataset's episode directories (kept ones: not .partial/.recovered), in index order."""
    root = Path(root)
    if not root.is_dir():
        return []
    eps = [p for p in root.iterdir() if p.is_dir() and episode_index(p.name) is not None]
    return sorted(eps, key=lambda p: (episode_index(p.name), p.name))


class SequenceTracker:
    """Messages missing in each publisher's sequence numbers (DDS numbers every sample a writer sends)."""

    def __init__(self):
        self._last: dict[tuple[str, bytes], int] = {}

    def gap(self, topic: str, publisher: bytes, seq: int | None) -> int:
        """How many messages of this publisher were skipped before `seq` (0 for the first one seen)."""
        if seq is None:
            return 0
        key = (topic, publisher)
        last = self._last.get(key)
        self._last[key] = seq if last is None else max(last, seq)
        if last is None or seq <= last:
            return 0
        return seq - last - 1


@dataclass
class _TopicStats:
    messages: int = 0
    bytes: int = 0
    queue_drops: int = 0  # the writer could not keep up: dropped before writing
    sequence_gaps: int = 0  # messages missing between two a publisher sent (its sequence numbers)
    lost_events: int = 0  # messages the middleware reported lost (message_lost events): mostly the same ones
    arrivals: deque = field(default_factory=lambda: deque(maxlen=512))  # monotonic receive times, for the rate
    received: int = 0  # messages that arrived (written or dropped by the queue)
    first: float = 0.0
    last: float = 0.0

    def arrive(self, now: float) -> None:
        if not self.received:
            self.first = now
        self.received += 1
        self.last = now
        self.arrivals.append(now)

    def mean_rate(self) -> float:
        return (self.received - 1) / (self.last - self.first) if self.received > 1 and self.last > self.first else 0.0

    def rate(self, now: float, window: float = 2.0) -> float:
        recent = [t for t in self.arrivals if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)

    def as_dict(self, now: float) -> dict:
        return {
            "messages": self.messages,
            "bytes": self.bytes,
            "rate_hz": round(self.mean_rate(), 3),
            "drops": {
                "queue": self.queue_drops,
                "sequence_gaps": self.sequence_gaps,
                "middleware_lost": self.lost_events,
            },
            "dropped": self.dropped,
        }

    @property
    def dropped(self) -> int:
        # a sample the middleware loses is both a sequence gap and a lost event: count it once
        return self.queue_drops + max(self.sequence_gaps, self.lost_events)


@dataclass
class EpisodeInfo:
    """What `stop`/`discard` report about an episode."""

    index: int
    path: Path | None  # where it is now (None: discarded)
    outcome: str  # kept | discarded | stopped_disk_margin
    success: bool | None
    duration_s: float
    messages: int
    bytes: int  # message payload bytes
    file_bytes: int  # on disk
    dropped: int
    topics: dict

    def as_dict(self) -> dict:
        return {
            "episode": self.index,
            "path": None if self.path is None else str(self.path),
            "outcome": self.outcome,
            "success": self.success,
            "duration_s": round(self.duration_s, 3),
            "messages": self.messages,
            "bytes": self.bytes,
            "file_bytes": self.file_bytes,
            "dropped": self.dropped,
            "topics": self.topics,
        }


class _Episode:
    """The episode being recorded: its writer (used by the writer thread only) and its statistics."""

    def __init__(
        self,
        index: int,
        path: Path,
        final: Path,
        writer: EpisodeWriter,
        start_wall: float,
        start_mono: float,
        instruction: str,
    ):
        self.index = index
        self.path = path  # in .partial/
        self.final = final
        self.writer = writer
        self.start_wall = start_wall
        self.start_mono = start_mono
        self.instruction = instruction
        self.stats: dict[str, _TopicStats] = {}
        self.last_success: bool | None = None
        self.end_mono: float | None = None  # set by `cut`: later messages are not part of the episode


class DatasetRecorder:
    """See the module docstring.

    Args:
        root: the dataset directory (created; an existing one is resumed: numbering continues after it).
        topics: the topic configuration the episodes are recorded with (every recorded topic must be in it).
        metadata: facts written into every episode's metadata (rig, task, teleoperator, ...).
        compress: zstd-compress the MCAP chunks.
        flush_every_s: close and hand the pending chunk to the OS at least this often (wall clock).
        fsync: also force each flush to the disk (survives a power cut, not only a crash of the process).
        min_free_bytes: refuse to start (and stop a running episode) when the disk has less free space than this.
        max_queue_bytes: message bytes waiting for the writer thread at most; more are dropped and counted.
        recover: what `open` does with an interrupted episode: aside | keep | report (module docstring).
        on_flush: called (in the writer thread) with the per-topic flushed counts after each flush.
    """

    def __init__(
        self,
        root: str | Path,
        topics: TopicConfig,
        *,
        metadata: dict | None = None,
        compress: bool = True,
        flush_every_s: float = 1.0,
        fsync: bool = True,
        min_free_bytes: int = 1 << 30,
        max_queue_bytes: int = 512 << 20,
        recover: str = "aside",
        on_flush: Callable[[dict], None] | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ):
        if recover not in RECOVER_MODES:
            raise ValueError(f"recover must be one of {', '.join(RECOVER_MODES)}, got {recover!r}")
        if flush_every_s <= 0:
            raise ValueError(f"flush_every_s must be positive, got {flush_every_s}")
        self.root = Path(root)
        self.topics = topics
        self.metadata = dict(metadata or {})
        self.compress = compress
        self.flush_every_s = float(flush_every_s)
        self.fsync = fsync
        self.min_free_bytes = int(min_free_bytes)
        self.max_queue_bytes = int(max_queue_bytes)
        self.recover = recover
        self.on_flush = on_flush
        self.clock_ns = clock_ns
        self.known_topics = topics.all_topics()
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._queued_bytes = 0
        self._episode: _Episode | None = None
        self._next_index = 0
        self._thread: threading.Thread | None = None
        self._flushed: dict[str, int] = {}
        self._stop_reason = ""
        self.writer_error = ""
        self.recovered: list[dict] = []  # what `open` found and did about interrupted episodes
        self.kept = 0
        self.discarded = 0

    # ---------------------------------------------------------------- lifetime
    def open(self) -> DatasetRecorder:
        """Check the disk margin, create or resume the dataset directory, handle interrupted episodes."""
        self.check_disk()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecorderError(f"cannot create the dataset directory {self.root}: {e}") from None
        if not os.access(self.root, os.W_OK):
            raise RecorderError(f"the dataset directory {self.root} is not writable; choose another one")
        self.recovered = self._handle_interrupted()
        self._next_index = self._scan_next_index()
        self._thread = threading.Thread(target=self._writer_loop, name="qvla-recorder-writer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the writer thread; an episode still recording is kept (marked 'stopped: recorder closed')."""
        if self._episode is not None:
            try:
                self.stop(reason="recorder closed")
            except RecorderError:
                pass
        if self._thread is not None:
            self._queue.put(("quit", None, None))
            self._thread.join(timeout=30.0)
            self._thread = None

    def __enter__(self) -> DatasetRecorder:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def next_index(self) -> int:
        return self._next_index

    @property
    def recording(self) -> bool:
        return self._episode is not None

    def check_disk(self) -> int:
        """Free bytes; RecorderError when below the margin."""
        free = free_bytes(self.root)
        if free < self.min_free_bytes:
            raise RecorderError(
                f"only {_human(free)} free on the disk holding {self.root}, less than the margin of "
                f"{_human(self.min_free_bytes)}: free some space, record elsewhere, or lower the margin "
                "(recorder.min_free_gb)"
            )
        return free

    def _scan_next_index(self) -> int:
        indices = []
        for folder in (self.root, self.root / PARTIAL_DIR, self.root / RECOVERED_DIR):
            if folder.is_dir():
                indices += [episode_index(p.name) for p in folder.iterdir()]
        try:  # numbers of discarded episodes are never reused either: episodes.jsonl lists them
            for line in (self.root / LOG_FILE).read_text().splitlines():
                indices.append(json.loads(line).get("episode"))
        except (OSError, ValueError, AttributeError):
            pass
        indices = [i for i in indices if isinstance(i, int)]
        return max(indices) + 1 if indices else 0

    def _handle_interrupted(self) -> list[dict]:
        from qvla_ros.episodes.reader import EpisodeError
        from qvla_ros.episodes.repair import repair_episode

        partial = self.root / PARTIAL_DIR
        found = []
        if not partial.is_dir():
            return found
        for p in sorted(partial.iterdir()):
            if not p.is_dir() or episode_index(p.name) is None:
                continue
            entry = {"episode": episode_index(p.name), "path": str(p), "action": self.recover}
            if self.recover == "report":
                entry["message"] = f"interrupted episode {p} left as it is; recover it with `qvla-episodes repair {p}`"
                found.append(entry)
                continue
            target_dir = self.root if self.recover == "keep" else self.root / RECOVERED_DIR
            target_dir.mkdir(parents=True, exist_ok=True)
            target = target_dir / p.name
            try:
                if target.exists():
                    raise EpisodeError(f"{target} exists already")
                out, report = repair_episode(p, target)
                shutil.rmtree(p)
                entry.update(
                    path=str(out),
                    messages=report["messages_recovered"],
                    stopped_at=report["stopped_at"],
                    dropped_chunks=len(report["dropped_chunks"]),
                    message=f"interrupted episode {p.name}: {report['messages_recovered']} messages "
                    f"recovered into {out}"
                    + ("" if self.recover == "keep" else " (outside the dataset: move it in to use it)"),
                )
            except EpisodeError as e:
                # nothing recoverable (e.g. killed before the first flush): set aside, say so
                aside = self.root / RECOVERED_DIR / (p.name + "_unrecoverable")
                aside.parent.mkdir(parents=True, exist_ok=True)
                if not aside.exists():
                    shutil.move(str(p), str(aside))
                entry.update(
                    path=str(aside),
                    messages=0,
                    message=f"interrupted episode {p.name} could not be recovered ({e}); moved to {aside}",
                )
            found.append(entry)
            self._log({"event": "recovered", **entry})
        try:
            partial.rmdir()
        except OSError:
            pass
        return found

    # ---------------------------------------------------------------- episodes (any thread)
    def start(
        self,
        instruction: str = "",
        metadata: dict | None = None,
        instruction_cdr: bytes | None = None,
    ) -> int:
        """Start recording the next episode; returns its index. `instruction_cdr`: the raw String message last
        received on the instruction topic (written at the start); `instruction`: a text to write instead."""
        with self._lock:
            if self._episode is not None:
                raise RecorderError(f"episode {self._episode.index} is still recording: stop or discard it first")
            if self._thread is None:
                raise RecorderError("the recorder is not open")
            if self.writer_error:
                raise RecorderError(f"the recorder's writer failed earlier ({self.writer_error}); restart it")
            self.check_disk()
            index = self._next_index
            name = f"{EPISODE_PREFIX}{index:06d}"
            partial = self.root / PARTIAL_DIR / name
            final = self.root / name
            if final.exists() or partial.exists():
                raise RecorderError(f"{final} exists already; episodes are never overwritten")
            partial.parent.mkdir(parents=True, exist_ok=True)
            now_wall = time.time()
            meta = {
                "source": "ros",
                "recorder": {
                    "version": RECORDER_VERSION,
                    "host": socket.gethostname(),
                    "compress": self.compress,
                    "flush_every_s": self.flush_every_s,
                    "fsync": self.fsync,
                },
                "episode_index": index,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now_wall)),
                "time_base": "receive time, system clock (ns)",
                **self.metadata,
                **(metadata or {}),
            }
            if instruction:
                meta["instruction"] = instruction
            writer = EpisodeWriter(
                partial, self.topics, metadata=meta, compress=self.compress, flush_every_s=self.flush_every_s
            )
            try:
                writer.open()
            except OSError as e:
                raise RecorderError(f"cannot create episode {partial}: {e}") from None
            ep = _Episode(index, partial, final, writer, now_wall, time.monotonic(), instruction)
            self._next_index += 1
            self._flushed = {}
            self._stop_reason = ""
            self._episode = ep
        stamp = self.clock_ns()
        self._queue.put(("begin", ep, (stamp, instruction, instruction_cdr)))
        return index

    def put(self, topic: str, stamp_ns: int, data: bytes | memoryview) -> bool:
        """Queue one raw message of the current episode (ignored when not recording). False when dropped."""
        ep = self._episode
        if ep is None:
            return False
        n = len(data)
        now = time.monotonic()
        with self._lock:
            if self._episode is not ep or ep.end_mono is not None:
                return False
            st = ep.stats.get(topic)
            if st is None:
                if topic not in self.known_topics:
                    raise RecorderError(
                        f"topic {topic} is not in {self.topics.source}: record only configured "
                        "topics (the episode format has no place for others)"
                    )
                st = ep.stats[topic] = _TopicStats()
            st.arrive(now)
            if self._queued_bytes + n > self.max_queue_bytes:
                st.queue_drops += 1
                return False
            self._queued_bytes += n
            st.messages += 1
            st.bytes += n
        self._queue.put(("msg", ep, (topic, int(stamp_ns), data, n)))
        return True

    def count_lost(self, topic: str, n: int = 1, kind: str = "sequence_gap") -> None:
        """Messages lost on `topic` during the current episode before they reached the recorder: kind
        "sequence_gap" (seen in the publisher's sequence numbers) or "middleware" (a message_lost event)."""
        ep = self._episode
        if ep is None or n <= 0:
            return
        with self._lock:
            st = ep.stats.setdefault(topic, _TopicStats())
            if kind == "middleware":
                st.lost_events += int(n)
            else:
                st.sequence_gaps += int(n)

    def note_success(self, value: bool) -> None:
        """The latest value seen on the episode success topic (used by `stop(success=None)`)."""
        ep = self._episode
        if ep is not None:
            ep.last_success = bool(value)

    def cut(self) -> None:
        """End the current episode's recording time now (later messages are left out) without closing it yet:
        call `stop` or `discard` next (e.g. after asking the rig for the outcome)."""
        with self._lock:
            if self._episode is not None and self._episode.end_mono is None:
                self._episode.end_mono = time.monotonic()

    def stop(
        self, success: bool | None = None, metadata: dict | None = None, reason: str = "", timeout: float = 60.0
    ) -> EpisodeInfo:
        """End the episode and keep it. success None: the last value seen on the success topic (`note_success`),
        else True (a kept demonstration). Waits until the file is closed and in place."""
        return self._end(keep=True, success=success, metadata=metadata, reason=reason, timeout=timeout)

    def discard(self, timeout: float = 60.0) -> EpisodeInfo:
        """End the episode and delete it (its number is not reused)."""
        return self._end(keep=False, success=None, metadata=None, reason="", timeout=timeout)

    def _end(self, keep: bool, success, metadata, reason, timeout) -> EpisodeInfo:
        with self._lock:
            ep = self._episode
            if ep is None:
                raise RecorderError("no episode is recording")
            self._episode = None  # later messages are not part of it
        if success is None:
            success = ep.last_success if ep.last_success is not None else True
        done = threading.Event()
        result: dict = {}
        self._queue.put(
            (
                "end",
                ep,
                (keep, bool(success), dict(metadata or {}), reason or self._stop_reason, self.clock_ns(), done, result),
            )
        )
        if not done.wait(timeout):
            raise RecorderError(f"episode {ep.index} was not closed within {timeout:.0f} s (the disk is too slow?)")
        if "error" in result:
            raise RecorderError(result["error"])
        info = result["info"]
        if keep:
            self.kept += 1
        else:
            self.discarded += 1
        self._log({"event": info.outcome, **info.as_dict()})
        return info

    # ---------------------------------------------------------------- status
    def flushed_counts(self) -> dict[str, int]:
        """Per topic: messages of the current episode that are in complete chunks handed to the OS."""
        return dict(self._flushed)

    def status(self) -> dict:
        """Counts and rates of the current episode (empty dict when not recording)."""
        ep = self._episode
        if ep is None:
            return {}
        now = time.monotonic()
        with self._lock:
            topics = {t: s.as_dict(now) for t, s in ep.stats.items()}
            for t, s in ep.stats.items():
                topics[t]["rate_hz"] = round(s.rate(now), 2)
            queued = self._queued_bytes
        return {
            "episode": ep.index,
            "duration_s": (ep.end_mono or now) - ep.start_mono,
            "topics": topics,
            "messages": sum(t["messages"] for t in topics.values()),
            "bytes": sum(t["bytes"] for t in topics.values()),
            "dropped": sum(t["dropped"] for t in topics.values()),
            "queued_bytes": queued,
            "file_bytes": _dir_bytes(ep.path),
        }

    def status_line(self, names: dict[str, str] | None = None) -> str:
        """One line for a person at the robot: episode, duration, per-topic rates, drops, MB written."""
        s = self.status()
        if not s:
            return f"not recording | next episode {self._next_index} | kept {self.kept}, discarded {self.discarded}"
        names = names or {}
        rates = " ".join(
            f"{names.get(t, t.rsplit('/', 3)[-3] if t.count('/') >= 3 else t)} {v['rate_hz']:.0f}Hz"
            for t, v in sorted(s["topics"].items())
        )
        return (
            f"episode {s['episode']} {s['duration_s']:6.1f} s | {rates} | drops {s['dropped']} | "
            f"{s['file_bytes'] / 1e6:.1f} MB"
        )

    # ---------------------------------------------------------------- the writer thread
    def _writer_loop(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                kind, ep, payload = self._queue.get(timeout=self.flush_every_s / 4)
            except queue.Empty:
                kind = None
            now = time.monotonic()
            try:
                if kind == "quit":
                    return
                if kind == "begin":
                    self._begin(ep, *payload)
                elif kind == "msg":
                    topic, stamp, data, n = payload
                    with self._lock:
                        self._queued_bytes -= n
                    if not self.writer_error:
                        ep.writer.write_raw(topic, stamp, data)
                        if topic == self.topics.success.topic:
                            try:
                                ep.last_success = bool(
                                    typestore().deserialize_cdr(bytes(data), "std_msgs/msg/Bool").data
                                )
                            except Exception:
                                pass
                elif kind == "end":
                    self._finish(ep, *payload)
                    last_flush = now
                cur = self._episode
                if cur is not None and not self.writer_error and now - last_flush >= self.flush_every_s:
                    last_flush = now
                    self._flushed = cur.writer.flush(fsync=self.fsync)
                    if self.on_flush is not None:
                        self.on_flush(dict(self._flushed))
                    if free_bytes(self.root) < self.min_free_bytes:
                        self._stop_reason = f"free disk space fell below the margin of {_human(self.min_free_bytes)}"
            except Exception as e:  # a full disk, a bug: keep the thread alive, refuse new episodes, say why
                self.writer_error = f"{type(e).__name__}: {e}"
                if kind == "end":
                    payload[-1]["error"] = f"closing episode {ep.index} failed: {self.writer_error}"
                    payload[-2].set()

    def disk_low(self) -> str:
        """Why the current episode should end now ('' when nothing is wrong): the disk margin was reached."""
        return self._stop_reason

    def _begin(self, ep: _Episode, stamp: int, instruction: str, instruction_cdr: bytes | None) -> None:
        w = ep.writer
        w.write_metadata(stamp)
        if instruction:
            w.write_instruction(stamp, instruction)
        elif instruction_cdr is not None:
            w.write_raw(self.topics.instruction.topic, stamp, instruction_cdr)

    def _finish(
        self,
        ep: _Episode,
        keep: bool,
        success: bool,
        metadata: dict,
        reason: str,
        stamp: int,
        done: threading.Event,
        result: dict,
    ) -> None:
        now = time.monotonic()
        try:
            with self._lock:
                topics = {t: s.as_dict(now) for t, s in ep.stats.items()}
            duration = (ep.end_mono or now) - ep.start_mono
            dropped = sum(t["dropped"] for t in topics.values())
            outcome = "kept" if keep else "discarded"
            w = ep.writer
            extra = {
                "duration_s": round(duration, 3),
                "topics": topics,
                "dropped": dropped,
                "messages": sum(t["messages"] for t in topics.values()),
                **metadata,
            }
            if reason:
                extra["stopped"] = reason
            if self.writer_error:
                extra["writer_error"] = self.writer_error
            w.finish(max(stamp, w._last_stamp_ns), success=success, metadata=extra)
            path: Path | None = ep.path
            if keep:
                ep.path.rename(ep.final)
                path = ep.final
                file_bytes = _dir_bytes(path)
            else:
                file_bytes = _dir_bytes(ep.path)
                shutil.rmtree(ep.path)
                path = None
            try:
                ep.path.parent.rmdir()
            except OSError:
                pass
            result["info"] = EpisodeInfo(
                index=ep.index,
                path=path,
                outcome=outcome,
                success=success if keep else None,
                duration_s=duration,
                messages=extra["messages"],
                bytes=sum(t["bytes"] for t in topics.values()),
                file_bytes=file_bytes,
                dropped=dropped,
                topics=topics,
            )
        except Exception as e:
            result["error"] = f"closing episode {ep.index} ({ep.path}) failed: {type(e).__name__}: {e}"
        finally:
            self._flushed = {}
            done.set()

    def _log(self, entry: dict) -> None:
        try:
            with open(self.root / LOG_FILE, "a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}, default=str) + "\n")
        except OSError:
            pass


def _dir_bytes(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    except OSError:
        return 0
