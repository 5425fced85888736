"""Compare the first and last heap probes of each process (see ``sitecustomize.py``).

    python -m tests.support.memprobe.compare DIR

For each process: RSS, glibc's heap in use (``uordblks``) and free (``fordblks``),
the object types whose counts grew most and, where tracemalloc snapshots were taken
(``PYTHONTRACEMALLOC=N`` on the server), the allocation sites that grew most.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from collections import defaultdict
from pathlib import Path


def main(directory: str, top: int = 12) -> None:
    probes: dict[int, list[dict]] = defaultdict(list)
    for path in Path(directory).glob("probe-*.json"):
        probe = json.loads(path.read_text())
        probes[probe["pid"]].append(probe)
    for pid, seq in sorted(probes.items()):
        first, last = min(seq, key=lambda p: p["seq"]), max(seq, key=lambda p: p["seq"])
        if first is last:
            continue
        heap = {k: (first["mallinfo"][k] >> 20, last["mallinfo"][k] >> 20) for k in ("uordblks", "fordblks")}
        print(f"pid {pid}: rss {first['rss'] >> 20} -> {last['rss'] >> 20} MiB, heap MiB in use/free {heap}")
        types = set(first["types"]) | set(last["types"])
        grown = sorted(((last["types"].get(t, 0) - first["types"].get(t, 0), t) for t in types), reverse=True)
        print("  objects:", ", ".join(f"{t} {d:+d}" for d, t in grown[:top] if d > 0) or "none grew")
        snaps = [Path(directory) / f"snap-{pid}-{p['seq']}.tm" for p in (first, last)]
        if all(s.exists() for s in snaps):
            before, after = (tracemalloc.Snapshot.load(str(s)) for s in snaps)
            for stat in after.compare_to(before, "traceback")[:top]:
                print(
                    f"  {stat.size_diff / 1024:+.0f} KiB {stat.count_diff:+d} blocks at {stat.traceback.format()[-1].strip()}"
                )


if __name__ == "__main__":
    main(sys.argv[1])
