"""
A random read/write workload checked against a model of the disk, for disks that answer later.

``ModelWorkload`` keeps ``depth`` requests in flight at random, non-overlapping
sectors and checks every read against what the disk may hold.  Subclasses
say how to reach the disk (``read``, ``write``, ``flush``, sector-addressed,
each returning a Deferred) and which failures are expected and how to
record them: ``tests.test_nbd`` drives an ``nbd:`` backend directly,
``tests.test_nbd_e2e`` a remote disk through AoE.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer

Gen = Generator[defer.Deferred[Any], Any, None]

SECTOR = 512


class ModelWorkload:
    """
    Requests, ``depth`` at a time, at random non-overlapping sectors, checked against ``model``.

    ``model`` is what the disk holds; a successful write updates it.  A write
    that failed may or may not have reached the disk, so each of its
    sectors may afterwards read as the model's bytes or as one of
    ``candidates[sector]``.  ``wrong`` lists every read that returned
    anything else.  A failure of one of the ``recorded`` types goes to
    ``failed`` (any other is a bug, and fails the run); one request in 32 is
    a flush.
    """

    #: The failures that are answers (recorded by ``failed``), not bugs.
    recorded: tuple[type[BaseException], ...] = (OSError,)

    def __init__(
        self, model: bytearray, seed: int, depth: int, max_sectors: int, writes: float = 0.5
    ) -> None:
        self.model = model
        self.rng = random.Random(seed)
        self.depth = depth
        self.max_sectors = max_sectors
        self.writes = writes
        self.sectors = len(model) // SECTOR
        self.busy: set[int] = set()
        self.candidates: dict[int, set[bytes]] = {}
        self.wrong: list[str] = []
        self.completed = 0
        self.on_complete: Callable[[int], None] = lambda completed: None
        self._remaining = 0

    # -- what a subclass says -----------------------------------------------------------

    def read(self, start: int, count: int) -> defer.Deferred[bytes]:
        """Read ``count`` sectors from ``start``."""
        raise NotImplementedError

    def write(self, start: int, data: bytes) -> defer.Deferred[Any]:
        """Write ``data`` (whole sectors) at ``start``."""
        raise NotImplementedError

    def flush(self) -> defer.Deferred[Any]:
        """Make what was written durable."""
        raise NotImplementedError

    def failed(self, error: BaseException) -> None:
        """Record ``error``, a failure of one of the ``recorded`` types."""
        raise NotImplementedError

    def started(self) -> None:
        """Called after each request is sent (to watch how many are in flight)."""

    # -- the workload ------------------------------------------------------------------

    def run(self, count: int) -> defer.Deferred[Any]:
        """Make ``count`` requests, ``depth`` in flight; fire when all are answered."""
        self._remaining = count
        return defer.gatherResults([self._lane() for _ in range(self.depth)], consumeErrors=True)

    @defer.inlineCallbacks
    def _lane(self) -> Gen:
        while self._remaining > 0:
            self._remaining -= 1
            yield self._one()
            self.completed += 1
            self.on_complete(self.completed)

    def _pick(self) -> tuple[int, int]:
        while True:
            count = self.rng.randint(1, self.max_sectors)
            start = self.rng.randrange(0, self.sectors - count + 1)
            span = range(start, start + count)
            if self.busy.isdisjoint(span):
                self.busy.update(span)
                return start, count

    @defer.inlineCallbacks
    def _one(self) -> Gen:
        if self.rng.random() < 1 / 32:
            try:
                yield self.flush()
            except self.recorded as e:
                self.failed(e)
            return
        start, count = self._pick()
        offset, length = start * SECTOR, count * SECTOR
        try:
            if self.rng.random() < self.writes:
                data = self.rng.randbytes(length)
                d = self.write(start, data)
                self.started()
                try:
                    yield d
                except self.recorded as e:
                    self.failed(e)
                    for i in range(count):
                        piece = data[i * SECTOR : (i + 1) * SECTOR]
                        self.candidates.setdefault(start + i, set()).add(piece)
                else:
                    self.model[offset : offset + length] = data
                    for i in range(count):
                        self.candidates.pop(start + i, None)
            else:
                d = self.read(start, count)
                self.started()
                try:
                    got = yield d
                except self.recorded as e:
                    self.failed(e)
                else:
                    self.check(start, got)
        finally:
            self.busy.difference_update(range(start, start + count))

    def check(self, start: int, got: bytes) -> None:
        """Record in ``wrong`` any sector of ``got`` (read at ``start``) the disk cannot hold."""
        offset = start * SECTOR
        if len(got) % SECTOR:
            self.wrong.append(f"{len(got)} bytes at sector {start}")
            return
        if got == self.model[offset : offset + len(got)]:
            return
        for i in range(len(got) // SECTOR):
            piece = got[i * SECTOR : (i + 1) * SECTOR]
            at = offset + i * SECTOR
            if piece != self.model[at : at + SECTOR] and piece not in self.candidates.get(
                start + i, ()
            ):
                self.wrong.append(f"sector {start + i}")

    @defer.inlineCallbacks
    def check_all(self, sectors: int = 128) -> Gen:
        """Read the whole disk, ``depth`` reads of ``sectors`` in flight, and ``check`` it all."""
        limit = defer.DeferredSemaphore(self.depth)

        def one(start: int) -> defer.Deferred[None]:
            d = limit.run(self.read, start, min(sectors, self.sectors - start))
            return d.addCallback(lambda got: self.check(start, got))

        yield defer.gatherResults(
            [one(start) for start in range(0, self.sectors, sectors)], consumeErrors=True
        )
