"""Recover an unfinished or truncated episode: copy every complete MCAP record into a new, closed episode.

A recorder that crashes leaves an .mcap file without its summary and without metadata.yaml; a file cut short
(disk full, interrupted copy) ends mid-record. Both are read sequentially here, with the `mcap` library's
stream reader (independent of rosbags), up to the first incomplete record. The original is never modified.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from mcap.exceptions import McapError
from mcap.records import Channel, Message, Schema
from mcap.stream_reader import StreamReader

from qvla_ros.episodes.reader import EpisodeError
from qvla_ros.episodes.writer import CUSTOM_DATA_KEY, ROSBAG_VERSION, typestore


def _mcap_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.mcap")) if path.is_dir() else []
    if not files:
        raise EpisodeError(f"{path}: no .mcap file to repair (expected an episode directory or an .mcap file)")
    if len(files) > 1:
        raise EpisodeError(f"{path}: several .mcap files ({[f.name for f in files]}); pass the one to repair")
    return files[0]


def salvage(mcap_path: Path) -> tuple[dict[int, Schema], dict[int, Channel], list[Message], str]:
    """All complete schemas, channels and messages of an MCAP file, and why reading stopped ('' at a clean end)."""
    schemas: dict[int, Schema] = {}
    channels: dict[int, Channel] = {}
    messages: list[Message] = []
    stop = ""
    with open(mcap_path, "rb") as f:
        try:
            for record in StreamReader(f, skip_magic=False, emit_chunks=False).records:
                if isinstance(record, Schema):
                    schemas[record.id] = record
                elif isinstance(record, Channel):
                    channels[record.id] = record
                elif isinstance(record, Message):
                    messages.append(record)
        except (McapError, struct.error, EOFError, ValueError) as e:
            stop = f"{type(e).__name__}: {e}"
        except Exception as e:  # zstd raises its own types on a chunk cut short
            stop = f"{type(e).__name__}: {e}"
    return schemas, channels, messages, stop


def repair_episode(path: str | Path, out: str | Path | None = None) -> tuple[Path, dict]:
    """Write the recoverable part of episode `path` to `out` (default: `<path>_repaired`); returns (out, report)."""
    from rosbags.rosbag2 import Writer
    from rosbags.rosbag2.enums import CompressionFormat, CompressionMode, StoragePlugin

    path = Path(path)
    if not path.exists():
        raise EpisodeError(f"{path}: no such episode or file")
    src = _mcap_file(path)
    base = path if path.is_dir() else path.parent
    out = Path(out) if out is not None else base.with_name(base.name + "_repaired")
    if out.exists():
        raise EpisodeError(f"{out} exists already; pass another output path (--out)")
    schemas, channels, messages, stop = salvage(src)
    if not messages:
        raise EpisodeError(f"{src}: no complete message could be recovered ({stop or 'the file holds none'})")

    ts = typestore()
    metadata = None
    w = Writer(out, version=ROSBAG_VERSION, storage_plugin=StoragePlugin.MCAP)
    w.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    w.open()
    conns = {}
    for cid, ch in channels.items():
        msgtype = schemas[ch.schema_id].name if ch.schema_id in schemas else None
        if msgtype not in ts.types:
            continue  # only the configured (standard) types are recorded; anything else is dropped and reported
        conns[cid] = w.add_connection(ch.topic, msgtype, typestore=ts)
    kept = 0
    for m in sorted(messages, key=lambda m: m.log_time):
        conn = conns.get(m.channel_id)
        if conn is None:
            continue
        w.write(conn, m.log_time, m.data)
        kept += 1
        if conn.topic.endswith("/episode/metadata"):
            try:
                metadata = json.loads(ts.deserialize_cdr(m.data, conn.msgtype).data)
            except Exception:
                pass
    report = {
        "source": str(src),
        "messages_recovered": kept,
        "messages_skipped": len(messages) - kept,
        "stopped_at": stop or "end of file",
        "repaired": True,
    }
    w.set_custom_data(CUSTOM_DATA_KEY, json.dumps({**(metadata or {}), "repair": report}, sort_keys=True))
    w.close()
    return out, report
