"""Episodes carry MCAP CRCs (chunks, data section, summary); a changed byte is reported, and repair drops only it."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from episode_fixtures import expected_sample, write_synthetic
from mcap.reader import make_reader
from mcap.records import Chunk, DataEnd, Footer, Message
from mcap.stream_reader import CRCValidationError, StreamReader, breakup_chunk

from qvla_ros.episodes import EpisodeChecksumError, check_integrity, read_episode
from qvla_ros.episodes import cli as episodes_cli
from qvla_ros.episodes import writer as writer_module
from qvla_ros.episodes.repair import repair_episode

MAGIC = b"\x89MCAP0\r\n"


def _mcap(path):
    return next(path.glob("*.mcap"))


def _chunks(mcap):
    """(chunk index record, number of messages in the chunk) for every chunk, read with the `mcap` library."""
    with open(mcap, "rb") as f:
        indexes = make_reader(f).get_summary().chunk_indexes
    counts = [
        sum(isinstance(r, Message) for r in breakup_chunk(c))
        for c in StreamReader(str(mcap), emit_chunks=True).records
        if isinstance(c, Chunk)
    ]
    assert len(indexes) == len(counts)
    return list(zip(indexes, counts))


def _uncompressed(chunk: Chunk) -> bytes:
    import zstandard

    return zstandard.decompress(chunk.data, chunk.uncompressed_size) if chunk.compression == "zstd" else chunk.data


def _flip_byte_in_chunk(mcap, k: int):
    """Flip one bit in the middle of chunk k's record (bit rot, a bad copy); returns the chunk's index record."""
    chunk, _ = _chunks(mcap)[k]
    data = bytearray(mcap.read_bytes())
    data[chunk.chunk_start_offset + chunk.chunk_length // 2] ^= 0x01
    mcap.write_bytes(bytes(data))
    return chunk


def test_written_episode_has_crcs_that_the_independent_mcap_reader_validates(tmp_path):
    truth = write_synthetic(tmp_path / "ep", flush_every_s=0.2)  # several chunks
    mcap = _mcap(truth.path)
    # StreamReader with validate_crcs checks every chunk's CRC and the data-section CRC in DataEnd
    records = list(StreamReader(str(mcap), emit_chunks=True, validate_crcs=True).records)
    chunks = [r for r in records if isinstance(r, Chunk)]
    assert len(chunks) >= 5
    for c in chunks:
        assert c.uncompressed_crc != 0
        assert c.uncompressed_crc == zlib.crc32(_uncompressed(c))
    (data_end,) = [r for r in records if isinstance(r, DataEnd)]
    assert data_end.data_section_crc != 0
    # the summary CRC, recomputed as the MCAP specification defines it
    (footer,) = [r for r in records if isinstance(r, Footer)]
    raw = mcap.read_bytes()
    assert footer.summary_start and footer.summary_crc == zlib.crc32(raw[footer.summary_start : len(raw) - 8 - 4])
    with open(mcap, "rb") as f:
        n = sum(1 for _ in make_reader(f, validate_crcs=True).iter_messages())
    assert n == sum(count for _, count in _chunks(mcap))
    assert check_integrity(truth.path) == "ok"
    # ... and the validation is real: one flipped bit fails it
    _flip_byte_in_chunk(mcap, 2)
    with pytest.raises(CRCValidationError):
        list(StreamReader(str(mcap), validate_crcs=True).records)


@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "uncompressed"])
def test_a_flipped_byte_in_a_chunk_names_the_chunk_and_its_time_range(tmp_path, compress):
    truth = write_synthetic(tmp_path / "ep", flush_every_s=0.2, compress=compress)
    mcap = _mcap(truth.path)
    chunk = _flip_byte_in_chunk(mcap, 1)  # uncompressed: silently different pixels or numbers without a CRC
    with pytest.raises(EpisodeChecksumError) as e:
        read_episode(truth.path)
    msg = str(e.value)
    assert str(mcap) in msg and "CRC mismatch" in msg and "chunk 1" in msg
    assert f"{chunk.message_start_time}..{chunk.message_end_time} ns" in msg
    assert "0.200-0.400 s into the recording" in msg
    assert f"qvla-episodes repair {truth.path}" in msg
    assert [c.start_ns for c in e.value.chunks] == [chunk.message_start_time]
    with pytest.raises(EpisodeChecksumError, match="chunk 1"):
        check_integrity(truth.path)


def test_repair_keeps_the_intact_chunks_and_reports_the_dropped_one(tmp_path):
    truth = write_synthetic(tmp_path / "ep", flush_every_s=0.2)
    mcap = _mcap(truth.path)
    chunks = _chunks(mcap)
    total = sum(count for _, count in chunks)
    damaged, lost = chunks[1]
    _flip_byte_in_chunk(mcap, 1)
    out, report = repair_episode(truth.path)
    (dropped,) = report["dropped_chunks"]
    assert dropped["chunk"] == 1 and "CRC mismatch" in dropped["problem"]
    assert (dropped["start_ns"], dropped["end_ns"]) == (damaged.message_start_time, damaged.message_end_time)
    assert dropped["messages"] == lost == report["messages_dropped"] > 0
    assert report["messages_recovered"] == total - lost and report["stopped_at"] == "end of file"
    assert check_integrity(out) == "ok"  # the repaired episode is checksummed itself
    ep = read_episode(out, horizon=1)
    assert ep.success is True and ep.instruction == truth.instruction  # chunks 0 and the last were kept
    assert 30 - 9 <= len(ep) < 30
    for s in ep.samples:  # every remaining sample is exactly what was recorded at its tick
        k = int(round(s.timestamp * 30))
        images, state, actions = expected_sample(truth, k, 1)
        assert not damaged.message_start_time < s.stamp_ns < damaged.message_end_time
        for cam, img in images.items():
            np.testing.assert_array_equal(s.images[cam], img)
        np.testing.assert_array_equal(s.state, state)
        np.testing.assert_array_equal(s.actions, actions)


def test_repair_recovers_the_rest_when_the_chunk_with_the_channel_definitions_is_damaged(tmp_path):
    truth = write_synthetic(tmp_path / "ep", flush_every_s=0.2)
    mcap = _mcap(truth.path)
    chunks = _chunks(mcap)
    _flip_byte_in_chunk(mcap, 0)  # rosbags writes every schema and channel into the first chunk
    out, report = repair_episode(truth.path, tmp_path / "fixed")
    assert [d["chunk"] for d in report["dropped_chunks"]] == [0]
    # the closed file's summary repeats the channels: every other chunk is kept
    assert report["messages_recovered"] == sum(count for _, count in chunks[1:])


def test_cli_info_reports_a_crc_mismatch_and_repair_says_what_it_dropped(tmp_path, capsys):
    truth = write_synthetic(tmp_path / "ep", flush_every_s=0.2)
    assert episodes_cli.main(["info", str(truth.path)]) == 0
    assert "crc=ok" in capsys.readouterr().out
    chunk = _flip_byte_in_chunk(_mcap(truth.path), 1)
    assert episodes_cli.main(["info", str(truth.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "CRC mismatch" in err and f"{chunk.message_start_time}..{chunk.message_end_time} ns" in err
    assert episodes_cli.main(["repair", str(truth.path), "--out", str(tmp_path / "fixed")]) == 0
    out = capsys.readouterr().out
    assert f"dropped chunk 1 at byte {chunk.chunk_start_offset}" in out and "CRC mismatch" in out
    assert episodes_cli.main(["info", str(tmp_path / "fixed"), "--json"]) == 0
    assert '"crc": "ok"' in capsys.readouterr().out


def test_episodes_written_without_crcs_still_read(tmp_path, monkeypatch, capsys):
    # what qvla wrote before it wrote CRCs: rosbags' own MCAP writer, every CRC 0 ("not computed")
    monkeypatch.setattr(writer_module._Bag, "STORAGE_PLUGINS", writer_module.Writer.STORAGE_PLUGINS)
    truth = write_synthetic(tmp_path / "old", flush_every_s=0.2)
    monkeypatch.undo()
    raw = _mcap(truth.path).read_bytes()
    assert struct.unpack_from("<I", raw, len(raw) - 8 - 4) == (0,)  # the footer's summary CRC
    assert len(read_episode(truth.path)) == 30
    assert check_integrity(truth.path) == "none"
    assert episodes_cli.main(["info", str(truth.path)]) == 0
    assert "crc=none" in capsys.readouterr().out
    out, report = repair_episode(truth.path)
    assert report["dropped_chunks"] == [] and check_integrity(out) == "ok"
