# -*- test-case-name: tests.test_port -*-
"""
The raw-socket system: Linux ``AF_PACKET`` sockets as ``AoEPort`` and ``--workers`` use them.

``open_packet_socket`` creates a raw packet socket bound to one interface
and one EtherType, inside a network namespace if asked; the port (through
``RealPacketSystem``) and the ``--workers`` parent (which opens the sockets
its workers adopt) both open theirs with it.  A socket bound to EtherType
0x88A2 gets only AoE frames: the kernel filters out the rest.

``IPacketSystem`` is the operating system as the port sees it, sockets
named by descriptor, so that a test can hand the port a fake one
(``aoe_twisted.testing.MemoryPacketSystem``), as ``twisted.pair.tuntap``
does with its ``_IInputOutputSystem``.  A system that can also map
``PACKET_MMAP`` rings (``aoe_twisted.net.ring``) on its sockets says so by
providing ``IRingPacketSystem``; ``RealPacketSystem`` does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import Any

from twisted.internet import error
from zope.interface import Interface, implementer

from aoe_twisted.core.wire import ETHERTYPE
from aoe_twisted.net.netns import network_namespace
from aoe_twisted.net.ring import PacketRings, RingGeometry

__all__ = [
    "MAX_RECEIVE_BUFFER",
    "CannotOpenInterface",
    "IPacketSystem",
    "IRingPacketSystem",
    "RealPacketSystem",
    "open_packet_socket",
]

#: ``ioctl`` request that reads an interface's MTU (``linux/sockios.h``).
_SIOCGIFMTU = 0x8921
#: ``struct ifreq``: a 16-byte name, then a 24-byte union whose first int is the MTU.
_IFREQ_MTU = struct.Struct("16si20x")
#: ``SO_RCVBUFFORCE`` (``asm-generic/socket.h``); Python 3.11 does not name it.
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: The largest receive buffer ``set_receive_buffer`` asks for: ``SO_RCVBUF`` takes a C
#: ``int`` and Linux doubles it (its bookkeeping) after clamping it to ``INT_MAX / 2``, so
#: this is the most the kernel can grant.  A larger size (Python refuses to pass it:
#: ``TypeError``) is asked for as this.
MAX_RECEIVE_BUFFER = (2**31 - 1) // 2


class CannotOpenInterface(error.CannotListenError):
    """
    A raw packet socket could not be opened; ``str()`` is one line naming the cause.

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


def open_packet_socket(interface: str, ethertype: int, netns: str | None = None) -> socket.socket:
    """
    Return a blocking ``AF_PACKET``/``SOCK_RAW`` socket bound to ``interface`` and ``ethertype``.

    The socket is created inside network namespace ``netns`` (see
    ``aoe_twisted.net.netns.network_namespace``) if that is not ``None``, and
    keeps it; binding is done from the caller's own namespace, which is
    allowed.  A socket that cannot be bound is closed before the error is
    raised.

    @raise OSError: with the kernel's ``errno``: ``EPERM`` without
        ``CAP_NET_RAW``, ``ENODEV`` for an unknown interface; an error entering
        the namespace carries the namespace's path as ``filename``.
        ``CannotOpenInterface`` turns any of them into one line for an operator.
    """
    # Protocol 0 until bound: a socket created with the EtherType would get
    # that EtherType's frames from every interface until ``bind`` narrows it.
    sock = open_unbound_packet_socket(netns)
    try:
        sock.bind((interface, ethertype))
    except BaseException:
        sock.close()
        raise
    return sock


def open_unbound_packet_socket(netns: str | None = None) -> socket.socket:
    """
    Return a blocking ``AF_PACKET``/``SOCK_RAW`` socket that receives nothing until bound.

    Created (inside ``netns``) with protocol 0, so no frame reaches it; a
    later ``bind((interface, ethertype))`` makes it receive that
    interface's frames of that EtherType.  Binding needs no privilege, so a
    server that dropped ``CAP_NET_RAW`` can still bind such a socket to an
    interface that appears, or comes back with a new index, later.

    @raise OSError: as ``open_packet_socket``.
    """
    with network_namespace(netns):
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)


class IPacketSystem(Interface):
    """
    The operating system as ``AoEPort`` sees it: packet sockets named by descriptor.

    The port does all its socket I/O through one of these, so a test can
    give it an in-memory one (``aoe_twisted.testing.MemoryPacketSystem``)
    that keeps the kernel's contract: the same frames, marks and errors.
    Errors are ``OSError`` with the ``errno`` the kernel would give.
    """

    def open(interface: str, ethertype: int, netns: str | None = None) -> int:  # noqa: N805
        """
        Open a non-blocking raw packet socket bound to ``interface`` and ``ethertype``.

        Create it inside network namespace ``netns`` if that is not ``None``
        (an error entering it has the namespace's path as ``filename``).
        Return its file descriptor.
        """

    def adopt(fd: int) -> int:  # noqa: N805
        """
        Take over ``fd``, an open packet socket already bound (by another process, say).

        Make it non-blocking and return the descriptor to use from now on; the
        system closes it in ``close``.  ``EBADF`` if it is not an open socket.
        """

    def hardware_address(fd: int) -> bytes:  # noqa: N805
        """Return the MAC address of the interface ``fd`` is bound to (6 bytes on Ethernet)."""

    def mtu(fd: int, interface: str) -> int:  # noqa: N805
        """Return the MTU of ``interface`` (as seen from ``fd``'s namespace)."""

    def set_receive_buffer(fd: int, size: int) -> int:  # noqa: N805
        """
        Ask for at least ``size`` bytes of receive buffer; return what the socket has.

        A ``size`` over ``MAX_RECEIVE_BUFFER`` is asked for as that (the most
        the kernel grants); ``OSError`` if the kernel refuses.
        """

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


class IRingPacketSystem(IPacketSystem):
    """
    A packet system that can also give its sockets ``PACKET_MMAP`` rings.

    With rings the port reads frames in place from the RX ring and queues
    replies in the TX ring, one ``flush`` sending a batch: no system call per
    frame.  The port uses them when its system provides this interface (and
    the port's ``rings`` is true); otherwise, or when ``map_rings`` returns
    ``None`` or fails, it uses ``recvfrom`` and ``send``.
    """

    def map_rings(fd: int, rx: RingGeometry, tx: RingGeometry) -> PacketRings | None:  # noqa: N805
        """
        Give ``fd`` an RX and a TX ring of these shapes and return them mapped.

        Return ``None`` if this system has no rings to offer on the socket
        (the port then uses ``recvfrom`` and ``send``, and says nothing).
        Raise ``OSError`` if the kernel refuses them: the port falls back the
        same way, with a warning, so the socket must be left usable without
        rings.
        """

    def flush(fd: int) -> int:  # noqa: N805
        """
        Ask the kernel to send every TX ring slot marked ``TP_STATUS_SEND_REQUEST``.

        Slots it cannot send now stay marked and go with a later call.  Errors
        are those of ``send`` (``ENOBUFS`` when the interface's queue is full).
        """


@implementer(IRingPacketSystem)
class RealPacketSystem:
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
        """Open a packet socket (``open_packet_socket``) and unblock it; see ``IPacketSystem``."""
        sock = open_packet_socket(interface, ethertype, netns)
        try:
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sockets[sock.fileno()] = sock
        return sock.fileno()

    def open_unbound(self, netns: str | None = None) -> int:
        """Open a socket that receives nothing until ``rebind`` (see ``IPacketSystem``)."""
        sock = open_unbound_packet_socket(netns)
        sock.setblocking(False)
        self._sockets[sock.fileno()] = sock
        return sock.fileno()

    def rebind(self, fd: int, interface: str, ethertype: int) -> None:
        """``bind`` again, by name (see ``IPacketSystem.rebind``)."""
        self._socket(fd).bind((interface, ethertype))

    def socket_error(self, fd: int) -> int:
        """Read (and so clear) ``SO_ERROR`` (see ``IPacketSystem.socket_error``)."""
        error: int = self._socket(fd).getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return error

    def adopt(self, fd: int) -> int:
        """Wrap the bound packet socket ``fd`` (see ``IPacketSystem.adopt``)."""
        if fd in self._sockets:
            return fd
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_PACKET:
            sock.detach()
            raise OSError(errno.ENOTSOCK, "not an AF_PACKET socket")
        sock.setblocking(False)
        self._sockets[fd] = sock
        return fd

    def map_rings(self, fd: int, rx: RingGeometry, tx: RingGeometry) -> PacketRings:
        """Set up and map the rings with ``PacketRings.setup`` (see ``IRingPacketSystem``)."""
        return PacketRings.setup(self._socket(fd), rx, tx)

    def flush(self, fd: int) -> int:
        """Send the marked TX slots with one ``send`` of nothing (see ``IRingPacketSystem``)."""
        return self._socket(fd).send(b"", socket.MSG_DONTWAIT)

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
        was asked (it counts its bookkeeping), so compare against half.  A
        ``size`` over ``MAX_RECEIVE_BUFFER`` (not a C ``int`` once doubled)
        is clamped to it rather than raising ``TypeError`` from ``setsockopt``.
        """
        size = max(0, min(size, MAX_RECEIVE_BUFFER))
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
