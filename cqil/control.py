"""Bounded waits between the ranks of a torchrun job, outside the compute path (cqil bench's barriers
and rank 0's decisions): a peer that shows no sign of life is named within a stated timeout.

Light on purpose (no model code): a job's ranks import it before anything heavy.
"""
from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from . import CqilError


class Control:
    """Barriers and rank 0's decisions through the launcher's key-value store, every wait bounded.

    Why not gloo barriers: a stopped peer (SIGSTOP, a debugger) keeps its sockets open, so a
    barrier cannot tell it from a peer that is busy, and waits for the whole timeout, which must be
    long while rank 0 times the baselines alone. Here a thread of every rank bumps a heartbeat
    counter in the store; a waiting rank whose peer's counter has not moved for `timeout_s` ends
    the wait with that rank named, while a live peer that is merely busy is waited for up to
    `busy_timeout_s`. A dead peer stops its heartbeat the same way (and torchrun ends the run)."""

    def __init__(self, timeout_s: float, busy_timeout_s: float, prefix: str = "cqil-bench"):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.timeout_s, self.busy_timeout_s = float(timeout_s), float(busy_timeout_s)
        prefix = f"{prefix}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"  # a restarted job starts afresh
        self.store, beat_store = (dist.PrefixStore(prefix, self._client()) for _ in range(2))  # one per thread
        self.seq = 0
        self.waiting: str | None = None  # the key the main thread waits for (read by the heartbeat thread)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(beat_store,), daemon=True, name="cqil-heartbeat")
        self._beat.start()

    def _client(self) -> dist.Store:
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=max(self.timeout_s, 10)))

    def _heartbeat(self, store: dist.Store) -> None:
        """Every `beat` seconds: bump my counter, read the peers'; a peer silent for timeout_s while the
        main thread waits releases that wait with its rank named (the first word in the key wins)."""
        beat = max(0.05, min(1.0, self.timeout_s / 5))
        peers = [p for p in range(self.world) if p != self.rank]
        seen = {p: (-1, time.monotonic()) for p in peers}  # last counter value, when it last moved
        try:
            while not self._stop.wait(beat):
                store.add(f"alive/{self.rank}", 1)
                now = time.monotonic()
                for p in peers:
                    v = store.add(f"alive/{p}", 0)
                    if v != seen[p][0]:
                        seen[p] = (v, now)
                    elif now - seen[p][1] > self.timeout_s and (key := self.waiting) is not None:
                        store.compare_set(key, "", f"silent {p} {now - seen[p][1]:.0f}")
        except (RuntimeError, dist.DistError):  # the store went away: the job is ending
            pass

    def _wait(self, key: str, what: str, busy: bool) -> str:
        """Wait for `key` (set by the last rank to arrive, rank 0's decision, or the heartbeat thread)."""
        # a peer that is silent (stopped, dead) is named after timeout_s by the heartbeat thread; a live
        # peer gets twice that to reach a point that all ranks reach together, or solo_timeout_s when busy
        cap = self.busy_timeout_s if busy else 2 * self.timeout_s
        self.waiting = key
        try:
            self.store.wait([key], timedelta(seconds=cap))
        except dist.DistStoreError:
            missing = [r for r in range(self.world) if not self.store.check([f"{key}/arrived/{r}"])]
            knob = "solo_timeout_s" if busy else "timeout_s"
            raise CqilError(f"rank {self.rank}: waited {cap:g} s at {what} for rank(s) {', '.join(map(str, missing))}, "
                            f"alive but not arriving; if they are that slow, raise {knob}") from None
        finally:
            self.waiting = None
        value = self.store.get(key).decode()
        if value.startswith("silent "):
            _, peer, age = value.split()
            raise CqilError(f"rank {self.rank}: rank {peer} has shown no sign of life for {age} s (stopped or dead) "
                            f"while rank {self.rank} waited at {what}; the run ends (timeout_s={self.timeout_s:g})")
        return value

    def barrier(self, what: str, busy: bool = False) -> None:
        """Every rank arrives before any leaves. busy=True: a peer may legitimately take long (up to solo_timeout_s)."""
        self.seq += 1
        key = f"barrier/{self.seq}"
        self.store.set(f"{key}/arrived/{self.rank}", "1")
        if self.store.add(f"{key}/count", 1) == self.world:
            self.store.compare_set(key, "", "ok")
        self._wait(key, what, busy)

    def decide(self, value: str | None, what: str, busy: bool = False) -> str:
        """Rank 0's `value` on every rank (the others pass None); busy=True: rank 0 may take long to decide."""
        self.seq += 1
        key = f"decision/{self.seq}"
        if self.rank == 0:
            self.store.set(f"{key}/arrived/0", "1")
            self.store.compare_set(key, "", f"ok {value}")
        return self._wait(key, what, busy=busy and self.rank != 0).split(" ", 1)[1]

    def gather(self, value: str, what: str) -> list[str] | None:
        """Every rank's `value`, in rank order, on rank 0 (None on the others)."""
        self.seq += 1
        key = f"gather/{self.seq}"
        self.store.set(f"{key}/{self.rank}", value)
        self.barrier(what)
        return [self.store.get(f"{key}/{r}").decode() for r in range(self.world)] if self.rank == 0 else None

    def close(self) -> None:
        self._stop.set()
        self._beat.join(timeout=5)
