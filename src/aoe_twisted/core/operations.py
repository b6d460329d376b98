# -*- test-case-name: tests.test_operations -*-
"""
Backend I/O as values: what the core asks for before it can answer a request.

The ATA engine never calls a disk itself.  For a READ, WRITE or FLUSH CACHE
request it returns a ``BackendIO`` — "read ``length`` bytes at ``offset``",
"write these bytes at ``offset``", "make completed writes durable" — and the
caller carries it out and hands the result back (``ata.finish_ata``, or
``Pending.reply`` for a whole target's answer), in the way h11 returns
events and leaves the socket to its caller.

``perform`` is the synchronous way to carry one out: a direct call of the
``IBlockBackend`` method, which is how the server runs the built-in
backends (inline, in the reactor thread, at no cost over calling the
backend from the engine).  A caller that runs an operation later — in a
thread, or on a backend that answers with a ``Deferred`` — completes it
whenever the result arrives: an operation holds everything its answer
needs and nothing holds it, so operations may complete in any order.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from attrs import define, setters

from aoe_twisted.interfaces import IBlockBackend

__all__ = ["BackendIO", "IOKind", "perform", "submit"]


class IOKind(IntEnum):
    """What a ``BackendIO`` asks of the disk."""

    READ = 1
    """Read ``length`` bytes at ``offset``; the result is the ``bytes`` read."""
    WRITE = 2
    """Write ``data`` at ``offset``; the result is ``None``."""
    FLUSH = 3
    """Make every completed write durable (``IBlockBackend.flush``); the result is ``None``."""


# Not frozen: a frozen attrs class costs three times as much to build, and one
# is built for every request the general path answers.  Treat it as a value.
@define(on_setattr=setters.NO_OP)
class BackendIO:
    """
    One disk operation a request needs, in bytes.

    The engine has checked the range against the disk's size and, for a
    write, that the disk is writable: carrying it out is all that is left.
    ``data`` is a write's bytes (exactly ``length`` of them), ``b""`` otherwise;
    it may be a ``memoryview`` only when the request's buffer outlives the
    operation.
    """

    kind: IOKind
    offset: int = 0
    length: int = 0
    data: bytes | memoryview = b""


def perform(io: BackendIO, backend: IBlockBackend) -> bytes | None:
    """
    Carry out ``io`` on ``backend`` now, synchronously; return its result.

    The bytes read for ``READ``, ``None`` otherwise.

    @raise OSError: what the backend raised; the engine turns it into an
        ATA error (``UNC`` for a read, ``ABRT`` for a write or a flush).
    """
    kind = io.kind
    if kind is IOKind.READ:
        return backend.read(io.offset, io.length)
    if kind is IOKind.WRITE:
        backend.write(io.offset, io.data)
        return None
    backend.flush()
    return None


def submit(io: BackendIO, backend: Any) -> Any:
    """
    Start ``io`` on an asynchronous ``backend`` (``IAsyncBlockBackend``); return its ``Deferred``.

    It fires with the bytes read for ``READ``, with ``None`` otherwise, or
    fails with the ``OSError`` the engine turns into an ATA error.  The
    core only names the call: waiting for it is the Twisted layer's.
    """
    kind = io.kind
    if kind is IOKind.READ:
        return backend.read(io.offset, io.length)
    if kind is IOKind.WRITE:
        return backend.write(io.offset, io.data)
    return backend.flush()
