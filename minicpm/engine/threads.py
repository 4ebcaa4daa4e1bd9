"""CPU threads that follow the machine's load: :class:`ThreadGovernor`.

Contract: on a CPU engine, ``governor.tick()`` (called at the start of every step and before each
layer's attention, a clock read when nothing is due) measures, every quarter second, how many cores
*other* processes kept busy (``/proc/stat`` busy time minus this process's own, from
``/proc/self/stat``). When other work holds at least 0.6 of a core, torch's thread count drops by
the cores it takes (never below 1); once it falls under 0.3 of a core, the count returns to where
it started. A reading older than a second (the engine sat idle) only starts a new window: load
that began a moment ago would drown in it, so the decision waits a quarter second for a window of
its own. A long window in which this process kept computing is no idle spell (one layer of a long
prefill can take seconds): it decides. A long prefill thus follows a load that starts under it
within about half a second, or one layer, not at its next step. A laptop running something else
then decodes on the free core instead of stalling on a thread that waits for a busy one
(measured: docs/engine.md, "A busy machine").

``stats()`` counts what it did, for operators: the thread count now, how often it dropped below
where it started and for how long (engine ``stats()``, ``/metrics``). It does nothing where
``/proc`` is missing, when the user fixed the count (``OMP_NUM_THREADS``) or set
``MINICPM_ADAPTIVE_THREADS=0``, or with a single thread to begin with.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

log = logging.getLogger("minicpm.engine")

Reading = tuple[float, float, float]  # (all cores' busy ticks, all cores' total ticks, this process's ticks)


def read_cpu() -> Reading | None:
    """Cumulative CPU ticks from ``/proc``: busy and total over all cores, and this process's own."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total, float(own[11]) + float(own[12])  # utime + stime


class ThreadGovernor:
    def __init__(
        self,
        threads: int | None = None,
        cores: int | None = None,
        interval: float = 0.25,
        read: Callable[[], Reading | None] = read_cpu,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_threads = threads or torch.get_num_threads()
        self.threads = self.max_threads
        self.cores = cores or os.cpu_count() or 1
        self.interval, self._read, self._set, self._clock = interval, read, set_threads, clock
        self._last = read()
        self._last_at = clock()
        self._due = self._last_at + interval
        self.enabled = (
            self._last is not None
            and self.max_threads > 1
            and "OMP_NUM_THREADS" not in os.environ
            and os.environ.get("MINICPM_ADAPTIVE_THREADS", "1") != "0"
        )
        self.others = 0.0  # cores other processes kept busy over the last interval
        self.drops = 0  # times the count went below max_threads (an operator's counter)
        self.reduced_seconds = 0.0  # time spent below max_threads, up to the last tick
        self._reduced_since: float | None = None

    def tick(self) -> None:
        if not self.enabled:
            return
        at = self._clock()
        if at < self._due:
            return
        self._due = at + self.interval
        now = self._read()
        if now is None or self._last is None:
            return
        stale = at - self._last_at > 4 * self.interval
        busy, total, mine = (a - b for a, b in zip(now, self._last, strict=True))
        self._last, self._last_at = now, at
        if total <= 0:
            return
        per_core = total / self.cores  # ticks that elapsed on each core
        if stale and mine < 0.5 * per_core:  # a window from before an idle spell: start a fresh one
            return
        self.others = max(0.0, (busy - mine) / per_core)
        want = self.threads
        if self.others >= 0.6:
            want = max(1, min(self.max_threads, self.cores - round(self.others + 0.2)))
        elif self.others < 0.3:
            want = self.max_threads
        if want != self.threads:
            log.info("other processes keep %.1f cores busy: %d -> %d threads", self.others, self.threads, want)
            if self.threads == self.max_threads:
                self.drops += 1
                self._reduced_since = at
            elif want == self.max_threads and self._reduced_since is not None:
                self.reduced_seconds += at - self._reduced_since
                self._reduced_since = None
            self.threads = want
            self._set(want)

    def stats(self) -> dict[str, int | float]:
        """``cpu_threads`` now, ``cpu_thread_drops`` (times the count went below where it
        started) and ``cpu_reduced_seconds`` (time spent below it, to now)."""
        reduced = self.reduced_seconds
        if self._reduced_since is not None:
            reduced += self._clock() - self._reduced_since
        return thread_stats(self.threads, self.drops, reduced)


def thread_stats(threads: int = 0, drops: int = 0, reduced_seconds: float = 0.0) -> dict[str, int | float]:
    """The governor's counters as engine ``stats()`` names them (all zero: no CPU governor)."""
    return {"cpu_threads": threads, "cpu_thread_drops": drops, "cpu_reduced_seconds": reduced_seconds}
