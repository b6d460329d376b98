# -*- test-case-name: tests.test_link -*-
"""
The kernel's link notifications: interfaces that come, go, go down and up.

``LinkMonitor`` is one more Twisted reader: an ``AF_NETLINK`` /
``NETLINK_ROUTE`` socket joined to the ``RTMGRP_LINK`` group, so the kernel
tells the server at once when an interface appears, disappears, changes
state, MTU or MAC address, with no polling.  ``parse_link_messages`` turns
what it reads into ``LinkEvent`` values (pure, tested on bytes).

Netlink is the kernel's own interface for this and needs no privilege to
listen.  ``pyroute2`` would parse it for us, but the four fields we read
(name, flags, MTU, address) are a few ``struct`` calls, and this keeps the
server's dependencies at Twisted, zope.interface and attrs.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

from attrs import frozen
from twisted.internet import abstract
from twisted.logger import Logger
from twisted.python.failure import Failure

from aoe_twisted.core.wire import format_mac
from aoe_twisted.net.netns import network_namespace

__all__ = ["LinkEvent", "LinkMonitor", "dump_request", "parse_link_messages"]

_log = Logger()

#: ``struct nlmsghdr``: length, type, flags, sequence, port id.
_NLMSGHDR = struct.Struct("=IHHII")
#: ``struct ifinfomsg``: family, pad, type, index, flags, change.
_IFINFOMSG = struct.Struct("=BxHiII")
#: ``struct rtattr``: length, type.
_RTATTR = struct.Struct("=HH")
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
RTM_NEWLINK = 16
RTM_DELLINK = 17
_RTM_GETLINK = 18
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_RTMGRP_LINK = 1
_IFLA_ADDRESS = 1
_IFLA_IFNAME = 3
_IFLA_MTU = 4
_IFF_UP = 0x1
_IFF_RUNNING = 0x40
_IFF_LOWER_UP = 0x10000
_RECEIVE_BUFFER = 1 << 20


def _align(length: int) -> int:
    """Netlink aligns messages and attributes to 4 bytes."""
    return (length + 3) & ~3


@frozen
class LinkEvent:
    """
    What the kernel said about one interface.

    ``present`` is false when the interface was removed (``RTM_DELLINK``);
    ``up`` is ``IFF_UP`` (administratively up) and ``carrier`` is
    ``IFF_LOWER_UP`` (the link is there); frames flow only when both are true.
    """

    index: int
    name: str
    present: bool
    up: bool
    carrier: bool
    mtu: int
    mac: bytes

    @property
    def usable(self) -> bool:
        """Whether frames can flow: present, up and with carrier."""
        return self.present and self.up and self.carrier

    def describe(self) -> str:
        """One line for the log: the state, MAC and MTU."""
        if not self.present:
            return "removed"
        state = "up" if self.usable else ("down" if not self.up else "up, no carrier")
        return f"{state} ({format_mac(self.mac) if len(self.mac) == 6 else '-'}, MTU {self.mtu})"


def _attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(type, payload)`` for each ``rtattr`` between ``offset`` and ``end``."""
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size : offset + length]
        offset += _align(length)


def parse_link_messages(data: bytes) -> list[LinkEvent]:
    """
    Return the link events in ``data``, one netlink datagram (several messages).

    Messages other than ``RTM_NEWLINK`` and ``RTM_DELLINK`` and truncated
    ones are skipped: whatever the kernel sends, this returns what it
    understood and never raises.
    """
    events = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body = offset + _NLMSGHDR.size
        end = offset + length
        offset += _align(length)
        if kind not in (RTM_NEWLINK, RTM_DELLINK) or body + _IFINFOMSG.size > end:
            continue
        _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
        name = ""
        mtu = 0
        mac = b""
        for attr, payload in _attributes(data, body + _IFINFOMSG.size, end):
            if attr == _IFLA_IFNAME:
                name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif attr == _IFLA_MTU and len(payload) >= 4:
                mtu = struct.unpack_from("=I", payload)[0]
            elif attr == _IFLA_ADDRESS:
                mac = bytes(payload)
        if not name:
            continue
        events.append(
            LinkEvent(
                index,
                name,
                kind == RTM_NEWLINK,
                bool(flags & _IFF_UP),
                bool(flags & _IFF_LOWER_UP) or bool(flags & _IFF_RUNNING),
                mtu,
                mac,
            )
        )
    return events


def dump_request(sequence: int = 1) -> bytes:
    """Return the ``RTM_GETLINK`` dump request: the kernel answers with every interface."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), _RTM_GETLINK, _NLM_F_REQUEST | _NLM_F_DUMP, sequence, 0
    )
    return header + body


class LinkMonitor(abstract.FileDescriptor):
    """
    Tell ``callback`` about every link event in a network namespace, as it happens.

    ``start`` opens the netlink socket (inside ``netns`` if given: that
    needs ``CAP_SYS_ADMIN``, so the server starts it before dropping
    privileges), asks for every interface's state once (so the callback
    learns the state it starts from) and starts reading.  If the kernel
    drops notifications (``ENOBUFS``: the socket's buffer overflowed) the
    monitor asks for the whole state again, so no transition is missed for
    good.
    """

    def __init__(
        self,
        callback: Callable[[LinkEvent], None],
        netns: str | None = None,
        reactor: Any = None,
    ) -> None:
        abstract.FileDescriptor.__init__(self, reactor)
        self.callback = callback
        self.netns = netns
        self._socket: socket.socket | None = None
        self._sequence = 0

    @classmethod
    def follow(
        cls,
        callback: Callable[[LinkEvent], None],
        netns: str | None,
        reactor: Any,
        unless: str,
    ) -> LinkMonitor | None:
        """
        Start a monitor and return it; ``None``, with a warning, if the kernel refuses.

        ``unless`` says in the warning what the server cannot do without one.
        """
        monitor = cls(callback, netns, reactor)
        try:
            monitor.start()
        except OSError as e:
            _log.warn(
                "cannot follow link changes ({error}): {consequence}",
                error=e.strerror or str(e),
                consequence=unless,
            )
            return None
        return monitor

    def start(self) -> None:
        """Open and bind the socket, ask for the current state, start reading."""
        with network_namespace(self.netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            sock.bind((0, _RTMGRP_LINK))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self.connected = 1
        self.resync()
        self.startReading()

    def resync(self) -> None:
        """Ask the kernel for every interface's state (the answers come as events)."""
        if self._socket is None:
            return
        self._sequence += 1
        try:
            self._socket.send(dump_request(self._sequence))
        except OSError as e:
            # EBUSY: a dump is already under way; its answers will do.
            if e.errno != errno.EBUSY:
                _log.warn("cannot ask for the links' state: {error}", error=os.strerror(e.errno))

    def fileno(self) -> int:
        """The netlink socket's descriptor (-1 when closed)."""
        return -1 if self._socket is None else self._socket.fileno()

    def doRead(self) -> None:
        """Read every waiting datagram and report its link events."""
        sock = self._socket
        if sock is None:
            return
        for _ in range(64):
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    _log.warn("link notifications were lost (ENOBUFS); asking for the state again")
                    self.resync()
                    continue
                if e.errno == errno.EINTR:
                    continue
                raise
            for event in parse_link_messages(data):
                try:
                    self.callback(event)
                except Exception:
                    _log.failure("Unhandled exception handling the link event {event}", event=event)

    def stop(self) -> None:
        """Stop reading and close the socket."""
        self.stopReading()
        sock, self._socket = self._socket, None
        self.connected = 0
        if sock is not None:
            sock.close()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """The reactor gave up on the socket: close it (link events stop)."""
        why = reason.getErrorMessage() if reason is not None else "closed"
        _log.warn("link monitor stopped: {reason}", reason=why)
        self.stop()

    def logPrefix(self) -> str:
        """Name the monitor in log lines."""
        return "AoE link monitor"
