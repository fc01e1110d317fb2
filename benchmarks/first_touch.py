"""What it costs a process to touch memory for the first time, on this machine.

Run by hand from the repository root (it is not a test)::

    python3 benchmarks/first_touch.py                  # 6 maps of 256 MiB per case
    python3 benchmarks/first_touch.py --maps 12 --mib 64 --rest 30

A worker that keeps decoded chunks (the chunk cache) fills memory it has not
used before: the kernel maps a page on the first write to it.  Where that
page was recently freed by any process it is cheap; on some virtual machines,
memory that has been free for a while has gone back to the host, and getting
it back costs far more.  This script measures both, in ms per MiB written:

1. ``fresh``: new private anonymous maps (transparent huge pages asked for,
   as :func:`dasktrain.engine.budget.anonymous_map` does), one byte written per
   4 KiB page, after ``--rest`` seconds of nothing (so the memory freed by
   earlier runs has had time to go back);
2. ``reused``: the same right after unmapping as many maps (the kernel hands
   the same, just freed, pages out again);
3. ``copy``: a 65,536 x 100 float32 chunk copied into such a map, as the
   chunk cache does, in fresh memory then in just-freed memory.

The ratio fresh / reused is what a cold chunk cache pays on top of a warm
one, per byte it keeps.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import time

import numpy as np

from dasktrain.engine.budget import anonymous_map, off_heap_copy

MiB = 1 << 20
PAGE = 4096


def touch(n_maps: int, n_bytes: int) -> tuple[list[float], list[mmap.mmap]]:
    """ms per MiB to fault in each of ``n_maps`` new maps (kept alive)."""
    times: list[float] = []
    maps: list[mmap.mmap] = []
    for _ in range(n_maps):
        start = time.perf_counter()
        buffer = anonymous_map(n_bytes)
        np.frombuffer(buffer, dtype=np.uint8)[::PAGE] = 1
        times.append((time.perf_counter() - start) * 1e3 / (n_bytes / MiB))
        maps.append(buffer)
    return times, maps


def copies(n: int) -> list[float]:
    """ms per copy of one 65,536 x 100 float32 chunk into a new map."""
    chunk = np.random.default_rng(0).random((65_536, 100), dtype=np.float32)
    times: list[float] = []
    kept = []
    for _ in range(n):
        start = time.perf_counter()
        kept.append(off_heap_copy(chunk))
        times.append((time.perf_counter() - start) * 1e3)
    del kept
    return times


def _fmt(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):6.2f}  "
        f"(min {min(values):.2f}, max {max(values):.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maps", type=int, default=6, help="maps per case")
    parser.add_argument("--mib", type=int, default=256, help="MiB per map")
    parser.add_argument(
        "--rest", type=float, default=20.0, help="seconds idle before the fresh case"
    )
    args = parser.parse_args()
    n_bytes = args.mib * MiB
    time.sleep(args.rest)
    fresh, maps = touch(args.maps, n_bytes)
    for buffer in maps:
        buffer.close()
    reused, maps = touch(args.maps, n_bytes)
    for buffer in maps:
        buffer.close()
    print(f"first touch, {args.maps} maps of {args.mib} MiB, ms per MiB")
    print(f"  fresh   {_fmt(fresh)}")
    print(f"  reused  {_fmt(reused)}")
    print(
        f"  fresh / reused: {statistics.median(fresh) / statistics.median(reused):.1f}x"
    )
    time.sleep(args.rest)
    cold = copies(16)
    warm = copies(16)
    print("copy of a 65,536 x 100 float32 chunk (25 MiB) into a new map, ms")
    print(f"  fresh memory        {_fmt(cold)}")
    print(f"  just-freed memory   {_fmt(warm)}")


if __name__ == "__main__":
    main()
