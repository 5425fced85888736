"""``python -m vllm_lora_hotswap.fleet.child PARENT_PID COMMAND...``: run COMMAND so that it
stops when the launcher dies.

The launcher starts each instance in a session of its own (``start_new_session``)
through this module, which asks Linux to send SIGTERM when the parent dies
(``PR_SET_PDEATHSIG``, kept across ``exec``) and then becomes COMMAND. Doing this
after ``exec`` rather than in a ``preexec_fn`` matters: the launcher runs threads
(its live display), and running Python between ``fork`` and ``exec`` in a threaded
process can deadlock.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, command = int(sys.argv[1]), sys.argv[2:]
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the launcher's signal handlers still stop its children
    if os.getppid() != parent:  # the launcher died before the request took effect
        sys.exit(1)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
