# -*- test-case-name: tests.test_control -*-
"""
The listening side of the control socket: a UNIX socket speaking AMP to ``aoe-twisted ctl``.

``ControlServer`` is a service that listens on a path and answers the
commands of ``aoe_twisted.control.commands`` by calling an ``IController``
(the AoE server, which knows its targets).  What it owns is the socket and
who may use it:

- the parent directory is created (mode 0755) if missing; a stale socket
  file (one nobody listens on) is replaced; a live one, or a path that is not
  a socket, is refused (``ControlSocketError``, one line);
- the socket is mode 0600, owned by the server's user, or 0660 with group
  ``group``;
- every peer's credentials are read with ``SO_PEERCRED``: root, the
  server's own user and (with ``group``) members of that group may send
  commands.  Anybody else gets one warning line in the log, and its first
  command is answered with ``PermissionDenied`` ("permission denied: uid
  65534 is not allowed on PATH"), after which the connection is closed;
- a peer that sends something other than AMP (or AMP nobody can parse)
  loses its connection, with one log line; the others are not affected.

Under ``twistd --uid``, the socket is made in ``privilegedStartService``
(still root, so it may be under ``/run``) and handed to the user given as
``owner``, which is also allowed to connect.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, tcp, unix
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import Interface
from zope.interface.verify import verifyObject

from aoe_twisted.control.commands import (
    BAD_REQUEST,
    INTERNAL_ERROR,
    PERMISSION_DENIED,
    Add,
    ControlError,
    Initiators,
    InternalError,
    List,
    Reload,
    Remove,
    Set,
    Stats,
)

__all__ = [
    "REFUSED_GRACE",
    "ControlError",
    "ControlServer",
    "ControlSocketError",
    "IController",
    "peer_credentials",
    "peer_groups",
]

_log = Logger()

#: Seconds a refused peer has to send a command (and read why it is refused) before it is cut off.
REFUSED_GRACE = 5.0
#: ``struct ucred``: pid, uid, gid.
_UCRED = struct.Struct("3i")


class ControlSocketError(Exception):
    """The control socket cannot be set up: ``str`` is one line naming the path and the problem."""


class IController(Interface):
    """
    What the AoE server does for the control socket's commands.

    Every method may return its value or a ``Deferred`` of it.  A command
    that cannot be done raises (or fails with) ``ControlError`` whose text is
    one line for the user; any other exception is a bug: it is logged with
    its traceback and ``ctl`` reports an internal error.  Listing and
    snapshot formats are those of docs/operations.md.
    """

    def targets() -> Any:
        """Return the served targets: a list of target listing dicts."""

    def stats() -> Any:
        """Return the stats snapshot dict (summed over ``--workers`` processes)."""

    def add(target: str, settings: list[str]) -> Any:  # noqa: N805
        """
        Start serving a target and return its listing dict.

        ``target`` is ``ADDRESS=SCHEME:SPEC[,key=value...]`` (as ``--target``);
        ``settings`` are more per-target options as ``KEY=VALUE`` strings.
        """

    def remove(address: str) -> Any:  # noqa: N805
        """Stop serving the target at ``address`` (``e1.0`` or ``1.0``) and return its listing."""

    def set(address: str, settings: list[str]) -> Any:  # noqa: N805
        """
        Change a served target's options and return its new listing.

        ``settings`` are ``KEY=VALUE`` strings: ``read_only=on``,
        ``mask=MAC`` (repeatable; ``mask=`` empties the list),
        ``config_string=...``, ``buffer_count=N``, ``max_sectors=N``.
        """

    def reload() -> Any:
        """
        Re-read the config file, apply the difference and report it.

        Return ``{"added": [...], "removed": [...], "changed": [...],
        "unchanged": N, "message": "one line"}``; a broken file changes
        nothing and raises ``ControlError``.
        """


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """Return the ``(pid, uid, gid)`` of the process at the other end of UNIX socket ``sock``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


#: ``SO_PEERGROUPS`` (Linux 4.13): the peer's supplementary groups, as the kernel saw them.
_SO_PEERGROUPS = 59
_GROUP = struct.Struct("I")


def peer_groups(sock: socket.socket) -> set[int] | None:
    """The supplementary groups of the peer of ``sock`` (``None``: unknown, or over 256)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
    except OSError:
        return None
    return {group for (group,) in _GROUP.iter_unpack(raw[: len(raw) - len(raw) % _GROUP.size])}


def _supplementary_groups(pid: int) -> set[int]:
    """Return the supplementary groups of process ``pid`` (none if it cannot be read)."""
    if pid <= 0:
        return set()
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(gid) for gid in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def _group_id(group: str | int) -> tuple[int, str]:
    """Return the gid and name of ``group`` (a name or a number)."""
    try:
        entry = grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)
    except KeyError:
        if isinstance(group, str) and group.isdigit():
            return _group_id(int(group))
        raise ControlSocketError(f"control socket: no such group: {group}") from None
    return entry.gr_gid, entry.gr_name


class _ControlPort(unix.Port):
    """A listening UNIX port that removes its socket file only if it is still its own."""

    def __init__(self, server: ControlServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._server = server

    def connectionLost(self, reason: Failure) -> None:
        # unix.Port unlinks the path whatever is there now, and raises if it cannot
        # (after twistd --uid, or if another server replaced the file).
        self._server._remove_socket_file()
        tcp.Port.connectionLost(self, reason)


class ControlServer(service.Service):
    """
    Listen on the UNIX socket ``path`` and answer control commands with ``controller``.

    ``group`` (a name or gid) makes the socket mode 0660 with that group and
    lets its members in.  ``owner`` is the ``(uid, gid)`` (``-1`` for "keep")
    the socket and a parent directory made here are given to when this
    process (root) makes them for the user ``twistd --uid`` switches to;
    that uid is allowed too.

    ``listen`` makes the socket (``privilegedStartService`` and
    ``startService`` call it; it does nothing the second time) and raises
    ``ControlSocketError`` if it cannot: call it from ``makeService`` to turn
    that into a one-line exit before ``twistd`` starts.  The controller is
    checked with ``verifyObject(IController, controller)``.
    """

    name = "control"

    def __init__(
        self,
        controller: Any,
        path: str,
        group: str | int | None = None,
        owner: tuple[int, int] | None = None,
        reactor: Any = None,
    ) -> None:
        verifyObject(IController, controller)
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.controller = controller
        self.path = os.path.abspath(path)
        self.reactor = reactor
        self.group: tuple[int, str] | None = None if group is None else _group_id(group)
        self.owner = owner
        self.mode = 0o600 if group is None else 0o660
        self._port: _ControlPort | None = None
        self._identity: tuple[int, int] | None = None
        self._connections: set[_ControlProtocol] = set()

    # -- the service -------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Make the socket now, while ``twistd`` still runs as root."""
        self.listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self.listen()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop listening, remove the socket file and close the open connections.

        The ``Deferred`` fires when the port and every connection are closed.
        """
        super().stopService()
        waits = []
        for connection in list(self._connections):
            waits.append(connection.closed)
            if connection.transport is not None:
                connection.transport.abortConnection()
        port, self._port = self._port, None
        if port is not None:
            waits.append(defer.maybeDeferred(port.stopListening))
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # -- the socket ----------------------------------------------------------------

    def listen(self) -> None:
        """Make the socket and listen (once).  Raise ``ControlSocketError`` if it cannot be made."""
        if self._port is not None:
            return
        self._make_parent()
        self._clear_stale()
        port = _ControlPort(
            self, self.path, _ControlFactory(self), mode=self.mode, reactor=self.reactor
        )
        try:
            port.startListening()
        except CannotListenError as e:
            reason = e.socketError
            text = (reason.strerror if isinstance(reason, OSError) else None) or str(reason)
            raise ControlSocketError(f"cannot listen on {self.path}: {text}") from None
        self._port = port
        try:
            uid = -1 if self.owner is None else self.owner[0]
            gid = -1 if self.owner is None else self.owner[1]
            if self.group is not None:
                gid = self.group[0]
            if (uid, gid) != (-1, -1):
                os.chown(self.path, uid, gid)
            info = os.stat(self.path)
        except OSError as e:
            self._port = None
            port.stopListening()
            whom = f"group {self.group[1]}" if self.group is not None else f"uid {uid}"
            raise ControlSocketError(
                f"cannot give {self.path} to {whom}: {e.strerror}") from None
        self._identity = (info.st_dev, info.st_ino)
        group = f", group {self.group[1]}" if self.group is not None else ""
        _log.info("control socket listening on {path} (mode {mode:04o}{group})",
                  path=self.path, mode=self.mode, group=group)

    def _make_parent(self) -> None:
        """Create the socket's directory (mode 0755, given to ``owner``) if it is missing."""
        parent = os.path.dirname(self.path)
        if os.path.isdir(parent):
            return
        try:
            os.makedirs(parent, mode=0o755)
            os.chmod(parent, 0o755)
            if self.owner is not None and self.owner != (-1, -1):
                os.chown(parent, *self.owner)
        except OSError as e:
            raise ControlSocketError(
                f"cannot create the control socket's directory {parent}: {e.strerror}"
            ) from None

    def _clear_stale(self) -> None:
        """Remove a socket file nobody listens on; refuse a live one or a file of another kind."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ControlSocketError(f"cannot use {self.path}: {e.strerror}") from None
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlSocketError(
                f"{self.path} exists and is not a socket (remove it or choose another path)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            try:
                os.unlink(self.path)
            except OSError as e:
                raise ControlSocketError(
                    f"cannot remove the stale socket {self.path}: {e.strerror}") from None
            _log.info("control socket: removed the stale socket {path}", path=self.path)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ETIMEDOUT) and not isinstance(e, TimeoutError):
                raise ControlSocketError(f"cannot use {self.path}: {e.strerror}") from None
        finally:
            probe.close()
        raise ControlSocketError(f"another server is already listening on {self.path}")

    def _remove_socket_file(self) -> None:
        """Remove the socket file if it is still the one this server made."""
        identity, self._identity = self._identity, None
        try:
            info = os.lstat(self.path)
            if identity == (info.st_dev, info.st_ino):
                os.unlink(self.path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                _log.info("control socket: left {path} behind: {error}",
                          path=self.path, error=e.strerror)

    # -- peers -----------------------------------------------------------------------

    def refusal(
        self, pid: int, uid: int, gid: int, groups: set[int] | None = None
    ) -> str | None:
        """
        Return why the peer ``(pid, uid, gid)`` may not send commands, or ``None`` if it may.

        ``groups`` are its supplementary groups as the kernel gave them
        (``SO_PEERGROUPS``); without them they are read from ``/proc``,
        which a server under ``ProtectProc=invisible`` cannot.
        """
        allowed = {0, os.geteuid()}
        if self.owner is not None and self.owner[0] != -1:
            allowed.add(self.owner[0])
        if uid in allowed:
            return None
        if self.group is not None and (
            gid == self.group[0]
            or self.group[0] in (groups if groups is not None else _supplementary_groups(pid))
        ):
            return None
        return f"permission denied: uid {uid} is not allowed on {self.path}"


class _ControlFactory(Factory):
    """Makes one ``_ControlProtocol`` per connection."""

    noisy = False

    def __init__(self, server: ControlServer) -> None:
        self.server = server

    def logPrefix(self) -> str:
        return "ControlServer"

    def buildProtocol(self, addr: Any) -> _ControlProtocol:
        return _ControlProtocol(self.server)


def _one_line(text: str) -> str:
    """Join the lines of ``text`` (a message for a one-line report)."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


class _ControlProtocol(amp.AMP):
    """One control connection: checks its peer, then answers commands with the controller."""

    def __init__(self, server: ControlServer) -> None:
        super().__init__()
        self._server = server
        self._refused: str | None = None
        self._peer = "an unknown peer"
        self._grace: IDelayedCall | None = None
        self._closing = False
        #: Fires (``None``) when the connection is closed.
        self.closed: defer.Deferred[None] = defer.Deferred()

    # AMP logs two info lines per connection; one ctl command is not worth them.
    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self._server._connections.add(self)
        try:
            pid, uid, gid = peer_credentials(self.transport.getHandle())
        except (OSError, AttributeError) as e:
            self._refuse(f"permission denied: cannot check who is calling on {self._server.path}",
                         f"a peer whose credentials cannot be read ({e})")
            return
        self._peer = f"uid {uid} (pid {pid})"
        refusal = self._server.refusal(pid, uid, gid, peer_groups(self.transport.getHandle()))
        if refusal is not None:
            self._refuse(refusal, f"uid {uid} (pid {pid}), which is not allowed")

    def _refuse(self, message: str, who: str) -> None:
        self._refused = message
        _log.warn("control socket {path}: refused {who}", path=self._server.path, who=who)
        self._grace = self._server.reactor.callLater(REFUSED_GRACE, self._cut)

    def _cut(self) -> None:
        self._grace = None
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._server._connections.discard(self)
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
        self.closed.callback(None)

    # -- input that is not a control command ------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            super().dataReceived(data)
        except Exception as e:
            self._garbage(_describe(e))

    def lengthLimitExceeded(self, length: int) -> None:
        self._garbage(f"a {length}-byte key; AMP keys are at most 255 bytes")

    def _garbage(self, problem: str) -> None:
        """Close this connection because its peer does not speak AMP; log one line."""
        if not self._closing:
            self._closing = True
            _log.warn("control socket {path}: closed the connection of {peer}, which sent "
                      "something that is not AMP ({problem})",
                      path=self._server.path, peer=self._peer, problem=problem)
        if self.transport is not None:
            # Answers already written still go out; nothing more is read.
            self.transport.loseConnection()

    def unhandledError(self, failure: Failure) -> None:
        # AMP logs a traceback here (e.g. a bad command sent without _ask, so no answer).
        self._garbage(_describe(failure.value))

    def locateResponder(self, name: bytes) -> Callable[..., Any] | None:
        # AMP answers StartTLS by default; the control socket has no use for it.
        if name == amp.StartTLS.commandName:
            return None
        return super().locateResponder(name)

    def dispatchCommand(self, box: amp.AmpBox) -> defer.Deferred[Any]:
        if self._refused is not None:
            return defer.fail(amp.RemoteAmpError(PERMISSION_DENIED, self._refused, fatal=True))
        command = box.get(amp.COMMAND, b"?").decode("ascii", "replace")
        return super().dispatchCommand(box).addErrback(self._unanswerable, command)

    def _unanswerable(self, failure: Failure, command: str) -> Failure:
        """Turn what AMP would log as a traceback into one log line and an error answer."""
        if failure.check(amp.RemoteAmpError):
            return failure
        if failure.check(amp.BadLocalReturn):
            _log.failure("control socket {path}: cannot encode the answer to {command}",
                         failure, path=self._server.path, command=command)
            return Failure(amp.RemoteAmpError(
                INTERNAL_ERROR, f"the server could not encode its answer to {command} "
                "(see its log)"))
        # The arguments could not be parsed: not a request ctl would send.
        problem = _describe(failure.value)
        if not self._closing:
            self._closing = True
            _log.warn("control socket {path}: closed the connection of {peer}: its {command} "
                      "command cannot be read ({problem})",
                      path=self._server.path, peer=self._peer, command=command, problem=problem)
        return Failure(amp.RemoteAmpError(
            BAD_REQUEST, f"bad {command} request: {problem}", fatal=True))

    # -- the commands ----------------------------------------------------------------------

    def _call(self, command: str, method: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Call a controller method; keep ``ControlError``, log anything else as a bug."""

        def failed(failure: Failure) -> Failure:
            if failure.check(ControlError):
                return Failure(ControlError(_one_line(str(failure.value)) or command + " failed"))
            _log.failure("control socket: {command} failed", failure, command=command)
            return Failure(InternalError(
                f"{command} failed in the server: {type(failure.value).__name__}: "
                f"{_one_line(str(failure.value))} (see its log)"))

        return defer.maybeDeferred(method, *args).addErrback(failed)

    @List.responder
    def _list(self) -> defer.Deferred[dict[str, Any]]:
        return self._call("list", self._server.controller.targets).addCallback(
            lambda targets: {"targets": targets})

    @Stats.responder
    def _stats(self) -> defer.Deferred[dict[str, Any]]:
        return self._call("stats", self._server.controller.stats).addCallback(
            lambda stats: {"stats": stats})

    @Initiators.responder
    def _initiators(self) -> defer.Deferred[dict[str, Any]]:
        def pick(stats: dict[str, Any]) -> dict[str, Any]:
            return {"initiators": stats.get("initiators", []),
                    "time": float(stats.get("time", time.time()))}

        return self._call("initiators", self._server.controller.stats).addCallback(pick)

    @Add.responder
    def _add(self, target: str, settings: list[str]) -> defer.Deferred[dict[str, Any]]:
        return self._call("add", self._server.controller.add, target, settings).addCallback(
            lambda listing: {"target": listing})

    @Remove.responder
    def _remove(self, address: str) -> defer.Deferred[dict[str, Any]]:
        return self._call("remove", self._server.controller.remove, address).addCallback(
            lambda listing: {"target": listing})

    @Set.responder
    def _set(self, address: str, settings: list[str]) -> defer.Deferred[dict[str, Any]]:
        return self._call("set", self._server.controller.set, address, settings).addCallback(
            lambda listing: {"target": listing})

    @Reload.responder
    def _reload(self) -> defer.Deferred[dict[str, Any]]:
        return self._call("reload", self._server.controller.reload).addCallback(
            lambda result: {"result": result})


def _describe(error: BaseException) -> str:
    """Name what was wrong with a peer's input, in a few words (never its whole content)."""
    if isinstance(error, amp.NoEmptyBoxes):
        return "a box that is neither a command nor an answer"
    text = _one_line(str(error))
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
