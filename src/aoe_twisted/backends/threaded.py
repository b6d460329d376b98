# -*- test-case-name: tests.test_threaded -*-
"""
``thread:SCHEME:SPEC``: a synchronous disk whose calls block, run in a thread pool.

Every ``IBlockBackend`` call runs in the reactor thread, which is right for
a local disk (a ``pread`` from the page cache is cheaper than a thread
switch) and wrong for one that waits: a third-party backend that talks to a
remote store, or a disk that can stall, would stop every target of the
server while it waits.  ``ThreadedBackend`` wraps such a disk as an
``IAsyncBlockBackend``: each operation runs in a pool of threads
(``deferToThreadPool``) and the server answers when it completes, serving
everything else meanwhile.  Opt in per target: ``--target
1.0=thread:mydisk:SPEC`` (or ``thread:8:SCHEME:SPEC`` for 8 threads).

The wrapped disk must be safe to call from several threads at once, as
``os.pread``/``os.pwrite`` on one descriptor are (``file:`` and ``block:``
are); give ``thread:1:`` for one that is not.  A disk's identity
(``IDiskIdentity``) is the wrapped disk's.
"""

from __future__ import annotations

from functools import partial
from threading import Thread
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import alsoProvides, implementer

from aoe_twisted.interfaces import IAsyncBlockBackend, IBlockBackend, IDiskIdentity

__all__ = ["DEFAULT_THREADS", "ThreadedBackend", "parse_threaded_spec"]

DEFAULT_THREADS = 8
"""Threads per ``thread:`` disk unless the spec says otherwise."""

_MAX_THREADS = 256


def parse_threaded_spec(spec: str) -> tuple[int, str]:
    """
    Split ``[N:]SCHEME:SPEC`` into the thread count and the wrapped disk's ``SCHEME:SPEC``.

    ``ValueError`` (one line) for a count out of 1..256 or nothing to wrap.
    """
    count, colon, rest = spec.partition(":")
    threads = DEFAULT_THREADS
    if count.isdigit() and colon:
        threads = int(count)
        spec = rest
        if not 1 <= threads <= _MAX_THREADS:
            raise ValueError(f"thread count must be 1..{_MAX_THREADS}, not {threads}")
    if ":" not in spec:
        raise ValueError(
            f"expected thread:[N:]SCHEME:SPEC (the disk to run in threads), not thread:{spec}"
        )
    if spec.startswith("thread:"):
        raise ValueError("a thread: disk inside a thread: disk is pointless")
    return threads, spec


@implementer(IAsyncBlockBackend)
class ThreadedBackend:
    """
    ``inner`` (an ``IBlockBackend``) as an ``IAsyncBlockBackend``, each call in ``threads`` threads.

    The pool starts with the first call (not before: ``twistd`` may fork
    after the disk is opened, and threads do not survive a fork).  ``close``
    waits until no call is running in the pool (the server may have given up
    on some: their threads still use the disk), closes the wrapped disk (in
    the pool, like every other call), then stops the pool.  The threads are
    daemon threads: one stuck for ever in the wrapped disk does not keep the
    process from exiting.
    """

    def __init__(self, inner: IBlockBackend, threads: int = DEFAULT_THREADS, reactor: Any = None):
        if not IBlockBackend.providedBy(inner):
            raise TypeError(f"thread: wraps an IBlockBackend, not {inner!r}")
        if reactor is None:
            from twisted.internet import reactor
        self.inner = inner
        self.reactor = reactor
        self.size: int = inner.size
        self.read_only: bool = inner.read_only
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="aoe-thread-disk")
        self.pool.threadFactory = partial(Thread, daemon=True)  # type: ignore[assignment]
        #: Calls running (or queued) in the pool: counted in the thread, not by the Deferred,
        #: which the server may cancel while the thread still runs.
        self.running = 0
        self._idle: list[Deferred[None]] = []
        if IDiskIdentity.providedBy(inner):
            identity = inner.disk_identity()
            self.disk_identity = lambda: identity
            alsoProvides(self, IDiskIdentity)

    def _call(self, f: Any, *args: Any) -> Any:
        """Run ``f(*args)`` in the pool; a ``Deferred`` of its result."""
        if not self.pool.started:
            self.pool.start()
        self.running += 1

        def run() -> Any:
            try:
                return f(*args)
            finally:
                # Queued before the result's own callFromThread: counted down first.
                self.reactor.callFromThread(self._finished)

        return deferToThreadPool(self.reactor, self.pool, run)

    def _finished(self) -> None:
        """A call returned in its thread (in the reactor thread)."""
        self.running -= 1
        if not self.running:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _when_idle(self) -> Deferred[None]:
        """A ``Deferred`` firing once no call is running in the pool."""
        if not self.running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def read(self, offset: int, length: int) -> Any:
        """``inner.read`` in a thread."""
        return self._call(self.inner.read, offset, length)

    def write(self, offset: int, data: bytes) -> Any:
        """``inner.write`` in a thread (``data`` is ``bytes``: nothing refers to a ring slot)."""
        return self._call(self.inner.write, offset, bytes(data))

    def flush(self) -> Any:
        """``inner.flush`` in a thread."""
        return self._call(self.inner.flush)

    def close(self) -> Any:
        """Once no call is running, close the wrapped disk (in the pool); then stop the pool."""
        d = self._when_idle()
        d.addCallback(lambda _: self._call(self.inner.close))

        def stop(result: object) -> object:
            # In the reactor thread (where Deferreds fire), not a pool thread: it joins
            # them, at once when they are idle.  Given up on (cancelled) while a call is
            # stuck: leave the daemon threads be rather than block the reactor.
            if not self.running:
                self.pool.stop()
            return result

        return d.addBoth(stop)
