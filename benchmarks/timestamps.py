"""What recording presentation times costs at decode: CPU seconds per clip of a plain decode
(:func:`extractor.decode.iter_frames`), the same decode that also reads each frame's stamp
(:func:`extractor.decode.iter_timed_frames`, what extraction runs), and the separate timing pass
(:func:`extractor.decode.frame_times`, run first for ``--fps`` and ``--max-frames``).

    python benchmarks/timestamps.py                 # the shipped clips, best of 3
    python benchmarks/timestamps.py --json out.json

CPU time of this process (all its threads), best of ``--repeats``: on a shared machine the
neighbours' load barely changes it, where wall time would measure them.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from extractor.decode import frame_times, iter_frames, iter_timed_frames

CLIPS = Path(__file__).resolve().parents[1] / "tests" / "data" / "videos"


def cpu_best(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def count(read: Callable[[Path], Iterator[Any]], path: Path) -> int:
    return sum(1 for _ in read(path))


def timed_frames(path: Path) -> Iterator[Any]:
    return iter_timed_frames(path, [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=Path, default=CLIPS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for path in sorted(args.videos.glob("*.*")):
        if path.suffix not in (".mp4", ".avi", ".mkv", ".webm", ".mov"):
            continue
        plain = cpu_best(functools.partial(count, iter_frames, path), args.repeats)
        timed = cpu_best(functools.partial(count, timed_frames, path), args.repeats)
        ahead = cpu_best(functools.partial(frame_times, path), args.repeats)
        n = len(frame_times(path).seconds)
        rows.append({"clip": path.name, "frames": n, "decode": plain, "decode_timed": timed,
                     "timing_pass": ahead})  # fmt: skip
        print(f"| {path.name} | {n} | {plain:.3f} | {timed:.3f} | {ahead:.3f} "
              f"({ahead / plain:.0%}) |", flush=True)  # fmt: skip
    total = {k: sum(r[k] for r in rows) for k in ("decode", "decode_timed", "timing_pass")}
    print(f"| all | {sum(r['frames'] for r in rows)} | {total['decode']:.3f} | "
          f"{total['decode_timed']:.3f} | {total['timing_pass']:.3f} "
          f"({total['timing_pass'] / total['decode']:.0%}) |")  # fmt: skip
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "date": time.ctime()}
        Path(args.json).write_text(json.dumps({"rows": rows, "total": total, **meta}, indent=1))


if __name__ == "__main__":
    main()
