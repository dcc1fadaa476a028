"""The errors of reading episodes (in their own module: the reader and the repair tool both raise them)."""

from __future__ import annotations


class EpisodeError(Exception):
    """An episode cannot be read; the message names the file, the problem, and what to do."""


class EpisodeChecksumError(EpisodeError):
    """An episode's bytes changed after they were written (a CRC mismatch); `chunks` are the damaged ones."""

    def __init__(self, message: str, chunks: list | None = None):
        super().__init__(message)
        self.chunks = list(chunks or [])
