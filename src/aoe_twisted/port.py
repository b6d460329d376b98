# -*- test-case-name: tests.test_port -*-
"""
The raw Ethernet port: AoE frames in and out of one interface.

``AoEPort`` is written the way Twisted writes ``twisted.pair.tuntap.TuntapPort``:
a ``FileDescriptor`` the reactor polls, an injectable ``system`` that stands
for the operating system (``_RealPacketSystem`` here, ``MemoryPacketSystem``
from ``aoe_twisted.testing`` in unit tests), ``startListening`` /
``stopListening`` and a datagram protocol it feeds one whole frame at a time.

The socket is a Linux ``AF_PACKET``/``SOCK_RAW`` socket bound to one
interface and to EtherType 0x88A2, so the kernel filters out everything that
is not AoE.  Frames come with their Ethernet header and leave with it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from attrs import frozen
from twisted.internet import abstract, defer, error, interfaces, task
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.reflect import fullyQualifiedName
from zope.interface import Interface, implementer

from aoe_twisted.wire import ETHERTYPE, MIN_FRAME_SIZE, format_mac

__all__ = [
    "NETNS_RUN_DIR",
    "AoEPort",
    "CannotOpenInterface",
    "EthernetAddress",
    "max_sectors_for_mtu",
]

_log = Logger()

#: AoE header (10 bytes) + ATA argument (12 bytes): what a frame carries besides sectors.
_ATA_OVERHEAD = 22
#: The sector count is one byte on the wire.
_MAX_SECTORS = 255
#: ``ioctl`` request that reads an interface's MTU (``linux/sockios.h``).
_SIOCGIFMTU = 0x8921
#: ``struct ifreq``: a 16-byte name, then a 24-byte union whose first int is the MTU.
_IFREQ_MTU = struct.Struct("16si20x")
#: ``setns`` flag for a network namespace (``linux/sched.h``).
_CLONE_NEWNET = 0x40000000
#: Where ``ip netns add NAME`` mounts its namespaces.
NETNS_RUN_DIR = "/var/run/netns"
#: ``SO_RCVBUFFORCE`` (``asm-generic/socket.h``); Python 3.11 does not name it.
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: Slack over the MTU for the receive buffer: the 14-byte Ethernet header and a VLAN tag.
_RECV_SLACK = 64
#: An untagged frame is at most the MTU plus this Ethernet header.
_ETHERNET_HEADER = 14

#: Send errors that mean "not now" rather than "never": the frame is dropped and
#: the initiator retransmits, as it would after any loss on the wire.
_TRANSIENT_SEND_ERRORS = frozenset(
    {errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK, errno.ENETDOWN, errno.ENXIO}
)
#: Receive errors after which reading simply waits for the next readiness.
_RETRY_LATER = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})


def max_sectors_for_mtu(mtu: int) -> int:
    """
    Return how many 512-byte sectors one ATA request or reply can carry at ``mtu``.

    The Ethernet payload (at most the MTU) holds the 10-byte AoE header, the
    12-byte ATA argument and the sectors: ``(mtu - 22) // 512``.  That is 2 at
    MTU 1500 and 17 at MTU 9000, as the Linux initiator computes it (vblade's
    ``(mtu - 36) // 512`` gives the same values at both).  The count is one
    byte on the wire, so it is capped at 255, and it is never below 1: an
    interface too small for one sector still answers config queries.
    """
    return max(1, min(_MAX_SECTORS, (mtu - _ATA_OVERHEAD) // 512))


@implementer(interfaces.IAddress)
@frozen
class EthernetAddress:
    """Where an ``AoEPort`` listens: the interface, its MAC address and its MTU."""

    interface: str
    mac: bytes
    mtu: int

    def __str__(self) -> str:
        return f"{self.interface} ({format_mac(self.mac)}, MTU {self.mtu})"


class CannotOpenInterface(error.CannotListenError):
    """
    The port could not open its raw socket; ``str()`` is one line naming the cause.

    A ``CannotListenError`` (``interface`` is the interface name, ``port`` the
    EtherType, ``socketError`` the ``OSError``) so code that handles Twisted's
    listening errors handles this one too.
    """

    def __init__(self, interface: str, socket_error: OSError, netns: str | None = None) -> None:
        super().__init__(interface, ETHERTYPE, socket_error)
        self.netns = netns

    @property
    def reason(self) -> str:
        """Why the socket could not be opened, in words an operator can act on."""
        e = self.socketError
        code = e.errno
        if e.filename and self.netns is not None:
            if code == errno.ENOENT:
                return "no such network namespace"
            if code in (errno.EPERM, errno.EACCES):
                return "needs CAP_SYS_ADMIN to enter the network namespace"
        if code in (errno.ENODEV, errno.ENXIO):
            return "no such interface"
        if code in (errno.EPERM, errno.EACCES):
            return "needs CAP_NET_RAW (run as root or grant the capability)"
        if code in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return "AF_PACKET sockets are not supported on this system"
        return e.strerror or str(e)

    def __str__(self) -> str:
        where = f"interface {self.interface}"
        if self.netns is not None:
            where += f" in network namespace {self.netns}"
        return f"cannot open {where}: {self.reason}"


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    native = getattr(os, "setns", None)  # Python 3.12+
    if native is not None:
        native(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextmanager
def _network_namespace(name: str | None) -> Iterator[None]:
    """
    Run the body with the calling thread in the named network namespace.

    ``name`` is a namespace made by ``ip netns add`` (a file in
    ``/var/run/netns``); ``None`` leaves the thread where it is.  Only this
    thread moves, and it moves back afterwards: a socket keeps the namespace it
    was created in, which is what lets one process serve in one namespace and
    talk to itself from another.  Errors entering the namespace are
    ``OSError`` whose ``filename`` is the namespace's path.
    """
    if name is None:
        yield
        return
    path = os.path.join(NETNS_RUN_DIR, name)
    if "/" in name or name in ("", ".", ".."):
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        try:
            _setns(target)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        finally:
            os.close(target)
        try:
            yield
        finally:
            # Failing to return would leave the reactor thread in the wrong
            # namespace for every later socket: let that error propagate.
            _setns(own)
    finally:
        os.close(own)


class _IPacketSystem(Interface):
    """
    The operating system as ``AoEPort`` sees it: packet sockets named by descriptor.

    Errors are ``OSError`` with the ``errno`` the kernel would give.
    """

    def open(interface: str, ethertype: int, netns: str | None = None) -> int:  # noqa: N805
        """
        Open a non-blocking raw packet socket bound to ``interface`` and ``ethertype``.

        Create it inside network namespace ``netns`` if that is not ``None``.
        Return its file descriptor.
        """

    def hardware_address(fd: int) -> bytes:  # noqa: N805
        """Return the 6-byte MAC address of the interface ``fd`` is bound to."""

    def mtu(fd: int, interface: str) -> int:  # noqa: N805
        """Return the MTU of ``interface`` (as seen from ``fd``'s namespace)."""

    def set_receive_buffer(fd: int, size: int) -> int:  # noqa: N805
        """Ask for at least ``size`` bytes of receive buffer; return what the socket has."""

    def recvfrom(fd: int, bufsize: int) -> tuple[bytes, tuple[Any, ...]]:  # noqa: N805
        """
        Return the next frame (at most ``bufsize`` bytes) and its ``sockaddr_ll``.

        The address is ``(interface, protocol, pkttype, hatype, source MAC)``.
        Raise ``OSError(EAGAIN)`` when nothing is waiting.
        """

    def send(fd: int, frame: bytes) -> int:  # noqa: N805
        """Transmit ``frame`` (with its Ethernet header) as one frame."""

    def close(fd: int) -> None:  # noqa: N805
        """Close the socket."""


@implementer(_IPacketSystem)
class _RealPacketSystem:
    """Linux ``AF_PACKET`` sockets, kept by descriptor so the port can speak in ``fileno``s."""

    def __init__(self) -> None:
        self._sockets: dict[int, socket.socket] = {}

    def _socket(self, fd: int) -> socket.socket:
        """Return the socket ``fd`` names; ``EBADF`` if this system did not open it."""
        try:
            return self._sockets[fd]
        except KeyError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    def open(self, interface: str, ethertype: int, netns: str | None = None) -> int:
        """Create, bind and unblock a packet socket (see ``_IPacketSystem.open``)."""
        with _network_namespace(netns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
        try:
            sock.bind((interface, ethertype))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sockets[sock.fileno()] = sock
        return sock.fileno()

    def hardware_address(self, fd: int) -> bytes:
        """Read the bound interface's MAC from ``getsockname()`` (``sll_addr``)."""
        return bytes(self._socket(fd).getsockname()[4])

    def mtu(self, fd: int, interface: str) -> int:
        """Ask the kernel with ``SIOCGIFMTU``."""
        request = _IFREQ_MTU.pack(interface.encode("utf-8", "surrogateescape"), 0)
        reply = fcntl.ioctl(fd, _SIOCGIFMTU, request)
        mtu: int = _IFREQ_MTU.unpack(reply)[1]
        return mtu

    def set_receive_buffer(self, fd: int, size: int) -> int:
        """
        Grow ``SO_RCVBUF`` to ``size`` if it is smaller.

        ``SO_RCVBUFFORCE`` (root) may exceed ``net.core.rmem_max``; without the
        privilege ``SO_RCVBUF`` is capped there.  The kernel reports twice what
        was asked (it counts its bookkeeping), so compare against half.
        """
        sock = self._socket(fd)
        current: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if current // 2 >= size:
            return current
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        result: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        return result

    def recvfrom(self, fd: int, bufsize: int) -> tuple[bytes, tuple[Any, ...]]:
        """``socket.recvfrom``."""
        return self._socket(fd).recvfrom(bufsize)

    def send(self, fd: int, frame: bytes) -> int:
        """``socket.send`` on the bound socket: the kernel sends on its interface."""
        return self._socket(fd).send(frame)

    def close(self, fd: int) -> None:
        """Close and forget the socket."""
        self._socket(fd).close()
        del self._sockets[fd]


@implementer(interfaces.IListeningPort)
class AoEPort(abstract.FileDescriptor):
    """
    A raw Ethernet port for AoE on one interface, feeding a datagram protocol.

    The protocol's ``datagramReceived(frame, addr)`` gets each frame whole,
    Ethernet header included, and ``addr`` is the kernel's ``sockaddr_ll``.
    ``write(frame)`` transmits one frame.  After ``startListening`` the port
    knows its interface's ``mac`` (6 bytes) and ``mtu``.

    Frames the kernel marks ``PACKET_OUTGOING`` (our own) or
    ``PACKET_OTHERHOST`` (addressed to another station, seen only in
    promiscuous mode) are not passed on: neither is a request to this host.
    ``accept_other_hosts=True`` passes the latter on anyway, for test peers
    that watch replies sent to forged addresses.  Frames longer than the MTU
    plus the Ethernet header are not passed on either: a veth end (and some
    NICs) accept giants up to 4 bytes longer, and the error reply echoing one
    would be too long to send (``EMSGSIZE``).  All three count in
    ``frames_ignored``.
    """

    def __init__(
        self,
        interface: str,
        protocol: AbstractDatagramProtocol,
        reactor: Any = None,
        system: Any = None,
        max_frames_per_read: int = 256,
        netns: str | None = None,
        receive_frames: int | None = None,
        accept_other_hosts: bool = False,
        pad_frames: bool = True,
    ) -> None:
        """
        @param interface: the interface to bind to, e.g. ``"eth0"``.
        @param protocol: the protocol fed with every frame received.
        @param reactor: the reactor to register with (the global one by default).
        @param system: an ``_IPacketSystem`` (a ``MemoryPacketSystem`` in tests).
        @param max_frames_per_read: how many frames one ``doRead`` takes at most,
            so a flood on one interface cannot starve the rest of the reactor.
        @param netns: the name of the network namespace (``ip netns``) that
            holds ``interface``; ``None`` for the process's own.
        @param receive_frames: grow the socket's receive buffer to hold this many
            full-size frames, if it is smaller.
        @param accept_other_hosts: pass on frames addressed to other stations.
        @param pad_frames: pad frames shorter than the Ethernet minimum before
            sending them; test peers turn this off to send the 32- and 36-byte
            frames the Linux initiator sends on virtio.
        """
        abstract.FileDescriptor.__init__(self, reactor)
        self._system = _RealPacketSystem() if system is None else system
        self.interface = interface
        self.protocol = protocol
        self.max_frames_per_read = max_frames_per_read
        self.netns = netns
        self.receive_frames = receive_frames
        self.accept_other_hosts = accept_other_hosts
        self.pad_frames = pad_frames
        self.mac: bytes | None = None
        self.mtu: int | None = None
        self._fileno = -1
        self._bufsize = 1500 + _RECV_SLACK
        self._max_frame = 1500 + _ETHERNET_HEADER
        self._stopped: defer.Deferred[None] | None = None
        self.frames_received = 0
        self.frames_ignored = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self.logstr = f"{self._getLogPrefix(protocol)} (AoE {interface})"

    def __repr__(self) -> str:
        state = "" if self.connected else "not "
        return (
            f"<{type(self).__name__} {fullyQualifiedName(type(self.protocol))} "
            f"{state}listening on {self.interface}>"
        )

    def startListening(self) -> None:
        """
        Open the socket, learn the MAC and MTU, connect the protocol and start reading.

        @raise CannotOpenInterface: (a ``CannotListenError``) if the socket
            cannot be opened or bound; its ``str`` is one line naming the
            interface and the cause.
        """
        self._bindSocket()
        self.protocol.makeConnection(self)  # type: ignore[arg-type]
        self.startReading()

    def _bindSocket(self) -> None:
        """Open and bind the socket and read the interface's properties."""
        try:
            fd = self._system.open(self.interface, ETHERTYPE, self.netns)
        except OSError as e:
            raise CannotOpenInterface(self.interface, e, self.netns) from None
        try:
            mac = self._system.hardware_address(fd)
            if len(mac) != 6:
                # A tun or other non-Ethernet device: no MAC to answer from.
                raise OSError(errno.EINVAL, "not an Ethernet interface (no 6-byte MAC address)")
            mtu = self._system.mtu(fd, self.interface)
            if self.receive_frames:
                # The kernel charges each frame its buffer's true size; MTU plus
                # 1 KiB of slack per frame covers it at any MTU.
                self._system.set_receive_buffer(fd, self.receive_frames * (mtu + 1024))
        except OSError as e:
            self._system.close(fd)
            raise CannotOpenInterface(self.interface, e, self.netns) from None
        self.mac = mac
        self.mtu = mtu
        self._fileno = fd
        self._bufsize = mtu + _RECV_SLACK
        self._max_frame = mtu + _ETHERNET_HEADER
        self.connected = 1
        _log.info("AoE port open on {address}", address=self.getHost())

    def fileno(self) -> int:
        """The packet socket's descriptor (-1 when closed)."""
        return self._fileno

    def doRead(self) -> None:
        """
        Pass every waiting frame to the protocol, up to ``max_frames_per_read``.

        Stops when the socket has nothing more (``EAGAIN``), so one readiness
        event drains a burst instead of costing a reactor turn per frame.  An
        exception from the protocol is logged and reading goes on.

        If the protocol has a ``drainFinished()`` method, it is called once
        after the frames of the drain (if there were any): the end of a burst,
        where ``AoEProtocol`` makes a group of writes durable at once.
        """
        received = self.frames_received
        try:
            self._drain()
        finally:
            if self.frames_received != received:
                drain_finished = getattr(self.protocol, "drainFinished", None)
                if drain_finished is not None:
                    try:
                        drain_finished()
                    except Exception:
                        _log.failure(
                            "Unhandled exception from {protocol}.drainFinished",
                            protocol=fullyQualifiedName(type(self.protocol)),
                        )

    def _drain(self) -> None:
        """Pass waiting frames to the protocol (``doRead`` without the end-of-drain call)."""
        for _ in range(self.max_frames_per_read):
            try:
                frame, addr = self._system.recvfrom(self._fileno, self._bufsize)
            except OSError as e:
                if e.errno in _RETRY_LATER:
                    return
                if e.errno == errno.ENETDOWN:
                    # Reported once when the interface goes down; the socket
                    # stays bound and frames flow again when it comes back up.
                    _log.warn("AoE port: interface {interface} is down", interface=self.interface)
                    return
                raise
            pkttype = addr[2] if len(addr) > 2 else socket.PACKET_HOST
            if (
                pkttype == socket.PACKET_OUTGOING
                or (pkttype == socket.PACKET_OTHERHOST and not self.accept_other_hosts)
                or len(frame) > self._max_frame
            ):
                self.frames_ignored += 1
                continue
            self.frames_received += 1
            try:
                self.protocol.datagramReceived(frame, addr)
            except Exception:
                _log.failure(
                    "Unhandled exception from {protocol}.datagramReceived",
                    protocol=fullyQualifiedName(type(self.protocol)),
                )

    def write(self, frame: bytes) -> None:  # type: ignore[override]
        """
        Transmit ``frame`` as exactly one Ethernet frame.

        A frame shorter than the Ethernet minimum (60 bytes without FCS) is
        padded with zeros (unless ``pad_frames`` is off): not every driver
        pads what it is given.  When the
        kernel has no room (``ENOBUFS``, ``EAGAIN``) or the interface is down,
        the frame is dropped and counted in ``frames_dropped``; the initiator
        retransmits as it does after any loss on the wire.
        """
        if len(frame) < MIN_FRAME_SIZE and self.pad_frames:
            frame = bytes(frame) + bytes(MIN_FRAME_SIZE - len(frame))
        while True:
            try:
                self._system.send(self._fileno, frame)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if e.errno in _TRANSIENT_SEND_ERRORS:
                    self._dropped(e)
                    return
                raise
            self.frames_sent += 1
            return

    def _dropped(self, e: OSError) -> None:
        """Count a frame the kernel would not take; log at 1, 2, 4, 8... drops."""
        self.frames_dropped += 1
        count = self.frames_dropped
        if count & (count - 1) == 0:
            _log.warn(
                "AoE port {interface}: dropped a frame ({error}); {count} dropped so far",
                interface=self.interface,
                error=e.strerror or str(e),
                count=count,
            )

    def writeSequence(self, seq: list[bytes]) -> None:  # type: ignore[override]
        """Transmit the pieces of ``seq`` joined as one frame."""
        self.write(b"".join(seq))

    def stopListening(self) -> defer.Deferred[None]:
        """
        Stop reading and close the socket.

        @return: a ``Deferred`` that fires (with ``None``) once the socket is
            closed and the protocol stopped.  Calling it again is safe.
        """
        self.stopReading()
        if self.disconnecting:
            assert self._stopped is not None
            return self._stopped
        if self.connected:
            self._stopped = task.deferLater(self.reactor, 0, self.connectionLost)
            self.disconnecting = True
            return self._stopped
        return defer.succeed(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Close the socket and stop the protocol."""
        if reason is not None and not reason.check(error.ConnectionDone):
            _log.failure("AoE port {interface} failed", reason, interface=self.interface)
        _log.info("AoE port closed on {interface}", interface=self.interface)
        abstract.FileDescriptor.connectionLost(self, reason)  # type: ignore[arg-type]
        self.protocol.doStop()
        self.connected = 0
        self._system.close(self._fileno)
        self._fileno = -1

    def logPrefix(self) -> str:
        """Name the protocol and interface in log lines."""
        return self.logstr

    def getHost(self) -> EthernetAddress:
        """Return the interface, MAC and MTU this port is bound to."""
        return EthernetAddress(self.interface, self.mac or bytes(6), self.mtu or 0)
