"""Test-only heap probe for server processes (never part of the package).

Put this directory first on ``PYTHONPATH`` of a server started for a memory
investigation and set ``HOTSWAP_MEMPROBE_DIR``: every Python process of the server
(API server, engine core, worker) then writes, on ``SIGUSR2``, the counts of live
objects by type and (under ``PYTHONTRACEMALLOC``) a tracemalloc snapshot into that
directory, named by process id and a sequence number.
"""

import os

_DIR = os.environ.get("HOTSWAP_MEMPROBE_DIR")

if _DIR:
    import signal

    def _dump(signum, frame):
        import collections
        import gc
        import json
        import time
        import tracemalloc

        pid = os.getpid()
        seq = _dump.seq = getattr(_dump, "seq", 0) + 1
        gc.collect()
        counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        info = {
            "pid": pid,
            "seq": seq,
            "at": time.time(),
            "rss": rss,
            "types": dict(counts.most_common(400)),
        }
        try:
            import ctypes

            class Mallinfo2(ctypes.Structure):
                _fields_ = [
                    (n, ctypes.c_size_t)
                    for n in (
                        "arena",
                        "ordblks",
                        "smblks",
                        "hblks",
                        "hblkhd",
                        "usmblks",
                        "fsmblks",
                        "uordblks",
                        "fordblks",
                        "keepcost",
                    )
                ]

            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = Mallinfo2
            m = libc.mallinfo2()
            info["mallinfo"] = {n: getattr(m, n) for n, _ in Mallinfo2._fields_}
        except Exception as exc:  # noqa: BLE001
            info["mallinfo"] = str(exc)
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(os.path.join(_DIR, f"snap-{pid}-{seq}.tm"))
            info["traced"] = tracemalloc.get_traced_memory()
        with open(os.path.join(_DIR, f"probe-{pid}-{seq}.json"), "w") as f:
            json.dump(info, f)

    signal.signal(signal.SIGUSR2, _dump)
