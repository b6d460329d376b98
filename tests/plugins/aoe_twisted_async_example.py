"""
An example asynchronous backend plugin: ``later:SIZE``.

A disk of ``SIZE`` bytes in memory, zeros at start, like ``memory:SIZE``,
except that every operation completes later: it returns a ``Deferred``
that fires on the reactor's next turn, as a network disk's answers arrive
when the network brings them.  The server goes on serving meanwhile.

This file is the whole plugin.  Put it in a ``twisted/plugins/`` directory
on ``sys.path`` (never add an ``__init__.py`` there) and
``--target 1.0=later:64M`` works.  The test suite finds it through
``tests.plugintools.use_test_plugins``.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater
from zope.interface import implementer

from aoe_twisted.interfaces import IAsyncBlockBackend, IBackendFactory
from aoe_twisted.units import parse_size


@implementer(IAsyncBlockBackend)
class LaterBackend:
    """A disk of ``size`` bytes in memory whose operations complete on the reactor's next turn."""

    def __init__(self, size: int, read_only: bool = False, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.size = size
        self.read_only = read_only
        self.reactor = reactor
        self.data = bytearray(size)

    def _later(self, operation: Any, *args: Any) -> Deferred[Any]:
        # deferLater runs the operation on the reactor's next turn and fires the
        # Deferred with its result, or fails it with the OSError it raised.
        # Cancelling the Deferred (the server does, after --backend-timeout)
        # cancels the call: an operation given up on is not carried out.
        return deferLater(self.reactor, 0, operation, *args)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return self._later(self._read, offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> Deferred[None]:
        if self.read_only:
            return fail(OSError(errno.EROFS, "the disk is read-only"))
        # Kept until the write is carried out, after this call returns: as bytes,
        # never a view of a buffer someone else may reuse.
        return self._later(self._write, offset, bytes(data))

    def _write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def flush(self) -> Deferred[None]:
        # Memory has nothing to make durable; a network disk asks its server here.
        return self._later(lambda: None)

    def close(self) -> Deferred[None]:
        return self._later(self._close)

    def _close(self) -> None:
        self.data = bytearray()


@implementer(IBackendFactory)
class LaterBackendFactory:
    """Opens ``later:SIZE``, e.g. ``later:64M``."""

    scheme = "later"
    spec_format = "SIZE"
    description = "a disk in RAM whose operations complete later (an example), e.g. later:1M"

    def open(self, spec: str, read_only: bool = False) -> LaterBackend:
        return LaterBackend(parse_size(spec), read_only=read_only)


later = LaterBackendFactory()
