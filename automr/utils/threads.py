"""Thread priorities: let a server's requests go before its model.

On two cores, a server whose model computes a recommendation (seconds of CPU) and memory elements
in the background makes a write wait for a core: measured with SmolLM2 on this project's CPU (BENCHMARKS.md,
"Serving"). Running the model's work at a lower OS priority (a higher nice value) on threads of its own lets
the scheduler run a request's thread first. Linux keeps a nice value per thread, and a thread created later
(an OpenMP pool started from that thread) inherits it; elsewhere this does nothing. The GIL is still
shared: a request waits at most a switch interval (5 ms) for it. Used with `automr serve
--no-model-process`; with the model in a process of its own (the default) the whole child is niced instead
(automr/serve/model.py).

Off by default (`automr serve --model-nice 0`): the nice value also ranks the model below every other
process, and beside another CPU-bound job a niced memory worker fell so far behind that elements were
still pending after 5 minutes (the SmolLM2 fault benchmark, BENCHMARKS.md); a niced server helps only on
a machine of its own.
"""

from __future__ import annotations

import os
import sys
import threading


def lower_thread_priority(niceness: int) -> bool:
    """Add `niceness` to the calling thread's nice value (0: leave it); True if it was changed.

    One-way for an unprivileged process (a raised nice value cannot be lowered again), so call it
    only on threads that do nothing else: the model's executor thread, the memory worker.
    """
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except OSError:  # a sandbox that forbids it: run at the normal priority
        return False
    return True


def thread_niceness() -> int:
    """The calling thread's nice value (0 where the platform keeps none per thread)."""
    if not sys.platform.startswith("linux"):
        return 0
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
