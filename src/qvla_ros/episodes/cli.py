"""`qvla-episodes`: inspect and repair recorded episodes (no ROS needed).

    qvla-episodes info demos/episode_000000 [more ...]   # samples, duration, success, instruction, dropped, CRCs
    qvla-episodes repair demos/episode_000007            # recover an unfinished, truncated or damaged recording

info checks every CRC of the file (crc=ok; crc=none for episodes written before qvla wrote CRCs). Exit status:
0 all fine; 1 an episode cannot be read (unfinished, truncated, not an episode, ...); 2 an episode is damaged (a
CRC mismatch: its bytes changed after writing; `repair` keeps the intact chunks), or bad arguments/configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qvla-episodes", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    i = sub.add_parser("info", help="read episodes and summarize them (checks that they decode and align)")
    i.add_argument("paths", nargs="+", type=Path)
    i.add_argument("--horizon", type=int, default=50)
    i.add_argument("--rate-hz", type=float, default=30.0)
    i.add_argument("--topics", type=Path, default=None, help="topic configuration (default config/topics.yaml)")
    i.add_argument("--json", action="store_true", help="one JSON line per episode")
    r = sub.add_parser("repair", help="copy the intact part of an unfinished, truncated or damaged episode")
    r.add_argument("path", type=Path)
    r.add_argument("--out", type=Path, default=None, help="output episode (default: <path>_repaired)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qvla_ros.episodes.reader import EpisodeChecksumError, EpisodeError, check_integrity, read_episode
    from qvla_ros.episodes.topics import TopicConfigError, load_topic_config
    from qvla_ros.paths import ConfigNotFoundError

    try:
        if args.command == "repair":
            from qvla_ros.episodes.repair import repair_episode

            out, report = repair_episode(args.path, args.out)
            print(
                f"wrote {out}: {report['messages_recovered']} messages recovered "
                f"(reading stopped at: {report['stopped_at']})"
            )
            for d in report["dropped_chunks"]:
                print(f"dropped {d['description']}: {d['problem']}")
            for problem in report["other_damage"]:
                print(f"ignored: {problem}")
            return 0
        topics = load_topic_config(args.topics)
        failed = damaged = 0
        for path in args.paths:
            try:
                ep = read_episode(path, horizon=args.horizon, rate_hz=args.rate_hz, topics=topics)
                crc = check_integrity(path)
            except EpisodeError as e:
                failed += 1
                damaged += isinstance(e, EpisodeChecksumError)
                print(f"qvla-episodes: error: {e}", file=sys.stderr)
                continue
            s0 = ep.samples[0]
            info = {
                "path": str(path),
                "samples": len(ep),
                "duration_s": round(ep.samples[-1].timestamp - s0.timestamp, 3),
                "success": ep.success,
                "instruction": ep.instruction,
                "cameras": {c: list(s0.images[c].shape) for c in ep.camera_names},
                "dropped": ep.dropped,
                "seed": ep.metadata.get("seed"),
                "source": ep.metadata.get("source"),
                "crc": crc,
            }
            print(json.dumps(info) if args.json else "  ".join(f"{k}={v}" for k, v in info.items()))
        return 2 if damaged else 1 if failed else 0
    except (EpisodeError, TopicConfigError, ConfigNotFoundError, OSError) as e:
        print(f"qvla-episodes: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
