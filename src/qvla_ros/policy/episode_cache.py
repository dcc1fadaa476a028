"""A resumable record of closed-loop episodes: one JSON line per finished episode, appended and flushed to disk.

A benchmark over hundreds of seeds and a dozen policies takes hours on a CPU; a stopped process must continue
where it was. Each evaluated row (a policy under a set of evaluation settings) has its own file
`<directory>/<key>.jsonl`, where the key names the policy and the settings (see `row_key`), so a changed artifact
or setting never reuses stale episodes. Lines are appended and fsync'ed one at a time, so at most the episode that
was running is lost; a torn last line (a crash in mid-write) is ignored on reading and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def row_key(name: str, identity: dict) -> str:
    """A file-safe key: the row's readable name plus a hash of everything that determines its episodes."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80]
    return f"{safe}-{digest}"


class EpisodeCache:
    """Finished episodes of one row, by seed."""

    def __init__(self, directory: str | os.PathLike, key: str):
        self.path = Path(directory) / f"{key}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._episodes: dict[int, dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        good, torn = [], False
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                seed = int(record["seed"])
            except (ValueError, KeyError, TypeError):
                torn = True  # a line cut by a crash: the episode is run again
                continue
            self._episodes[seed] = record
            good.append(line)
        if torn:  # rewrite without the torn line, so that appends start on a fresh line
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(g + "\n" for g in good))
            os.replace(tmp, self.path)

    def __contains__(self, seed: int) -> bool:
        return int(seed) in self._episodes

    def __len__(self) -> int:
        return len(self._episodes)

    def get(self, seed: int) -> dict | None:
        return self._episodes.get(int(seed))

    def episodes(self, seeds=None) -> list[dict]:
        """The cached episodes of `seeds` (all when None), in seed order; missing seeds are left out."""
        wanted = sorted(self._episodes) if seeds is None else [int(s) for s in seeds]
        return [self._episodes[s] for s in wanted if s in self._episodes]

    def missing(self, seeds) -> list[int]:
        return [int(s) for s in seeds if int(s) not in self._episodes]

    def add(self, record: dict) -> None:
        """Append one finished episode (a JSON-able dict with a "seed") and force it to disk."""
        seed = int(record["seed"])
        line = json.dumps(record, sort_keys=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._episodes[seed] = json.loads(line)
