# -*- test-case-name: tests.test_nbd -*-
"""
``nbd:unix:PATH[:EXPORT]`` and ``nbd:HOST:PORT[:EXPORT]``: a disk an NBD server serves.

Anything an NBD server exports becomes an AoE disk: a qcow2 overlay served
by ``qemu-nbd``, an ``nbdkit`` plugin, another host's disk.  The client is
libnbd (Debian's ``python3-libnbd``), used through its asynchronous API and
driven by the Twisted reactor, with no threads:

- the reactor watches the handle's socket (``aio_get_fd``) for reading
  always, and for writing while ``aio_get_direction`` asks for it (checked
  again after every submission and every notification), and calls
  ``aio_notify_read``/``aio_notify_write`` when it is ready;
- commands are ``aio_pread``/``aio_pwrite``/``aio_flush`` with a completion
  callback.  libnbd runs that callback holding the handle's lock, so it only
  records the completion; the Deferreds fire once the libnbd call has
  returned (a callback chain that submits the next command would otherwise
  deadlock);
- libnbd reads one reply per ``aio_notify_read``: while bytes wait on the
  socket (``FIONREAD``) it is called again, so the answers that arrived
  together cost one reactor turn; and the backend asks for simple replies
  (``set_request_structured_replies(False)``): a read's answer is a header
  and the data, two system calls where structured chunks take four, and
  ``pread``/``pwrite``/``flush`` need nothing structured replies add;
- the reactor watches a *duplicate* of libnbd's descriptor: libnbd closes
  its own the moment the connection dies, inside ``aio_notify_read``, and
  the duplicate keeps the number valid until the reactor has forgotten it;
- every buffer stays referenced until libnbd has completed its command or
  the handle is dropped, even after its request failed with ``ETIMEDOUT``.

A server that goes away fails the requests in flight (``ENOTCONN`` from
libnbd) and every new one (``ENOTCONN``) until a new connection is made, in
the background, after 0.1 s, then twice as long each time up to 5 s.  The
new connection must show the same size; if it does not the disk stays
failed (``EIO``) and says so once.  Every change of state is one log line,
never one per request.

A request the server does not answer within the deadline (``timeout``,
30 s by default) fails with ``ETIMEDOUT``; the first such failure is logged,
then at most one line every ten seconds with a count.  Its command stays
with libnbd (and keeps its buffer) until the server answers, which is then
ignored, or the connection is dropped.  It is dropped, as if the server had
gone (and reconnected), when nothing at all was answered since an expired
request was sent (a stalled server, or a peer gone without a reset, which
TCP would take many minutes to notice), or when more than ``max_expired``
(256) expired requests are still unanswered: the deadline bounds the
memory a server that never answers can pin.

Opening: ``NBDBackendFactory.open_async`` connects through the reactor and
fires with the backend once the handshake is done; a host name is looked up
with the reactor's resolver (Twisted's own thread pool), never blocking the
reactor.  ``NBDBackendFactory.open`` (the synchronous
``IBackendFactory.open``) makes the same connection blocking, with libnbd's
own ``poll`` and a time limit, before the reactor runs, then hands the
connected handle to the backend, which drives it through the reactor from
then on.  The export must take 512-byte requests (its minimum block size at
most 512: qemu-nbd and nbdkit by default); its size must be a whole number
of sectors.

libnbd 1.14 (Debian 12) has no ``close()`` on a handle: dropping the last
reference closes it; ``close`` here disconnects politely first
(``aio_disconnect``) when no command is left in flight.  Close the backend
before the reactor stops (in ``stopService``); a reactor that stops first
drops the connection, which the backend takes for a lost server.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import re
import termios
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IReactorPluggableNameResolver,
    IReadWriteDescriptor,
    IResolutionReceiver,
)
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import IAsyncBlockBackend, IBackendFactory
from aoe_twisted.units import check_disk_size

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "MISSING_LIBNBD",
    "NBDAddress",
    "NBDBackend",
    "NBDBackendFactory",
    "format_nbd_spec",
    "parse_nbd_spec",
]

_log = Logger()

MISSING_LIBNBD = "nbd: backend needs python3-libnbd (apt-get install python3-libnbd)"
DEFAULT_TIMEOUT = 30.0
"""Seconds a request may wait for the server before it fails with ``ETIMEDOUT``."""
DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds a connection (socket and NBD handshake) may take."""

_SPEC_FORMAT = "unix:PATH[:EXPORT] or HOST:PORT[:EXPORT]"
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")
_MAX_EXPORT = 4096  # bytes, the NBD protocol's limit on an export name
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
_TIMEOUT_LOG_INTERVAL = 10.0
_CLOSE_TIMEOUT = 5.0
_SECTOR = 512
_READ = 1  # nbd.AIO_DIRECTION_READ
_WRITE = 2  # nbd.AIO_DIRECTION_WRITE
_SWEEP_SLACK = 0.01
"""Requests whose deadlines fall this close (s) after a sweep expire with it: requests sent
together fail together (not the first alone, the connection then dropped under the others
as stalled), and one timer serves a burst."""
_REPLIES_PER_TURN = 256
"""At most this many ``aio_notify_read`` calls for one readiness event (libnbd reads one reply
per call): a burst of answers costs one reactor turn, and a server that answers faster than
the backend reads still lets the reactor serve everything else between bursts."""


# -- the spec ---------------------------------------------------------------------------------


@frozen
class NBDAddress:
    """
    Where an NBD export is: ``kind`` ``"unix"`` (``address`` a socket path)
    or ``"tcp"`` (``address`` a ``(host, port)`` pair), and the export name
    (``""``: the server's default export).
    """

    kind: str
    address: str | tuple[str, int]
    export: str = ""

    @classmethod
    def parse(cls, spec: str) -> NBDAddress:
        """Parse the text after ``nbd:`` (see ``parse_nbd_spec``)."""
        return cls(*parse_nbd_spec(spec))

    def __str__(self) -> str:
        return format_nbd_spec(self.kind, self.address, self.export)


def _spec_error(spec: str, problem: str) -> BackendSpecError:
    shown = spec.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates escaped
    return BackendSpecError(
        f"nbd:{shown}: {problem}; expected nbd:unix:PATH[:EXPORT] or nbd:HOST:PORT[:EXPORT]"
    )


def _utf8(spec: str, text: str, what: str) -> bytes:
    """``text`` in UTF-8 (what libnbd is given), or a one-line error naming ``what``."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise _spec_error(spec, f"the {what} is not valid UTF-8") from None


def parse_nbd_spec(spec: str) -> tuple[str, str | tuple[str, int], str]:
    """
    Return ``(kind, address, export)`` for the text after ``nbd:``.

    - ``unix:PATH[:EXPORT]``: ``("unix", PATH, EXPORT)``; the path ends at
      the first colon after ``unix:``, so a socket path cannot hold one, an
      export name can;
    - ``HOST:PORT[:EXPORT]`` and ``[IPV6]:PORT[:EXPORT]``:
      ``("tcp", (HOST, PORT), EXPORT)``, ``HOST`` without brackets.

    A missing export is ``""``, the server's default export.

    @raise BackendSpecError: one line naming what is wrong.
    """
    if spec.startswith("unix:"):
        path, _, export = spec[len("unix:") :].partition(":")
        if not path:
            raise _spec_error(spec, "no socket path after unix:")
        if "\0" in path:
            raise _spec_error(spec, "the socket path holds a NUL character")
        _utf8(spec, path, "socket path")
        return ("unix", path, _check_export(spec, export))
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket:
            raise _spec_error(spec, "'[' without a closing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _spec_error(spec, f"{host!r} in brackets is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise _spec_error(spec, f"no :PORT after [{host}]")
        port_text, _, export = rest[1:].partition(":")
    else:
        host, colon, rest = spec.partition(":")
        if not host:
            hint = " (an IPv6 address goes in brackets: [::1]:10809)" if "::" in spec else ""
            raise _spec_error(spec, f"no host before the port{hint}")
        if not colon:
            raise _spec_error(spec, f"no :PORT after {host!r}")
        port_text, _, export = rest.partition(":")
        if not _HOSTNAME.match(host):
            raise _spec_error(spec, f"{host!r} is not a host name or IPv4 address")
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        hint = " (an IPv6 address goes in brackets: [::1]:10809)" if "::" in spec else ""
        raise _spec_error(spec, f"port {port_text!r} is not a number from 1 to 65535{hint}")
    return ("tcp", (host, int(port_text)), _check_export(spec, export))


def _check_export(spec: str, export: str) -> str:
    if len(_utf8(spec, export, "export name")) > _MAX_EXPORT:
        raise _spec_error(spec, f"the export name is longer than {_MAX_EXPORT} bytes")
    if "\0" in export:
        raise _spec_error(spec, "the export name holds a NUL character")
    return export


def format_nbd_spec(kind: str, address: str | tuple[str, int], export: str = "") -> str:
    """
    Return the text after ``nbd:`` that ``parse_nbd_spec`` turns back into the arguments.

    An IPv6 host is put in brackets; a missing export leaves no trailing colon.
    """
    if kind == "unix":
        assert isinstance(address, str)
        text = f"unix:{address}"
    else:
        host, port = address
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{text}:{export}" if export else text


# -- libnbd -----------------------------------------------------------------------------------


def _import_nbd() -> ModuleType:
    """Return the ``nbd`` module (``python3-libnbd``) or raise ``BackendSpecError`` saying so."""
    try:
        import nbd
    except ImportError:
        raise BackendSpecError(MISSING_LIBNBD) from None
    return nbd


def _oserror(code: int, what: str, detail: str | None = None) -> OSError:
    """Return ``OSError(code)`` whose text names the request and, if given, libnbd's message."""
    code = code or errno.EIO
    return OSError(code, f"{detail or os.strerror(code)} ({what})")


_LIBNBD_PREFIX = re.compile(r"nbd_[a-z_]+: ")
_LIBNBD_ERRNO = re.compile(r" \([A-Z0-9]+\)\Z")


def _message(error: Any) -> str:
    """libnbd's message without the function name and the errno name: ``connect: ...``."""
    return _LIBNBD_ERRNO.sub("", _LIBNBD_PREFIX.sub("", error.string, count=1))


def _connect_error(error: Any) -> OSError:
    """An ``OSError`` for a failed connection, from libnbd's ``nbd.Error``."""
    return OSError(error.errnum or errno.ECONNRESET, _message(error))


def _global_reactor() -> Any:
    """Return the global reactor, imported only when a backend is made (never at plugin scan)."""
    from twisted.internet import reactor

    return reactor


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _start_connect(nbd: ModuleType, address: NBDAddress, host: str | None = None) -> Any:
    """
    Return a new handle that has started connecting to ``address`` (``host``
    replaces a TCP address's host name: the address it resolved to).

    @raise OSError: if the connection failed at once (no socket, refused).
    """
    handle = nbd.NBD()
    try:
        handle.set_export_name(address.export)
        # Simple replies: a 4 KiB read is answered in two system calls (header,
        # data) instead of four; pread, pwrite and flush need nothing more.
        handle.set_request_structured_replies(False)
        if address.kind == "unix":
            handle.aio_connect_unix(address.address)
        else:
            name, port = address.address
            handle.aio_connect_tcp(host or name, str(port))
    except nbd.Error as e:
        raise _connect_error(e) from None
    return handle


def _dead(handle: Any) -> bool:
    return bool(handle.aio_is_dead() or handle.aio_is_closed())


def _connect_blocking(address: NBDAddress, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Any:
    """
    Return a libnbd handle connected to ``address``, made without the reactor.

    libnbd's own ``poll`` drives the handshake, for at most ``timeout``
    seconds.  What ``NBDBackendFactory.open`` uses before the reactor runs; a
    host name is resolved by libnbd (``getaddrinfo``), blocking.

    @raise OSError: the connection failed or took too long (``ETIMEDOUT``).
    """
    nbd = _import_nbd()
    handle = _start_connect(nbd, address)
    deadline = time.monotonic() + timeout
    try:
        while not handle.aio_is_ready():
            if _dead(handle):
                raise OSError(errno.ECONNRESET, "connection closed in the NBD handshake")
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, f"no NBD handshake in {timeout:g} s")
            handle.poll(max(1, int(left * 1000)))
    except nbd.Error as e:
        raise _connect_error(e) from None
    return handle


@implementer(IReadWriteDescriptor)
class _Link:
    """
    The reactor's end of one libnbd handle: a duplicate of its socket descriptor.

    Always watched for reading; for writing only while ``want_write(True)``.
    Readiness is reported to ``on_ready(readable)``; ``on_lost`` is called if
    the reactor drops the descriptor by itself (at shutdown).
    """

    def __init__(
        self,
        reactor: Any,
        handle: Any,
        on_ready: Callable[[bool], None],
        on_lost: Callable[[], None],
        prefix: str,
    ) -> None:
        self._reactor = reactor
        self._fd = os.dup(handle.aio_get_fd())
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._prefix = prefix
        self._writing = False
        self._count = array("i", [0])  # FIONREAD's answer, reused
        reactor.addReader(self)

    def fileno(self) -> int:
        """The duplicate descriptor, or -1 once stopped."""
        return self._fd

    def logPrefix(self) -> str:
        """Name the connection in the reactor's log lines."""
        return self._prefix

    def doRead(self) -> None:
        """The socket has something to read: let libnbd read it."""
        self._on_ready(True)

    def doWrite(self) -> None:
        """The socket can take more: let libnbd write."""
        self._on_ready(False)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped this descriptor (reactor shutdown): close it, tell the owner."""
        if self._fd >= 0:
            self._close()
            self._on_lost()

    def unread(self) -> int:
        """
        How many bytes wait to be read on the socket (``FIONREAD``); 0 once stopped.

        Whether libnbd may be told the socket is readable again without a
        reactor turn: ``aio_notify_read`` is for a readable socket (calling
        it on an empty one, as an experiment here did, left requests
        unanswered until their deadline).
        """
        if self._fd < 0:
            return 0
        try:
            fcntl.ioctl(self._fd, termios.FIONREAD, self._count, True)
        except OSError:
            return 0
        return self._count[0]

    def want_write(self, on: bool) -> None:
        """Watch (or stop watching) the socket for room to write."""
        if on != self._writing and self._fd >= 0:
            self._writing = on
            if on:
                self._reactor.addWriter(self)
            else:
                self._reactor.removeWriter(self)

    def stop(self) -> None:
        """Stop watching the socket and close the duplicate; idempotent."""
        if self._fd >= 0:
            self._reactor.removeReader(self)
            if self._writing:
                self._reactor.removeWriter(self)
            self._close()

    def _close(self) -> None:
        fd, self._fd, self._writing = self._fd, -1, False
        os.close(fd)


@implementer(IResolutionReceiver)
class _FirstAddress:
    """Collects the first address a host name resolves to, for ``resolveHostName``."""

    def __init__(self) -> None:
        self.deferred: Deferred[str | None] = Deferred()
        self._host: str | None = None

    def resolutionBegan(self, resolution: object) -> None:
        """Nothing to do until an address arrives."""

    def addressResolved(self, address: Any) -> None:
        """Keep the first address."""
        if self._host is None:
            self._host = address.host

    def resolutionComplete(self) -> None:
        """Fire with the first address, or ``None`` if there was none."""
        self.deferred.callback(self._host)


class _Dialer:
    """
    One connection attempt through the reactor: socket, NBD handshake, then a ready handle.

    ``dial()`` fires with the handle once ``aio_is_ready``, or fails with
    ``OSError`` (refused, closed in the handshake, ``ETIMEDOUT`` after
    ``timeout`` seconds, ``ECONNABORTED`` if ``abort`` was called).  A host
    name is resolved through the reactor's resolver first, so no lookup
    blocks the reactor.
    """

    def __init__(self, nbd: ModuleType, reactor: Any, address: NBDAddress, timeout: float):
        self._nbd = nbd
        self._reactor = reactor
        self._address = address
        self._timeout = timeout
        self._deferred: Deferred[Any] = Deferred()
        self._handle: Any = None
        self._link: _Link | None = None
        self._timer: Any = None
        self._error: str | None = None

    def dial(self) -> Deferred[Any]:
        """Start the attempt; return the Deferred of the handle."""
        self._timer = self._reactor.callLater(self._timeout, self._timed_out)
        address = self._address
        if (
            address.kind == "tcp"
            and not _is_ip(address.address[0])
            and IReactorPluggableNameResolver.providedBy(self._reactor)
        ):
            receiver = _FirstAddress()
            self._reactor.nameResolver.resolveHostName(
                receiver, address.address[0], portNumber=address.address[1]
            )
            receiver.deferred.addCallback(self._resolved)
            return self._deferred
        self._begin(None)
        return self._deferred

    def abort(self) -> None:
        """Give up: fail the Deferred with ``ECONNABORTED`` and drop the handle."""
        self._finish(OSError(errno.ECONNABORTED, "connection attempt aborted"))

    def _resolved(self, host: str | None) -> None:
        if self._deferred.called:
            return
        if host is None:
            name = self._address.address[0]
            self._finish(OSError(errno.EHOSTUNREACH, f"host name {name!r} not found"))
            return
        self._begin(host)

    def _begin(self, host: str | None) -> None:
        try:
            self._handle = _start_connect(self._nbd, self._address, host)
        except OSError as e:
            self._finish(e)
            return
        self._link = _Link(
            self._reactor, self._handle, self._ready, self._link_lost, f"nbd:{self._address}"
        )
        self._check()

    def _ready(self, readable: bool) -> None:
        if self._handle is None:
            return  # finished while the reactor was still dispatching this event
        try:
            if readable:
                self._handle.aio_notify_read()
            else:
                self._handle.aio_notify_write()
        except self._nbd.Error as e:
            self._error = _message(e)
        self._check()

    def _check(self) -> None:
        handle = self._handle
        if handle.aio_is_ready():
            self._finish(handle)
        elif _dead(handle):
            self._finish(
                OSError(errno.ECONNRESET, self._error or "connection closed in the NBD handshake")
            )
        else:
            assert self._link is not None
            self._link.want_write(bool(handle.aio_get_direction() & _WRITE))

    def _link_lost(self) -> None:
        self._finish(OSError(errno.ECONNABORTED, "the reactor stopped"))

    def _timed_out(self) -> None:
        self._timer = None
        what = "no NBD handshake" if self._handle is not None else "no answer to the host lookup"
        self._finish(OSError(errno.ETIMEDOUT, f"{what} in {self._timeout:g} s"))

    def _finish(self, result: Any) -> None:
        if self._deferred.called:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._link is not None:
            self._link.stop()
            self._link = None
        self._handle = None
        if isinstance(result, Exception):
            self._deferred.errback(result)
        else:
            self._deferred.callback(result)


# -- the backend ------------------------------------------------------------------------------


def _describe(what: tuple[str, int, int]) -> str:
    """``("read", 4096, 512)`` -> ``"read of 512 bytes at 4096"``, for messages."""
    kind, offset, length = what
    return kind if kind == "flush" else f"{kind} of {length} bytes at {offset}"


class _Request:
    """One command given to libnbd: its Deferred, its buffer, its deadline."""

    __slots__ = ("answers", "buffer", "deadline", "deferred", "expired", "finished", "what")

    def __init__(
        self, what: tuple[str, int, int], buffer: Any, deadline: float, answers: int
    ) -> None:
        self.what = what
        self.buffer = buffer
        self.deadline = deadline
        self.answers = answers  # how many answers the connection had when it was sent
        self.deferred: Deferred[Any] = Deferred()
        self.expired = False
        self.finished = False


@implementer(IAsyncBlockBackend)
class NBDBackend:
    """
    A disk an NBD server exports, read and written through libnbd's asynchronous API.

    Provides ``IAsyncBlockBackend``: ``read``, ``write``, ``flush`` and
    ``close`` return Deferreds that fire in the reactor thread, in any
    order, with as many requests in flight as the caller likes.  Failures are
    ``OSError``: ``ENOTCONN`` while the server is away, ``ETIMEDOUT`` after
    ``timeout`` seconds without an answer, ``EROFS`` for a write to a
    read-only disk, ``EIO`` once the server came back with another size, or
    the errno the server answered.

    Build it with ``NBDBackend.connect(address, ...)`` (asynchronous) or
    ``NBDBackend.open(address, ...)`` (blocking); the constructor adopts a
    handle that is already connected.

    @ivar size: bytes, from the server at the first connection, fixed.
    @ivar read_only: asked for, or the server exports the disk read-only.
    @ivar address: the ``NBDAddress`` served.
    @ivar timeout: the per-request deadline in seconds.
    @ivar max_expired: how many expired requests the server may keep
        unanswered (their buffers held) before the connection is dropped.
    """

    max_expired = 256

    def __init__(
        self,
        handle: Any,
        address: NBDAddress,
        *,
        read_only: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reactor: Any = None,
    ) -> None:
        self._nbd = _import_nbd()
        self._reactor = reactor if reactor is not None else _global_reactor()
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.size = check_disk_size(handle.get_size(), f"nbd:{address}")
        smallest = handle.get_block_size(self._nbd.SIZE_MINIMUM)
        if smallest > _SECTOR:
            raise BackendSpecError(
                f"nbd:{address}: the server takes nothing smaller than {smallest} bytes; "
                f"AoE reads and writes {_SECTOR}-byte sectors"
            )
        self.read_only = bool(read_only or handle.is_read_only())
        self._name = f"nbd:{address}"
        self._state = "connected"
        self._handle: Any = None
        self._link: _Link | None = None
        self._server_read_only = False
        self._can_flush = False
        self._last_error: str | None = None
        # Requests waiting for an answer, oldest first (their deadlines in order).
        self._live: dict[_Request, None] = {}
        # Every request whose libnbd command holds its buffer (includes expired ones).
        self._holding: set[_Request] = set()
        # (request, errno) that libnbd completed, to settle outside its lock.
        self._done: deque[tuple[_Request, int]] = deque()
        self._draining = False
        self._answers = 0  # answers received on this connection
        self._sweeper: Any = None
        self._retry: Any = None
        self._dialer: _Dialer | None = None
        self._backoff = _BACKOFF_FIRST
        self._attempts = 0
        self._down_since = 0.0
        self._timeouts_unlogged = 0
        self._timeout_logged_at: float | None = None
        self._closing: Deferred[None] | None = None
        self._close_timer: Any = None
        self._adopt(handle)
        _log.info(
            "{name}: connected, {size} bytes, {mode}",
            name=self._name,
            size=self.size,
            mode="read-only" if self.read_only else "read-write",
        )

    # -- opening

    @classmethod
    def connect(
        cls,
        address: NBDAddress,
        *,
        read_only: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reactor: Any = None,
    ) -> Deferred[NBDBackend]:
        """
        Connect through the reactor; fire with the backend once the server answered.

        Fails with ``BackendSpecError`` (one line) if python3-libnbd is
        missing, the connection fails, takes more than ``connect_timeout``
        seconds, or the size is not a whole number of sectors.
        """
        try:
            nbd = _import_nbd()
        except BackendSpecError:
            return fail()
        if reactor is None:
            reactor = _global_reactor()

        def connected(handle: Any) -> NBDBackend:
            return cls(
                handle,
                address,
                read_only=read_only,
                timeout=timeout,
                connect_timeout=connect_timeout,
                reactor=reactor,
            )

        def failed(f: Failure) -> Failure:
            if f.check(OSError) and not f.check(BackendSpecError):
                raise BackendSpecError(f"nbd:{address}: cannot connect: {f.value.strerror}")
            return f

        d = _Dialer(nbd, reactor, address, connect_timeout).dial()
        return d.addCallbacks(connected, failed)

    @classmethod
    def open(
        cls,
        address: NBDAddress,
        *,
        read_only: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reactor: Any = None,
    ) -> NBDBackend:
        """
        Connect blocking (at most ``connect_timeout`` seconds), then serve through the reactor.

        For the synchronous ``IBackendFactory.open``, before the reactor runs.

        @raise BackendSpecError: as ``connect`` fails.
        """
        try:
            handle = _connect_blocking(address, connect_timeout)
        except OSError as e:
            raise BackendSpecError(f"nbd:{address}: cannot connect: {e.strerror}") from None
        return cls(
            handle,
            address,
            read_only=read_only,
            timeout=timeout,
            connect_timeout=connect_timeout,
            reactor=reactor,
        )

    # -- state

    @property
    def state(self) -> str:
        """
        ``"connected"``, ``"reconnecting"``, ``"failed"`` (the size changed),
        ``"closing"`` or ``"closed"``.
        """
        return self._state

    @property
    def in_flight(self) -> int:
        """Commands libnbd still holds a buffer for (requests that expired included)."""
        return len(self._holding)

    # -- IAsyncBlockBackend

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """Fire with exactly ``length`` bytes from byte ``offset``, or fail with ``OSError``."""
        if self._state != "connected" or offset < 0 or length <= 0 or offset + length > self.size:
            return self._refuse("read", offset, length, b"")
        buffer = bytearray(length)
        return self._submit(
            ("read", offset, length), buffer, self._handle.aio_pread, buffer, offset
        )

    def write(self, offset: int, data: bytes) -> Deferred[None]:
        """
        Fire once the server has the data (durable after ``flush``), or fail with ``OSError``.

        ``data`` may be any bytes-like object; anything but ``bytes`` is
        copied first, since the request outlives the call.
        """
        length = len(data)
        if (
            self._state != "connected"
            or self.read_only
            or self._server_read_only
            or offset < 0
            or length <= 0
            or offset + length > self.size
        ):
            return self._refuse("write", offset, length, None)
        payload = data if type(data) is bytes else bytes(data)
        return self._submit(
            ("write", offset, length), payload, self._handle.aio_pwrite, payload, offset
        )

    def flush(self) -> Deferred[None]:
        """
        Fire once every completed write is durable (NBD ``FLUSH``).

        A server that does not offer ``FLUSH`` (``can_flush`` false) keeps
        nothing to flush, so this succeeds at once.
        """
        if self._state != "connected":
            return self._refuse("flush", 0, 0, None)
        if not self._can_flush:
            return succeed(None)
        return self._submit(("flush", 0, 0), None, self._handle.aio_flush)

    def close(self) -> Deferred[None]:
        """
        Stop reconnecting, wait for the requests still waiting (each at most
        until its deadline), disconnect, and fire.

        If commands whose requests expired are still with the server, the
        connection is dropped rather than disconnected politely.  Requests
        made after ``close`` fail with ``ENOTCONN``.
        """
        if self._closing is not None:
            return _chain(self._closing)
        self._closing = Deferred()
        closing = self._closing
        self._state = "closing"
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._dialer is not None:
            dialer, self._dialer = self._dialer, None
            dialer.abort()
        self._maybe_disconnect()
        return _chain(closing)

    # -- submitting

    def _refuse(self, kind: str, offset: int, length: int, empty: Any) -> Deferred[Any]:
        """The slow path of a request that does not go to the server: why not, or ``empty``."""
        what = _describe((kind, offset, length))
        if self._state == "failed":
            return fail(OSError(errno.EIO, f"{self._name}: the server's disk changed size"))
        if self._state != "connected":
            return fail(
                OSError(errno.ENOTCONN, f"{self._name}: {what}: not connected ({self._state})")
            )
        if kind == "write" and (self.read_only or self._server_read_only):
            return fail(OSError(errno.EROFS, f"{os.strerror(errno.EROFS)} ({self._name})"))
        if offset < 0 or length < 0 or offset + length > self.size:
            return fail(OSError(errno.EINVAL, f"{self._name}: {what} is off the disk"))
        return succeed(empty)  # nothing to read or write

    def _submit(
        self, what: tuple[str, int, int], buffer: Any, issue: Callable[..., Any], *args: Any
    ) -> Deferred[Any]:
        """Give libnbd one command: ``issue(*args, completion=...)``."""
        request = _Request(what, buffer, self._reactor.seconds() + self.timeout, self._answers)
        done = self._done

        def completed(error: Any) -> int:
            # Runs under libnbd's handle lock: record, do nothing else.
            done.append((request, error.value))
            return 1

        # Hold the request before libnbd can complete it (possibly inside the call).
        self._holding.add(request)
        self._live[request] = None
        try:
            issue(*args, completion=completed)
        except self._nbd.Error as e:
            self._holding.discard(request)
            del self._live[request]
            request.finished = True
            self._pump()
            text = _describe(what)
            if self._state != "connected":
                return fail(OSError(errno.ENOTCONN, f"{self._name}: {text}: connection lost"))
            return fail(_oserror(e.errnum, f"{self._name}: {text}", _message(e)))
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self.timeout, self._sweep)
        if not self._draining:  # else the pump after the drain re-checks, once for all
            # The common case in short: libnbd sent the command (or queued it and
            # wants to write) and completed nothing; anything else takes the pump.
            direction = self._handle.aio_get_direction()
            link = self._link
            if direction and not self._done and link is not None:
                link.want_write(bool(direction & _WRITE))
            else:
                self._pump()
        return request.deferred

    # -- driving libnbd

    def _adopt(self, handle: Any) -> None:
        """Serve through ``handle``, connected and ready."""
        self._handle = handle
        self._server_read_only = bool(handle.is_read_only())
        self._can_flush = bool(handle.can_flush())
        self._last_error = None
        self._link = _Link(self._reactor, handle, self._ready, self._link_lost, self._name)
        self._state = "connected"
        self._pump()

    def _ready(self, readable: bool) -> None:
        """
        The reactor says the socket is ready: let libnbd read or write, then settle.

        libnbd reads at most one reply per ``aio_notify_read``, and with
        many requests in flight the socket usually holds several: it is
        called again while bytes wait on the socket (``FIONREAD``; never on
        an empty socket, which libnbd does not expect), at most
        ``_REPLIES_PER_TURN`` times, and the Deferreds of the whole burst
        fire together afterwards.  So a burst of answers costs one reactor
        turn, not one turn (an ``epoll_wait`` and the reactor's dispatch)
        per answer.  A failed command ends the loop, so that a connection
        that just died is not asked again and its first error is the one
        kept.
        """
        handle = self._handle
        if handle is None:
            return
        try:
            if readable:
                handle.aio_notify_read()
                link = self._link
                if link is not None:
                    done = self._done
                    notify = handle.aio_notify_read
                    unread = link.unread
                    for _ in range(_REPLIES_PER_TURN - 1):
                        if (done and done[-1][1]) or not unread():
                            break
                        notify()
            else:
                handle.aio_notify_write()
        except self._nbd.Error as e:
            self._last_error = _message(e)
        self._pump()

    def _pump(self) -> None:
        """
        After any libnbd call: settle what it completed, then follow its
        direction (submissions made while settling included) or notice that
        the connection died.
        """
        handle = self._handle
        if handle is not None and handle.aio_get_direction() == 0 and _dead(handle):
            # Before settling anything: libnbd fails the commands it had in flight
            # when the connection dies; their callbacks must see the disk
            # reconnecting, and the "connection lost" line must count them.
            self._drop(self._last_error or "the server closed the connection")
            return
        if self._done or self._state == "closing":
            self._drain()
        handle = self._handle
        if handle is not None:
            direction = handle.aio_get_direction()
            if direction == 0 and _dead(handle):
                self._drop(self._last_error or "the server closed the connection")
            elif self._link is not None:
                self._link.want_write(bool(direction & _WRITE))

    def _drain(self, now: bool = False) -> None:
        """
        Fire the Deferreds of the commands libnbd completed (never under its lock).

        A callback chain that submits again lands here again: the outer loop
        picks up what it added, unless ``now`` (a dropped connection, whose
        requests must all be settled before anything else happens).
        """
        if self._draining and not now:
            return
        outer = self._draining
        self._draining = True
        try:
            done = self._done
            while done:
                request, error = done.popleft()
                self._settle(request, error)
        finally:
            self._draining = outer
        if self._state == "closing":
            self._maybe_disconnect()

    def _settle(self, request: _Request, error: int) -> None:
        if request.finished:
            return
        request.finished = True
        self._answers += 1
        self._holding.discard(request)
        self._live.pop(request, None)
        buffer, request.buffer = request.buffer, None  # released here, not before
        if request.expired or request.deferred.called:
            return
        if error:
            request.deferred.errback(_oserror(error, f"{self._name}: {_describe(request.what)}"))
        elif isinstance(buffer, bytearray):
            request.deferred.callback(bytes(buffer))
        else:
            request.deferred.callback(None)

    def _link_lost(self) -> None:
        """The reactor dropped our descriptor (hang-up, or it is stopping): drop the connection."""
        self._link = None
        self._drop("the reactor reported the connection lost")

    def _drop(self, why: str) -> None:
        """
        Let go of the handle: fail whatever libnbd did not complete, then
        reconnect (or finish closing).
        """
        if self._link is not None:
            self._link.stop()
            self._link = None
        handle, self._handle = self._handle, None
        # Unsettled requests, less those libnbd completed well just before the end.
        failed = len(self._live) - sum(1 for _, error in self._done if not error)
        for request in list(self._holding):
            self._done.append((request, errno.ENOTCONN))
        del handle  # the last reference: libnbd closes it and forgets the buffers
        if self._state == "connected":
            self._state = "reconnecting"
            self._down_since = self._reactor.seconds()
            self._attempts = 0
            self._backoff = _BACKOFF_FIRST
            _log.warn(
                "{name}: connection lost ({why}); {failed} requests in flight failed",
                name=self._name,
                why=why,
                failed=failed,
            )
            _log.info(
                "{name}: reconnecting, every {first} s doubling to {most} s",
                name=self._name,
                first=_BACKOFF_FIRST,
                most=_BACKOFF_MAX,
            )
            self._retry = self._reactor.callLater(self._backoff, self._redial)
        self._drain(now=True)

    # -- reconnecting

    def _redial(self) -> None:
        self._retry = None
        self._attempts += 1
        self._dialer = _Dialer(self._nbd, self._reactor, self.address, self.connect_timeout)
        self._dialer.dial().addCallbacks(self._redialed, self._redial_failed)

    def _redialed(self, handle: Any) -> None:
        self._dialer = None
        if self._state != "reconnecting":
            return  # closed meanwhile; dropping the handle closes it
        size = handle.get_size()
        if size != self.size:
            self._state = "failed"
            _log.error(
                "{name}: the server came back with {size} bytes instead of {was}; "
                "the disk stays failed",
                name=self._name,
                size=size,
                was=self.size,
            )
            return
        self._adopt(handle)
        _log.info(
            "{name}: reconnected after {attempts} attempts, {down:.1f} s down{mode}",
            name=self._name,
            attempts=self._attempts,
            down=self._reactor.seconds() - self._down_since,
            mode="; the server now exports it read-only"
            if self._server_read_only and not self.read_only
            else "",
        )

    def _redial_failed(self, f: Failure) -> None:
        self._dialer = None
        if self._state != "reconnecting":
            return
        _log.debug("{name}: reconnect failed: {why}", name=self._name, why=f.getErrorMessage())
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        self._retry = self._reactor.callLater(self._backoff, self._redial)

    # -- deadlines

    def _sweep(self) -> None:
        """
        Fail every request past its deadline with ``ETIMEDOUT``; wake again for the next.

        First drop the connection if it stalled (nothing answered since an
        expired request was sent) or holds too many expired requests, so
        that whoever hears ``ETIMEDOUT`` sees the state that follows from it.
        """
        self._sweeper = None
        now = self._reactor.seconds()
        live = self._live
        expired: list[_Request] = []
        stalled = False
        while live:
            request = next(iter(live))
            if request.deadline > now + _SWEEP_SLACK:
                break
            del live[request]
            request.expired = True  # keeps its buffer until libnbd lets go
            expired.append(request)
            stalled = stalled or request.answers == self._answers
        if expired and self._state == "connected":
            held = len(self._holding) - len(live)
            if stalled:
                self._drop(f"nothing answered in {self.timeout:g} s")
            elif held > self.max_expired:
                self._drop(f"{held} requests the server left unanswered")
        for request in expired:
            if not request.deferred.called:
                request.deferred.errback(
                    OSError(
                        errno.ETIMEDOUT,
                        f"no answer in {self.timeout:g} s "
                        f"({self._name}: {_describe(request.what)})",
                    )
                )
            self._log_timeout(request, now)
        if live and self._sweeper is None:
            oldest = next(iter(live))
            self._sweeper = self._reactor.callLater(max(0.0, oldest.deadline - now), self._sweep)
        if expired and self._state == "closing":
            self._maybe_disconnect()

    def _log_timeout(self, request: _Request, now: float) -> None:
        """One line for the first timeout, then at most one per ten seconds with a count."""
        last = self._timeout_logged_at
        if last is not None and now - last < _TIMEOUT_LOG_INTERVAL:
            self._timeouts_unlogged += 1
            return
        more = self._timeouts_unlogged
        self._timeouts_unlogged = 0
        self._timeout_logged_at = now
        _log.warn(
            "{name}: {what} not answered in {timeout} s, failed (ETIMEDOUT){more}",
            name=self._name,
            what=_describe(request.what),
            timeout=self.timeout,
            more=f"; {more} more since the last such line" if more else "",
        )

    # -- closing

    def _maybe_disconnect(self) -> None:
        """While closing: once no request waits, disconnect (or drop) and fire."""
        if self._live or self._closing is None:
            return
        handle = self._handle
        if handle is None:
            self._closed()
            return
        if self._holding:
            self._drop("closed with expired commands still at the server")
            self._closed()
            return
        if self._close_timer is not None:
            return  # already disconnecting
        try:
            handle.aio_disconnect(0)
        except self._nbd.Error:
            self._drop("closed")
            self._closed()
            return
        self._close_timer = self._reactor.callLater(_CLOSE_TIMEOUT, self._close_timed_out)
        self._pump()  # its _drop (the server closes) calls _closed

    def _close_timed_out(self) -> None:
        self._close_timer = None
        self._drop("the server did not close the connection")
        self._closed()

    def _closed(self) -> None:
        if self._state == "closed":
            return
        if self._handle is not None:
            self._drop("closed")
        self._state = "closed"
        for call in (self._close_timer, self._sweeper, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._close_timer = self._sweeper = self._retry = None
        _log.info("{name}: closed", name=self._name)
        assert self._closing is not None
        self._closing.callback(None)


def _chain(d: Deferred[None]) -> Deferred[None]:
    """Return a new Deferred that fires when ``d`` does, leaving ``d``'s result alone."""
    out: Deferred[None] = Deferred()
    if d.called:
        out.callback(None)
    else:
        d.addBoth(lambda result: (out.callback(None), result)[1])
    return out


@implementer(IBackendFactory, IPlugin)
class NBDBackendFactory:
    """
    Opens ``nbd:unix:PATH[:EXPORT]`` and ``nbd:HOST:PORT[:EXPORT]``.

    ``open_async`` connects through the reactor (what the server should
    use); ``open`` connects blocking, before the reactor runs, for callers of
    the synchronous ``IBackendFactory.open``.  Both give an ``NBDBackend``,
    which is asynchronous (``IAsyncBlockBackend``) either way.

    @ivar timeout: the per-request deadline of the backends it opens (s).
    @ivar connect_timeout: how long opening may take (s).
    """

    scheme = "nbd"
    spec_format = _SPEC_FORMAT
    description = (
        "a disk an NBD server exports (qemu-nbd, nbdkit, nbd-server), through libnbd; "
        "needs python3-libnbd"
    )

    def __init__(
        self, timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def open(self, spec: str, read_only: bool = False) -> NBDBackend:
        """
        Connect to the export ``spec`` names, blocking (at most ``connect_timeout``).

        @raise BackendSpecError: one line: a bad spec, python3-libnbd
            missing, or no connection.
        """
        address = NBDAddress.parse(spec)
        _import_nbd()
        return NBDBackend.open(
            address,
            read_only=read_only,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
        )

    def open_async(
        self, spec: str, read_only: bool = False, reactor: Any = None
    ) -> Deferred[NBDBackend]:
        """
        Connect to the export ``spec`` names through the reactor; fire with the backend.

        Fails with ``BackendSpecError`` (one line) as ``open`` raises it.
        """
        try:
            address = NBDAddress.parse(spec)
        except BackendSpecError:
            return fail()
        return NBDBackend.connect(
            address,
            read_only=read_only,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            reactor=reactor,
        )
