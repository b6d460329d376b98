# -*- test-case-name: tests.test_rbd -*-
"""
``rbd:POOL/IMAGE``: a Ceph RBD image, read and written through librbd's asynchronous calls.

The spec (what follows ``rbd:``)::

    POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][,conf=PATH][,id=NAME][,namespace=NS][,timeout=SECONDS]

- ``POOL/IMAGE`` names the image as the ``rbd`` command does, with an
  optional RADOS namespace in the middle (or as ``namespace=NS``, not both).
  A name cannot hold ``,``, ``/`` or ``@``.
- ``@SNAPSHOT`` serves that snapshot, always read-only.
- ``conf=PATH``: the cluster's configuration file (monitors, keyring);
  without it librados looks where it always does: ``$CEPH_CONF``,
  ``/etc/ceph/ceph.conf``, ``~/.ceph/config``, ``./ceph.conf``.
- ``id=NAME``: the client to connect as, ``client.NAME`` (default ``admin``).
- ``timeout=SECONDS``: how long one request may take before it fails with
  ``ETIMEDOUT`` (and a log line), and how long connecting may take (default
  30).  A request that times out is forgotten by the server, not by librbd:
  its buffer lives on until librbd answers, late, and that answer is
  dropped.

Examples: ``rbd:rbd/disk0``, ``rbd:rbd/disk0@gold,conf=/etc/ceph/ceph.conf,id=aoe``,
``rbd:rbd/tenant1/disk0``.

How it works.  ``RBDBackend`` provides the asynchronous backend contract
(``read``, ``write``, ``flush`` and ``close`` return Deferreds that fire in
the reactor thread): each request is a librbd ``aio_read``, ``aio_write`` or
``aio_flush``, whose completion librbd reports on a thread of its own; the
callback only notes the result and wakes the reactor
(``reactor.callFromThread``, once per batch of completions), where the
Deferred fires.  A write's Deferred fires only once librbd reports it done,
that is once the OSDs have it: librbd's cache is switched off
(``rbd_cache = false``, set before connecting, so a ``ceph.conf`` cannot
turn it on), so nothing is held back in this process, ``flush`` (``aio_flush``)
is cheap, and two gateways on two hosts can serve one image at once.
Requests complete in any order; as with a disk, nothing orders two requests
in flight together.

Opening connects to the cluster and opens the image, which blocks (up to
``timeout``): ``open_async`` does it in a thread of the reactor's pool and
gives a Deferred; ``open_rbd`` does it in the calling thread (before the
reactor runs, or in a thread of one's own).  Both raise, or fail with,
``BackendSpecError`` carrying one line that names the problem.

Identity (``disk_identity``): the cluster's fsid, the pool's id, the
namespace, the image's id (``Image.id()``, which survives renames) and the
snapshot's id; so every gateway of the image presents one identity, and a
snapshot, or an image recreated under the same name, another.  Should the
pool or the image turn librbd's cache back on (``rbd config image set ...
rbd_cache true``), the identity becomes local to this host
(``identity.host_local``): one host's cache is not coherent with another's.

python3-rbd and python3-rados are Debian packages for ``/usr/bin/python3``
(not on PyPI): the modules are imported only when an image is opened, and a
missing one gives one line saying which package to install.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import deque
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from aoe_twisted.backends.identity import host_local
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import IAsyncBlockBackend, IDiskIdentity
from aoe_twisted.units import check_disk_size

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_TIMEOUT",
    "DESCRIPTION",
    "SPEC_FORMAT",
    "RBDBackend",
    "RBDSpec",
    "open_async",
    "open_rbd",
    "parse_spec",
]

DEFAULT_TIMEOUT = 30.0
"""Seconds a request, or connecting, may take by default (``timeout=``)."""

DEFAULT_CLIENT_ID = "admin"
"""The Ceph client (``client.admin``) used without ``id=``."""

SPEC_FORMAT = "POOL/[NAMESPACE/]IMAGE[@SNAP][,conf=PATH][,id=NAME][,namespace=NS][,timeout=SECS]"
"""What follows ``rbd:``, for ``--help``."""

DESCRIPTION = "a Ceph RBD image (a snapshot is read-only), through librbd with its cache off"
"""One line for ``--help-backends``."""

_MISSING_MODULE = "rbd: backend needs python3-rbd (apt-get install python3-rbd)"
_OPTIONS = ("conf", "id", "namespace", "timeout")
_log = Logger()


@frozen
class RBDSpec:
    """
    What an ``rbd:`` spec names: the image, and how to reach its cluster.

    ``conf`` is ``None`` for librados' default search; ``namespace`` is
    ``""`` for the pool's default namespace; ``snapshot`` is ``None`` for
    the image itself.
    """

    pool: str
    image: str
    snapshot: str | None = None
    namespace: str = ""
    conf: str | None = None
    client_id: str = DEFAULT_CLIENT_ID
    timeout: float = DEFAULT_TIMEOUT

    @property
    def name(self) -> str:
        """The image as the ``rbd`` command names it: ``POOL/[NS/]IMAGE[@SNAP]``."""
        path = "/".join(p for p in (self.pool, self.namespace, self.image) if p)
        return f"{path}@{self.snapshot}" if self.snapshot is not None else path


def parse_spec(spec: str) -> RBDSpec:
    """
    Read an ``rbd:`` spec (the text after ``rbd:``); see the module docstring.

    @raise BackendSpecError: with one line quoting ``spec`` and naming what
        is wrong.
    """

    quoted = spec if spec.isprintable() else spec.encode("unicode_escape").decode("ascii")

    def bad(problem: str) -> BackendSpecError:
        return BackendSpecError(f"rbd:{quoted}: {problem}")

    image_part, *option_parts = spec.split(",")
    path, at, snapshot = image_part.partition("@")
    if at and not snapshot:
        raise bad("nothing after '@'; expected POOL/IMAGE@SNAPSHOT")
    if "@" in snapshot:
        raise bad("more than one '@'; expected POOL/IMAGE@SNAPSHOT")
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise bad(f"{path!r} is not POOL/IMAGE or POOL/NAMESPACE/IMAGE")
    pool, image = parts[0], parts[-1]
    namespace = parts[1] if len(parts) == 3 else None
    options: dict[str, str] = {}
    for part in option_parts:
        key, equals, value = part.partition("=")
        if key not in _OPTIONS:
            raise bad(f"unknown option {key!r}; known: {', '.join(_OPTIONS)} (KEY=VALUE)")
        if not equals or not value:
            raise bad(f"option {key!r} needs a value: {key}=VALUE")
        if key in options:
            raise bad(f"option {key!r} given twice")
        options[key] = value
    if "namespace" in options:
        if namespace is not None:
            raise bad("namespace given twice (POOL/NAMESPACE/IMAGE and namespace=)")
        namespace = options["namespace"]
    timeout = DEFAULT_TIMEOUT
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < float("inf"):
            raise bad(f"timeout={options['timeout']} is not a positive number of seconds")
    client_id = options.get("id", DEFAULT_CLIENT_ID).removeprefix("client.")
    if not client_id:
        raise bad("option 'id' needs a client name, e.g. id=admin")
    return RBDSpec(
        pool=pool,
        image=image,
        snapshot=snapshot if at else None,
        namespace=namespace or "",
        conf=options.get("conf"),
        client_id=client_id,
        timeout=timeout,
    )


def _modules() -> tuple[Any, Any]:
    """Import and return ``(rados, rbd)``; ``BackendSpecError`` in one line if missing."""
    try:
        import rados
        import rbd
    except ImportError:
        raise BackendSpecError(_MISSING_MODULE) from None
    return rados, rbd


def _reason(e: BaseException) -> str:
    """Return a librados/librbd error's reason without its ``[errno N]`` prefix."""
    text = str(e)
    if text.startswith("[errno"):
        text = text.partition("]")[2].strip()
    return text or type(e).__name__


@frozen
class _Opened:
    """What connecting and opening produced, handed from the opening thread to the backend."""

    spec: RBDSpec
    cluster: Any
    ioctx: Any
    image: Any
    size: int
    read_only: bool
    identity: bytes
    cache_on: bool


def _open_blocking(spec: RBDSpec, read_only: bool) -> _Opened:
    """Connect to the cluster and open the image (blocks); ``BackendSpecError`` on failure."""
    rados, rbd = _modules()
    where = f"rbd:{spec.name}"
    if spec.conf is not None and not os.path.isfile(spec.conf):
        raise BackendSpecError(f"{where}: conf file {spec.conf} does not exist")
    try:
        cluster = rados.Rados(conffile=spec.conf or "", rados_id=spec.client_id)
    except rados.Error as e:
        if spec.conf is None:
            raise BackendSpecError(
                f"{where}: no Ceph configuration found ($CEPH_CONF, /etc/ceph/ceph.conf, "
                "~/.ceph/config, ./ceph.conf); name one with conf=PATH"
            ) from None
        raise BackendSpecError(f"{where}: cannot read {spec.conf}: {_reason(e)}") from None
    ioctx = image = None
    try:
        cluster.conf_set("rbd_cache", "false")
        cluster.conf_set("client_mount_timeout", str(max(1, round(spec.timeout))))
        try:
            cluster.connect()
        except rados.Error as e:
            raise BackendSpecError(
                f"{where}: cannot connect to the cluster as client.{spec.client_id}: {_reason(e)}"
            ) from None
        try:
            ioctx = cluster.open_ioctx(spec.pool)
        except rados.ObjectNotFound:
            raise BackendSpecError(f"{where}: pool {spec.pool!r} does not exist") from None
        if spec.namespace:
            if not rbd.RBD().namespace_exists(ioctx, spec.namespace):
                raise BackendSpecError(
                    f"{where}: namespace {spec.namespace!r} does not exist in pool {spec.pool!r}"
                )
            ioctx.set_namespace(spec.namespace)
        read_only = read_only or spec.snapshot is not None
        image = _open_image(rbd, ioctx, spec, read_only, where)
        size = check_disk_size(image.size(), where)
        snap = "head" if spec.snapshot is None else f"{image.snap_get_id(spec.snapshot)}"
        identity = (
            f"rbd fsid={cluster.get_fsid()} pool={ioctx.get_pool_id()} "
            f"namespace={spec.namespace} image={image.id()} snap={snap}"
        ).encode()
        cache_on = _cache_on(image)
        if cache_on:
            identity = host_local(identity)
        return _Opened(spec, cluster, ioctx, image, size, read_only, identity, cache_on)
    except BaseException as e:
        for thing in (image, ioctx):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()
        cluster.shutdown()
        if isinstance(e, (rados.Error, rbd.Error)):
            raise BackendSpecError(f"{where}: {_reason(e)}") from None
        raise


def _open_image(rbd: Any, ioctx: Any, spec: RBDSpec, read_only: bool, where: str) -> Any:
    """Open the image (at the snapshot, if any); one-line errors for what is missing."""
    try:
        return rbd.Image(ioctx, spec.image, snapshot=spec.snapshot, read_only=read_only)
    except rbd.ImageNotFound:
        if spec.snapshot is None:
            raise BackendSpecError(f"{where}: image {spec.image!r} does not exist") from None
    # The image or its snapshot is missing: say which.
    try:
        rbd.Image(ioctx, spec.image, read_only=True).close()
    except rbd.ImageNotFound:
        raise BackendSpecError(f"{where}: image {spec.image!r} does not exist") from None
    raise BackendSpecError(
        f"{where}: image {spec.image!r} has no snapshot {spec.snapshot!r}"
    )


def _cache_on(image: Any) -> bool:
    """Return whether librbd's cache is on for ``image`` after pool and image overrides."""
    for option in image.config_list():
        if option["name"] == "rbd_cache":
            return option["value"] == "true"
    return False


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def open_rbd(spec: str, read_only: bool = False, reactor: Any = None) -> RBDBackend:
    """
    Connect and open the image ``spec`` names, in this thread (it blocks); return the backend.

    @param read_only: open the image read-only (a snapshot always is).
    @param reactor: where the backend's Deferreds fire (``IReactorThreads``
        and ``IReactorTime``); the global reactor by default.
    @raise BackendSpecError: one line naming the problem: a bad spec, a
        missing module, no cluster, no pool, image or snapshot.
    """
    parsed = parse_spec(spec)
    return RBDBackend(_open_blocking(parsed, read_only), reactor or _default_reactor())


def open_async(spec: str, read_only: bool = False, reactor: Any = None) -> Deferred[RBDBackend]:
    """
    As ``open_rbd``, but connect and open in a thread of ``reactor``'s pool.

    Returns a Deferred that fires, in the reactor thread, with the
    ``RBDBackend``, or fails with ``BackendSpecError`` (at once for a bad
    spec or a missing module).  Connecting takes at most the spec's
    ``timeout``.
    """
    reactor = reactor or _default_reactor()
    try:
        parsed = parse_spec(spec)
        _modules()
    except BackendSpecError:
        return fail()
    d = deferToThreadPool(reactor, reactor.getThreadPool(), _open_blocking, parsed, read_only)
    d.addCallback(RBDBackend, reactor)
    return d


class _Request:
    """One request in flight: its Deferred, its deadline, and what its completion needs."""

    __slots__ = ("backend", "data", "deadline", "deferred", "kind", "length", "offset")

    def __init__(
        self, backend: RBDBackend, kind: str, offset: int, length: int, data: bytes | None
    ) -> None:
        self.backend = backend
        self.kind = kind
        self.offset = offset
        self.length = length
        # Written data stays referenced until librbd answers (it may read it until then).
        self.data = data
        self.deferred: Deferred[Any] = Deferred()
        self.deadline = 0.0

    # librbd calls these on one of its threads: note the result, wake the reactor, no more.

    def read_done(self, completion: Any, data: bytes | None) -> None:
        """``aio_read``'s callback: ``data`` is what was read (``None`` on failure)."""
        self.backend._completed(self, completion.get_return_value(), data)

    def done(self, completion: Any) -> None:
        """``aio_write``'s and ``aio_flush``'s callback."""
        self.backend._completed(self, completion.get_return_value(), None)


@implementer(IAsyncBlockBackend, IDiskIdentity)
class RBDBackend:
    """
    An open RBD image served through librbd's asynchronous calls (``open_rbd``, ``open_async``).

    ``size`` (bytes, a whole number of sectors) and ``read_only`` are fixed
    while it is open.  ``read``/``write``/``flush``/``close`` return
    Deferreds that fire in the reactor thread; failures are ``OSError`` with
    ``errno`` set: the error librbd reported (``EIO``, ``ENOSPC``,
    ``EBLOCKLISTED``...), ``ETIMEDOUT`` after the spec's ``timeout``,
    ``EROFS`` for a write to a read-only image, ``EINVAL`` for a range
    outside the image, ``ENOTCONN`` after ``close``.
    """

    def __init__(self, opened: _Opened, reactor: Any) -> None:
        self.spec = opened.spec
        self.size = opened.size
        self.read_only = opened.read_only
        self.timeout = opened.spec.timeout
        self._identity = opened.identity
        self._cluster = opened.cluster
        self._ioctx = opened.ioctx
        self._image = opened.image
        self._reactor = reactor
        self._where = f"rbd:{opened.spec.name}"
        self._pending: dict[int, _Request] = {}
        self._done: deque[tuple[_Request, int, bytes | None]] = deque()
        self._wake_scheduled = False
        self._timer: Any = None
        self._state = "open"  # then "closing", then "closed"
        self._close_waiters: list[Deferred[None]] = []
        if opened.cache_on:
            _log.warn(
                "{where}: librbd's cache is on for this image (a pool or image setting), so "
                "its identity is local to this host: no other host serves it as a second path",
                where=self._where,
            )

    def __repr__(self) -> str:
        return f"<RBDBackend {self._where} size={self.size} read_only={self.read_only}>"

    @property
    def in_flight(self) -> int:
        """How many requests librbd has not answered yet (timed out ones excluded)."""
        return len(self._pending)

    def disk_identity(self) -> bytes:
        """Return this image's identity: cluster fsid, pool, namespace, image id and snapshot."""
        return self._identity

    # -- requests ---------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        """Read ``length`` bytes at ``offset``; the Deferred fires with exactly that many."""
        refused = self._refuse(offset, length, write=False)
        if refused is not None:
            return refused
        request = _Request(self, "read", offset, length, None)
        return self._submit(request, self._image.aio_read, offset, length, request.read_done)

    def write(self, offset: int, data: bytes) -> Deferred[None]:
        """Write ``data`` (any bytes-like) at ``offset``; fires once librbd reports it done."""
        if type(data) is not bytes:
            data = bytes(data)
        refused = self._refuse(offset, len(data), write=True)
        if refused is not None:
            return refused
        request = _Request(self, "write", offset, len(data), data)
        return self._submit(request, self._image.aio_write, data, offset, request.done)

    def flush(self) -> Deferred[None]:
        """Make every completed write durable (``aio_flush``; cheap with librbd's cache off)."""
        if self._state != "open":
            return fail(OSError(errno.ENOTCONN, f"{self._where} is closed"))
        if self.read_only:
            return succeed(None)
        request = _Request(self, "flush", 0, 0, None)
        return self._submit(request, self._image.aio_flush, request.done)

    def _refuse(self, offset: int, length: int, write: bool) -> Deferred[Any] | None:
        """Return a failed Deferred if this request cannot be sent, else ``None``."""
        if self._state != "open":
            return fail(OSError(errno.ENOTCONN, f"{self._where} is closed"))
        if write and self.read_only:
            return fail(OSError(errno.EROFS, f"{self._where} is read-only"))
        if offset < 0 or length < 0 or offset + length > self.size:
            return fail(
                OSError(
                    errno.EINVAL,
                    f"byte range {offset}+{length} lies outside {self._where} "
                    f"({self.size} bytes)",
                )
            )
        return None

    def _submit(self, request: _Request, call: Any, *args: Any) -> Deferred[Any]:
        """Register ``request`` (librbd may answer before ``call`` returns), then send it."""
        now = self._reactor.seconds()
        request.deadline = now + self.timeout
        self._pending[id(request)] = request
        try:
            call(*args)
        except Exception as e:
            del self._pending[id(request)]
            return fail(OSError(getattr(e, "errno", None) or errno.EIO, f"{self._where}: {e}"))
        if self._timer is None:
            self._timer = self._reactor.callLater(self.timeout, self._expire)
        return request.deferred

    # -- completions ------------------------------------------------------------------------

    def _completed(self, request: _Request, result: int, data: bytes | None) -> None:
        """
        Note a completion (on a librbd thread) and make sure the reactor will deliver it.

        The reactor is woken only if no delivery is already scheduled, so a
        burst of completions costs one wake-up.  The flag is cleared before
        the queue is emptied, so a completion noted after the last look
        schedules a delivery of its own.
        """
        self._done.append((request, result, data))
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        """Fire the Deferreds of every noted completion (reactor thread)."""
        self._wake_scheduled = False
        done = self._done
        while done:
            request, result, data = done.popleft()
            if self._pending.pop(id(request), None) is None:
                _log.debug(
                    "{where}: late answer to a timed-out {kind}", where=self._where,
                    kind=request.kind,
                )
                continue
            if result < 0:
                request.deferred.errback(
                    OSError(-result, f"{self._where}: {request.kind} at {request.offset}: "
                            f"{os.strerror(-result)}")
                )
            elif request.kind == "read":
                if data is None or len(data) != request.length:
                    got = 0 if data is None else len(data)
                    request.deferred.errback(
                        OSError(errno.EIO, f"{self._where}: short read at {request.offset}: "
                                f"{got} of {request.length} bytes")
                    )
                else:
                    request.deferred.callback(data)
            else:
                request.deferred.callback(None)

    def _expire(self) -> None:
        """Fail every request past its deadline with ``ETIMEDOUT``; re-arm for the oldest left."""
        self._timer = None
        now = self._reactor.seconds()
        expired = []
        for key, request in self._pending.items():
            if request.deadline > now:
                self._timer = self._reactor.callLater(request.deadline - now, self._expire)
                break
            expired.append(key)
        for key in expired:
            request = self._pending.pop(key)
            _log.warn(
                "{where}: {kind} at byte {offset} ({length} bytes) had no answer from the "
                "cluster in {timeout} s; failed with ETIMEDOUT",
                where=self._where, kind=request.kind, offset=request.offset,
                length=request.length, timeout=self.timeout,
            )
            request.deferred.errback(
                OSError(errno.ETIMEDOUT, f"{self._where}: {request.kind} at {request.offset}: "
                        f"no answer in {self.timeout} s")
            )

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """
        Close the image, the pool's context and the connection, in a thread; fire when done.

        Requests still in flight are answered first (librbd waits for them);
        any left unanswered then (none, unless the cluster vanished) fail
        with ``ENOTCONN``.  The thread is a daemon thread of its own, not
        the reactor's pool, so a cluster that never answers cannot hold up
        the process's exit.  Every call returns a Deferred that fires once
        all is closed; requests made after the first fail with ``ENOTCONN``.
        """
        waiter: Deferred[None] = Deferred()
        if self._state == "closed":
            waiter.callback(None)
            return waiter
        self._close_waiters.append(waiter)
        if self._state == "closing":
            return waiter
        self._state = "closing"
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        image, ioctx, cluster = self._image, self._ioctx, self._cluster

        def close_all() -> None:
            error: BaseException | None = None
            for step in (image.close, ioctx.close, cluster.shutdown):
                try:
                    step()
                except Exception as e:
                    error = error or e
            self._reactor.callFromThread(self._closed, error)

        threading.Thread(target=close_all, name=f"close {self._where}", daemon=True).start()
        return waiter

    def _closed(self, error: BaseException | None) -> None:
        """Fail what librbd never answered, log a failure to close, fire ``close``'s Deferreds."""
        self._deliver()
        self._state = "closed"
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.deferred.errback(
                OSError(errno.ENOTCONN, f"{self._where}: closed before {request.kind} completed")
            )
        if error is not None:
            _log.warn("{where}: closing: {error}", where=self._where, error=_reason(error))
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)
