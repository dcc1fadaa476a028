"""Recover a damaged, unfinished or truncated episode: copy every intact MCAP record into a new, closed episode.

A recorder that crashes leaves an .mcap file without its summary and without metadata.yaml; a file cut short
(disk full, interrupted copy) ends mid-record; bit rot or a bad copy changes bytes inside a chunk, which its CRC
reveals. `scan_mcap` walks the file record by record with the `mcap` library's record parsers (independent of
rosbags), checks every chunk's CRC and the data-section and summary CRCs, and stops at the first incomplete
record. `repair_episode` keeps every chunk whose CRC is fine, drops the damaged ones and says which (time range,
message count). The original is never modified.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from mcap.data_stream import ReadDataStream
from mcap.records import Channel, Chunk, DataEnd, Footer, Message, MessageIndex, Schema
from mcap.stream_reader import CRCValidationError, breakup_chunk

from qvla_ros.episodes.errors import EpisodeError
from qvla_ros.episodes.writer import CUSTOM_DATA_KEY, MCAP_MAGIC, open_bag, typestore

_OP_FOOTER, _OP_SCHEMA, _OP_CHANNEL, _OP_MESSAGE, _OP_CHUNK, _OP_MESSAGE_INDEX, _OP_DATA_END = (
    0x02,
    0x03,
    0x04,
    0x05,
    0x06,
    0x07,
    0x0F,
)


@dataclass
class ChunkReport:
    """One MCAP chunk as found in the file; `problem` is '' when it is intact."""

    index: int  # position among the file's chunks, from 0
    offset: int  # of the Chunk record in the file
    start_ns: int | None  # log_time range of its messages (from the chunk header, else its message index)
    end_ns: int | None
    messages: int | None  # how many messages it holds (decoded, else counted in its message index)
    crc: int  # 0: written without a CRC
    problem: str = ""

    def describe(self, origin_ns: int | None = None) -> str:
        where = f"chunk {self.index} at byte {self.offset}"
        if self.start_ns is None or self.end_ns is None:
            when = "time range unknown"
        else:
            when = f"messages logged {self.start_ns}..{self.end_ns} ns"
            if origin_ns is not None:
                t0, t1 = (self.start_ns - origin_ns) / 1e9, (self.end_ns - origin_ns) / 1e9
                when += f", {t0:.3f}-{t1:.3f} s into the recording"
        count = "? messages" if self.messages is None else f"{self.messages} messages"
        return f"{where} ({when}, {count})"


@dataclass
class McapScan:
    """What `scan_mcap` found in one .mcap file."""

    path: Path
    schemas: dict[int, Schema] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)  # of the intact chunks (only with keep_messages)
    chunks: list[ChunkReport] = field(default_factory=list)
    not_mcap: str = ""  # the file is empty or not MCAP at all: nothing in it can be recovered
    stop: str = ""  # why reading ended before the footer ('' when it reached the footer)
    data_crc: str = "missing"  # DataEnd's CRC: 'ok', 'absent' (0), 'mismatch', 'missing' (no DataEnd)
    summary_crc: str = "missing"  # the Footer's summary CRC, the same way
    problems: list[str] = field(default_factory=list)  # damage outside the chunks

    @property
    def damaged(self) -> list[ChunkReport]:
        return [c for c in self.chunks if c.problem]

    @property
    def origin_ns(self) -> int | None:
        starts = [c.start_ns for c in self.chunks if c.start_ns is not None]
        return min(starts) if starts else None

    def describe_damage(self) -> str:
        """One line listing every damaged chunk and CRC mismatch outside them ('' when there is none)."""
        parts = [f"{c.describe(self.origin_ns)}: {c.problem}" for c in self.damaged]
        return "; ".join(parts + self.problems)


def _record(body: bytes, read):
    return read(ReadDataStream(BytesIO(body)))


def scan_mcap(path: str | Path, keep_messages: bool = True) -> McapScan:
    """Walk an .mcap file record by record; see the module docstring. Never raises for damage (only OSError)."""
    path = Path(path)
    scan = McapScan(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(len(MCAP_MAGIC))
        if size == 0:
            scan.not_mcap = "the file is empty (0 bytes)"
            return scan
        if magic != MCAP_MAGIC:
            scan.not_mcap = f"not an MCAP file (it starts with {magic!r}, not the MCAP magic {MCAP_MAGIC!r})"
            return scan
        pos = len(MCAP_MAGIC)
        crc = zlib.crc32(magic)  # of the data section: from the start of the file up to DataEnd
        summary_crc: int | None = None  # of the summary section, from DataEnd's end up to the Footer's CRC
        summary_start = 0
        last_chunk: ChunkReport | None = None
        index_times: list[int] = []
        while True:
            head = f.read(9)
            if not head:
                scan.stop = "the file ends without a footer (an unfinished recording)"
                break
            if len(head) < 9:
                scan.stop = f"the file ends inside a record header at byte {pos} (truncated)"
                break
            op, length = struct.unpack("<BQ", head)
            if length > size - pos - 9:
                scan.stop = (
                    f"the record at byte {pos} (opcode {op:#04x}) needs {length} bytes but only {size - pos - 9} "
                    "are left (truncated)"
                )
                break
            body = f.read(length)
            if summary_crc is None and op != _OP_DATA_END:
                crc = zlib.crc32(body, zlib.crc32(head, crc))
            elif summary_crc is not None and op != _OP_FOOTER:
                summary_crc = zlib.crc32(body, zlib.crc32(head, summary_crc))
            try:
                if op == _OP_CHUNK:
                    if last_chunk is not None:
                        _index_range(last_chunk, index_times)
                    last_chunk, index_times = _scan_chunk(scan, len(scan.chunks), pos, body, keep_messages), []
                    scan.chunks.append(last_chunk)
                elif op == _OP_MESSAGE_INDEX and last_chunk is not None:
                    mi = _record(body, MessageIndex.read)
                    index_times.extend(t for t, _ in mi.records)
                elif op == _OP_SCHEMA:
                    schema = _record(body, Schema.read)
                    scan.schemas.setdefault(schema.id, schema)
                elif op == _OP_CHANNEL:
                    channel = _record(body, Channel.read)
                    scan.channels.setdefault(channel.id, channel)
                elif op == _OP_MESSAGE and summary_crc is None and keep_messages:
                    scan.messages.append(Message.read(ReadDataStream(BytesIO(body)), length))
                elif op == _OP_DATA_END:
                    stored = _record(body, DataEnd.read).data_section_crc
                    scan.data_crc = "absent" if not stored else "ok" if stored == crc else "mismatch"
                    if scan.data_crc == "mismatch" and not scan.damaged:  # else the damaged chunk explains it
                        scan.problems.append(
                            f"data-section CRC mismatch (stored {stored:#010x}, computed {crc:#010x}) although "
                            "every chunk is intact: bytes outside the chunks changed"
                        )
                    summary_crc, summary_start = 0, pos + 9 + length
                elif op == _OP_FOOTER:
                    footer = _record(body, Footer.read)
                    if summary_crc is not None and footer.summary_crc and footer.summary_start == summary_start:
                        summary_crc = zlib.crc32(body[:16], zlib.crc32(head, summary_crc))
                        scan.summary_crc = "ok" if summary_crc == footer.summary_crc else "mismatch"
                        if scan.summary_crc == "mismatch":
                            scan.problems.append(
                                f"summary CRC mismatch (stored {footer.summary_crc:#010x}, computed "
                                f"{summary_crc:#010x}): the file's index is damaged"
                            )
                    elif summary_crc is not None:
                        scan.summary_crc = "absent"
                    break
            except Exception as e:  # a garbled record whose length field survived: skip it, say so
                scan.problems.append(f"unreadable record at byte {pos} (opcode {op:#04x}: {type(e).__name__}: {e})")
            pos += 9 + length
        if last_chunk is not None:
            _index_range(last_chunk, index_times)
    return scan


def _scan_chunk(scan: McapScan, index: int, offset: int, body: bytes, keep_messages: bool) -> ChunkReport:
    try:
        chunk = _record(body, Chunk.read)
    except Exception as e:
        return ChunkReport(index, offset, None, None, None, 0, f"chunk header unreadable ({type(e).__name__}: {e})")
    report = ChunkReport(index, offset, chunk.message_start_time, chunk.message_end_time, None, chunk.uncompressed_crc)
    try:
        records = breakup_chunk(chunk, validate_crc=True)
    except CRCValidationError as e:
        report.problem = f"CRC mismatch (stored {e.expected:#010x}, computed {e.actual:#010x})"
        return report
    except Exception as e:  # bad compressed data, or garbled records in a chunk without a CRC
        report.problem = f"chunk does not decode ({type(e).__name__}: {e})"
        return report
    report.messages = 0
    for r in records:
        if isinstance(r, Schema):
            scan.schemas.setdefault(r.id, r)
        elif isinstance(r, Channel):
            scan.channels.setdefault(r.id, r)
        elif isinstance(r, Message):
            report.messages += 1
            if keep_messages:
                scan.messages.append(r)
    return report


def _index_range(chunk: ChunkReport, index_times: list[int]) -> None:
    """Fill in what the chunk's own header could not tell from its MessageIndex records."""
    if not index_times:
        return
    if chunk.messages is None:
        chunk.messages = len(index_times)
    first, last = min(index_times), max(index_times)
    if chunk.start_ns is None or chunk.end_ns is None or not chunk.start_ns <= first <= last <= chunk.end_ns:
        chunk.start_ns, chunk.end_ns = first, last  # the header is missing or garbled: trust the index


# ---------------------------------------------------------------------------- repair
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
    """The schemas, channels and messages of an MCAP file's intact chunks, and why reading stopped ('' at the end)."""
    scan = scan_mcap(mcap_path)
    return scan.schemas, scan.channels, scan.messages, scan.not_mcap or scan.stop


def repair_episode(path: str | Path, out: str | Path | None = None) -> tuple[Path, dict]:
    """Write the recoverable part of episode `path` to `out` (default: `<path>_repaired`); returns (out, report).

    The report says how many messages were recovered, where reading stopped, and which chunks were dropped
    (`dropped_chunks`: index, byte offset, log_time range, message count, problem).
    """
    path = Path(path)
    if not path.exists():
        raise EpisodeError(f"{path}: no such episode or file")
    src = _mcap_file(path)
    base = path if path.is_dir() else path.parent
    out = Path(out) if out is not None else base.with_name(base.name + "_repaired")
    if out.exists():
        raise EpisodeError(f"{out} exists already; pass another output path (--out)")
    scan = scan_mcap(src)
    if scan.not_mcap:
        raise EpisodeError(f"{src}: {scan.not_mcap}; there is nothing to recover (restore it from a copy)")
    dropped = [
        {
            "chunk": c.index,
            "offset": c.offset,
            "start_ns": c.start_ns,
            "end_ns": c.end_ns,
            "messages": c.messages,
            "problem": c.problem,
            "description": c.describe(scan.origin_ns),
        }
        for c in scan.damaged
    ]
    if not scan.messages:
        lost = "; ".join(d["description"] + ": " + d["problem"] for d in dropped)
        raise EpisodeError(
            f"{src}: no intact message could be recovered ({scan.stop or 'the file holds none'}"
            + (f"; dropped {lost}" if lost else "")
            + ")"
        )

    ts = typestore()
    metadata = None
    w = open_bag(out)
    conns = {}
    for cid, ch in scan.channels.items():
        msgtype = scan.schemas[ch.schema_id].name if ch.schema_id in scan.schemas else None
        if msgtype not in ts.types:
            continue  # only the configured (standard) types are recorded; anything else is dropped and reported
        conns[cid] = w.add_connection(ch.topic, msgtype, typestore=ts)
    kept = 0
    for m in sorted(scan.messages, key=lambda m: m.log_time):
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
        "messages_skipped": len(scan.messages) - kept,
        "stopped_at": scan.stop or "end of file",
        "dropped_chunks": dropped,
        "messages_dropped": sum(d["messages"] or 0 for d in dropped),
        "other_damage": list(scan.problems),
        "repaired": True,
    }
    w.set_custom_data(CUSTOM_DATA_KEY, json.dumps({**(metadata or {}), "repair": report}, sort_keys=True))
    w.close()
    return out, report
