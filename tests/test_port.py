"""
Tests for ``aoe_twisted.net.port``: the raw Ethernet port, and the fake system its tests use.

The packet-system contract runs twice, as Twisted's tuntap tests do: against
``MemoryPacketSystem`` and against real ``AF_PACKET`` sockets on a veth pair
(root only).  The port tests then rely on the fake, proven equivalent by it.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer, implementer_only
from zope.interface.verify import verifyClass, verifyObject

from aoe_twisted.core.wire import BROADCAST_MAC, ETHERTYPE, MIN_FRAME_SIZE
from aoe_twisted.net.netns import NETNS_RUN_DIR
from aoe_twisted.net.packetsystem import (
    MAX_RECEIVE_BUFFER,
    CannotOpenInterface,
    IPacketSystem,
    IRingPacketSystem,
    RealPacketSystem,
    open_packet_socket,
)
from aoe_twisted.net.port import (
    AoEPort,
    EthernetAddress,
    IFrameSink,
    IZeroCopyFrameSink,
    max_sectors_for_mtu,
    receive_buffer_size,
)
from aoe_twisted.net.ring import PACKET_FANOUT, PACKET_FANOUT_HASH, SOL_PACKET, RingGeometry
from aoe_twisted.testing import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    MemoryPacketSystem,
    config_request,
    ethernet_frame,
)
from tests.netns import VethPair

#: On no interface: not ``OTHER_MAC``, which ``MemoryPacketSystem`` gives a veth pair's second end.
NOBODY_MAC = bytes.fromhex("020000000009")


class RecordingProtocol(AbstractDatagramProtocol):
    """Remember every frame and address; optionally raise for frames starting with ``boom``."""

    noisy = False

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, Any]] = []
        self.started = 0
        self.stopped = 0
        self.raise_for: bytes | None = None

    def startProtocol(self) -> None:
        self.started += 1

    def stopProtocol(self) -> None:
        self.stopped += 1

    def datagramReceived(self, datagram: bytes, addr: Any = None) -> None:
        if self.raise_for is not None and datagram.startswith(self.raise_for):
            raise RuntimeError("protocol failure")
        self.frames.append((datagram, addr))


# -- the packet-system contract ---------------------------------------------


def receive(system: Any, fd: int, wait: float = 1.0) -> tuple[bytes, Any]:
    """Return the next frame on ``fd``, waiting up to ``wait`` s for a real one to arrive."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return system.recvfrom(fd, 65536)  # type: ignore[no-any-return]
        except OSError as e:
            if e.errno != errno.EAGAIN or time.monotonic() > deadline:
                raise
        time.sleep(0.001)


class PacketSystemContractMixin:
    """
    What every ``IPacketSystem`` does, fake or real.

    ``make_link()`` returns ``(system, (netns_a, interface_a), (netns_b,
    interface_b))``: two interfaces joined by a link, each end with MTU 1500.
    """

    def make_link(self) -> tuple[Any, tuple[str | None, str], tuple[str | None, str]]:
        raise NotImplementedError

    def setUp(self) -> None:
        self.system, (self.ns_a, self.if_a), (self.ns_b, self.if_b) = self.make_link()
        self.a = self.system.open(self.if_a, ETHERTYPE, self.ns_a)
        self.addCleanup(self.system.close, self.a)  # type: ignore[attr-defined]
        self.b = self.system.open(self.if_b, ETHERTYPE, self.ns_b)
        self.addCleanup(self.system.close, self.b)  # type: ignore[attr-defined]
        self.mac_a = self.system.hardware_address(self.a)
        self.mac_b = self.system.hardware_address(self.b)

    def test_provides(self) -> None:
        """The system provides ``IPacketSystem``, and ``IRingPacketSystem`` (both map rings)."""
        self.assertTrue(verifyObject(IPacketSystem, self.system))  # type: ignore[attr-defined]
        self.assertTrue(verifyObject(IRingPacketSystem, self.system))  # type: ignore[attr-defined]

    def test_unknown_interface(self) -> None:
        """Opening an interface that does not exist fails with ``ENODEV``."""
        with self.assertRaises(OSError) as caught:  # type: ignore[attr-defined]
            self.system.open("aoenosuch9", ETHERTYPE, self.ns_a)
        self.assertEqual(caught.exception.errno, errno.ENODEV)  # type: ignore[attr-defined]

    def test_unknown_namespace(self) -> None:
        """Opening in a namespace that does not exist fails with ``ENOENT`` naming its path."""
        with self.assertRaises(OSError) as caught:  # type: ignore[attr-defined]
            self.system.open(self.if_a, ETHERTYPE, "aoe-t-no-such-namespace")
        self.assertEqual(caught.exception.errno, errno.ENOENT)  # type: ignore[attr-defined]
        self.assertIn("aoe-t-no-such-namespace", caught.exception.filename)  # type: ignore[attr-defined]

    def test_addresses(self) -> None:
        """Each end has its own 6-byte unicast MAC and the link's MTU."""
        ends = ((self.a, self.if_a, self.mac_a), (self.b, self.if_b, self.mac_b))
        for fd, interface, mac in ends:
            self.assertEqual(len(mac), 6)  # type: ignore[attr-defined]
            self.assertFalse(mac[0] & 1)  # type: ignore[attr-defined]
            self.assertEqual(self.system.mtu(fd, interface), 1500)  # type: ignore[attr-defined]
        self.assertNotEqual(self.mac_a, self.mac_b)  # type: ignore[attr-defined]

    def test_nothing_waiting(self) -> None:
        """``recvfrom`` with nothing waiting raises ``EAGAIN`` (the socket does not block)."""
        with self.assertRaises(OSError) as caught:  # type: ignore[attr-defined]
            self.system.recvfrom(self.a, 2048)
        self.assertIn(caught.exception.errno, (errno.EAGAIN, errno.EWOULDBLOCK))  # type: ignore[attr-defined]

    def test_unicast(self) -> None:
        """A frame to the other end's MAC arrives whole and unpadded, marked ``PACKET_HOST``."""
        frame = ethernet_frame(config_request(), self.mac_a, self.mac_b)
        self.assertEqual(self.system.send(self.a, frame), len(frame))  # type: ignore[attr-defined]
        data, addr = receive(self.system, self.b)
        self.assertEqual(data, frame)  # type: ignore[attr-defined]
        self.assertEqual(addr[0], self.if_b)  # type: ignore[attr-defined]
        self.assertEqual(addr[1], ETHERTYPE)  # type: ignore[attr-defined]
        self.assertEqual(addr[2], socket.PACKET_HOST)  # type: ignore[attr-defined]
        self.assertEqual(addr[4], self.mac_a)  # type: ignore[attr-defined]

    def test_packet_types(self) -> None:
        """Broadcast and other hosts' frames arrive too, marked as such; forged sources are kept."""
        self.system.send(self.a, ethernet_frame(config_request(), self.mac_a, BROADCAST_MAC))
        self.system.send(self.a, ethernet_frame(config_request(), INITIATOR_MAC, NOBODY_MAC))
        first = receive(self.system, self.b)[1]
        second = receive(self.system, self.b)[1]
        self.assertEqual(first[2], socket.PACKET_BROADCAST)  # type: ignore[attr-defined]
        self.assertEqual(second[2], socket.PACKET_OTHERHOST)  # type: ignore[attr-defined]
        self.assertEqual(second[4], INITIATOR_MAC)  # type: ignore[attr-defined]

    def test_own_frames_and_other_ethertypes_filtered(self) -> None:
        """A socket does not see its own frames, nor frames of another EtherType."""
        other = ethernet_frame(config_request(), self.mac_a, self.mac_b, ethertype=0x88B5)
        self.system.send(self.a, other)
        frame = ethernet_frame(config_request(), self.mac_a, self.mac_b)
        self.system.send(self.a, frame)
        self.assertEqual(receive(self.system, self.b)[0], frame)  # type: ignore[attr-defined]
        for fd in (self.a, self.b):
            with self.assertRaises(OSError):  # type: ignore[attr-defined]
                self.system.recvfrom(fd, 2048)

    def test_oversize(self) -> None:
        """A frame longer than the MTU plus the Ethernet header is refused with ``EMSGSIZE``."""
        with self.assertRaises(OSError) as caught:  # type: ignore[attr-defined]
            self.system.send(self.a, ethernet_frame(b"x" * 1501, self.mac_a, self.mac_b))
        self.assertEqual(caught.exception.errno, errno.EMSGSIZE)  # type: ignore[attr-defined]

    def test_receive_buffer(self) -> None:
        """Asking for a larger receive buffer gets at least that much; it never shrinks."""
        size = self.system.set_receive_buffer(self.a, 1 << 20)
        self.assertGreaterEqual(size, 1 << 20)  # type: ignore[attr-defined]
        self.assertEqual(self.system.set_receive_buffer(self.a, 1024), size)  # type: ignore[attr-defined]

    def test_closed(self) -> None:
        """Using a descriptor after ``close`` fails with ``EBADF``."""
        fd = self.system.open(self.if_a, ETHERTYPE, self.ns_a)
        self.system.close(fd)
        with self.assertRaises(OSError) as caught:  # type: ignore[attr-defined]
            self.system.recvfrom(fd, 2048)
        self.assertEqual(caught.exception.errno, errno.EBADF)  # type: ignore[attr-defined]


class ReceiveBufferSizeTests(SynchronousTestCase):
    """``receive_buffer_size``: full frames at an MTU, within what the kernel accepts."""

    def test_frames(self) -> None:
        """Each frame is counted as the MTU plus 1 KiB of the kernel's bookkeeping."""
        self.assertEqual(receive_buffer_size(256, 1500), 256 * 2524)

    def test_clamped(self) -> None:
        """Beyond ``MAX_RECEIVE_BUFFER`` (half a C ``int``: Linux doubles it) it is clamped."""
        self.assertEqual(receive_buffer_size(256_000, 9000), MAX_RECEIVE_BUFFER)
        self.assertEqual(2 * MAX_RECEIVE_BUFFER, 2**31 - 2)


class _NoReceiveBufferSystem(MemoryPacketSystem):
    """A memory system whose kernel refuses every receive buffer size."""

    def set_receive_buffer(self, fd: int, size: int) -> int:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))


class MemoryPacketSystemTests(PacketSystemContractMixin, SynchronousTestCase):
    """The contract, on the fake."""

    def make_link(self) -> tuple[Any, tuple[str | None, str], tuple[str | None, str]]:
        system = MemoryPacketSystem()
        system.add_veth("veth0", "veth1", netns="ns-a", peer_netns="ns-b")
        return system, ("ns-a", "veth0"), ("ns-b", "veth1")


class RealPacketSystemTests(PacketSystemContractMixin, SynchronousTestCase):
    """The contract, on ``AF_PACKET`` sockets on a veth pair between two namespaces (root only)."""

    def make_link(self) -> tuple[Any, tuple[str | None, str], tuple[str | None, str]]:
        pair = VethPair.create(self)
        system = RealPacketSystem()
        return system, (pair.server_ns, pair.server_if), (pair.client_ns, pair.client_if)

    def test_real_class(self) -> None:
        """``RealPacketSystem`` implements the whole ring-capable interface."""
        self.assertTrue(verifyClass(IRingPacketSystem, RealPacketSystem))

    def test_receive_buffer_beyond_int(self) -> None:
        """
        A size that is no C ``int`` (1,000 targets' rings at MTU 9000 asked for
        2.6 GB) is clamped to ``MAX_RECEIVE_BUFFER``, not a ``TypeError`` from
        ``setsockopt``; as root (``SO_RCVBUFFORCE``) the kernel grants all of it.
        """
        size = self.system.set_receive_buffer(self.a, 256_000 * (9000 + 1024))
        self.assertGreaterEqual(size, MAX_RECEIVE_BUFFER)


class MemoryPacketSystemClassTests(SynchronousTestCase):
    """``MemoryPacketSystem`` declares what it implements, with or without rings on offer."""

    def test_class(self) -> None:
        """The class implements ``IRingPacketSystem`` (and so ``IPacketSystem``)."""
        self.assertTrue(verifyClass(IRingPacketSystem, MemoryPacketSystem))
        self.assertTrue(IRingPacketSystem.extends(IPacketSystem))

    def test_without_rings(self) -> None:
        """With ``rings`` off it still provides the interface; ``map_rings`` offers none."""
        system = MemoryPacketSystem(rings=False)
        self.assertTrue(verifyObject(IRingPacketSystem, system))
        system.add_interface("eth0")
        fd = system.open("eth0", ETHERTYPE)
        geometry = RingGeometry.for_mtu(1500, 16)
        self.assertIsNone(system.map_rings(fd, geometry, geometry))


class OpenPacketSocketTests(SynchronousTestCase):
    """``open_packet_socket``: what the port's real system and ``--workers`` open (root only)."""

    def setUp(self) -> None:
        self.pair = VethPair.create(self)

    def test_bound_in_the_namespace(self) -> None:
        """The socket is a blocking raw packet socket bound to the interface and EtherType."""
        sock = open_packet_socket(self.pair.server_if, ETHERTYPE, self.pair.server_ns)
        self.addCleanup(sock.close)
        self.assertEqual((sock.family, sock.type), (socket.AF_PACKET, socket.SOCK_RAW))
        self.assertTrue(sock.getblocking())
        name = sock.getsockname()
        self.assertEqual((name[0], name[1]), (self.pair.server_if, ETHERTYPE))
        self.assertEqual(len(name[4]), 6)

    def test_no_such_namespace(self) -> None:
        """A missing namespace is ``ENOENT`` whose ``filename`` is its path."""
        with self.assertRaises(OSError) as caught:
            open_packet_socket(self.pair.server_if, ETHERTYPE, "aoe-t-no-such-namespace")
        self.assertEqual(caught.exception.errno, errno.ENOENT)
        self.assertEqual(caught.exception.filename, f"{NETNS_RUN_DIR}/aoe-t-no-such-namespace")

    def test_no_such_interface(self) -> None:
        """An interface missing from the namespace is ``ENODEV``; the socket is closed."""
        before = len(os.listdir("/proc/self/fd"))
        with self.assertRaises(OSError) as caught:
            open_packet_socket(self.pair.client_if, ETHERTYPE, self.pair.server_ns)
        self.assertEqual(caught.exception.errno, errno.ENODEV)
        self.assertIsNone(caught.exception.filename)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)


# -- the port -----------------------------------------------------------------


class AoEPortTestsMixin:
    """Shared set-up: a port on ``eth0`` of a fake system, on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem()
        self.interface = self.system.add_interface("eth0", mac=TARGET_MAC, mtu=1500)
        self.protocol = RecordingProtocol()
        self.port = AoEPort(
            "eth0", self.protocol, reactor=self.reactor, system=self.system, max_frames_per_read=8
        )

    def start(self) -> Any:
        """Start the port and return its fake socket."""
        self.port.startListening()
        return self.system.socket_for(self.port)


class AoEPortLifecycleTests(AoEPortTestsMixin, SynchronousTestCase):
    """Opening and closing the port."""

    def test_interface(self) -> None:
        """The port provides ``IListeningPort``."""
        self.assertTrue(verifyObject(IListeningPort, self.port))

    def test_start(self) -> None:
        """
        ``startListening`` opens a socket on the interface for EtherType 0x88A2,
        connects the protocol and registers the port with the reactor.
        """
        sock = self.start()
        self.assertEqual(sock.interface.name, "eth0")
        self.assertEqual(sock.ethertype, ETHERTYPE)
        self.assertTrue(self.port.connected)
        self.assertIs(self.protocol.transport, self.port)
        self.assertEqual(self.protocol.started, 1)
        self.assertIn(self.port, self.reactor.getReaders())
        self.assertEqual(self.port.fileno(), sock.fd)

    def test_learns_mac_and_mtu(self) -> None:
        """After ``startListening`` the port knows its interface's MAC and MTU."""
        self.interface.mtu = 9000
        self.start()
        self.assertEqual(self.port.mac, TARGET_MAC)
        self.assertEqual(self.port.mtu, 9000)
        self.assertEqual(self.port.getHost(), EthernetAddress("eth0", TARGET_MAC, 9000))
        self.assertEqual(str(self.port.getHost()), "eth0 (02:aa:00:00:00:01, MTU 9000)")

    def test_namespace(self) -> None:
        """With ``netns`` the socket is opened on that namespace's interface."""
        self.system.add_interface("eth0", mac=INITIATOR_MAC, netns="other")
        port = AoEPort("eth0", RecordingProtocol(), reactor=self.reactor, system=self.system,
                       netns="other")
        port.startListening()
        self.assertEqual(self.system.socket_for(port).netns, "other")
        self.assertEqual(port.mac, INITIATOR_MAC)

    def test_receive_buffer(self) -> None:
        """``receive_frames`` grows the receive buffer to hold that many full frames."""
        port = AoEPort("eth0", RecordingProtocol(), reactor=self.reactor, system=self.system,
                       receive_frames=1000)
        port.startListening()
        self.assertGreaterEqual(self.system.socket_for(port).receive_buffer, 1000 * 1500)

    def test_receive_buffer_clamped(self) -> None:
        """A receive buffer for more frames than a C ``int`` holds is asked for as the most."""
        port = AoEPort("eth0", RecordingProtocol(), reactor=self.reactor, system=self.system,
                       receive_frames=1_000_000)
        port.startListening()
        # MemoryPacketSystem records twice what was asked, as Linux reports it.
        self.assertEqual(self.system.socket_for(port).receive_buffer, 2 * MAX_RECEIVE_BUFFER)

    def test_receive_buffer_refused(self) -> None:
        """A receive buffer the kernel refuses is one warning; the port opens and serves."""
        system = _NoReceiveBufferSystem()
        system.add_interface("eth0", mac=TARGET_MAC)
        port = AoEPort("eth0", RecordingProtocol(), reactor=self.reactor, system=system,
                       receive_frames=1000)
        with capturedLogs() as events:
            port.startListening()
        self.assertTrue(port.bound)
        warnings = [e for e in events if "cannot grow the receive buffer" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["error"], "Operation not permitted")

    def assertOneLineError(self, expected: str, **kwargs: Any) -> CannotOpenInterface:
        """``startListening`` raises a one-line ``CannotOpenInterface`` saying ``expected``."""
        port = AoEPort(reactor=self.reactor, system=self.system, protocol=self.protocol, **kwargs)
        exc = self.assertRaises(CannotOpenInterface, port.startListening)
        self.assertIsInstance(exc, CannotListenError)
        self.assertEqual(str(exc), expected)
        self.assertNotIn("\n", str(exc))
        self.assertFalse(port.connected)
        self.assertIsNone(self.protocol.transport)
        self.assertEqual(self.reactor.getReaders(), [])
        return exc

    def test_no_such_interface(self) -> None:
        """A missing interface is one line naming it."""
        exc = self.assertOneLineError(
            "cannot open interface eth9: no such interface", interface="eth9"
        )
        self.assertEqual(exc.socketError.errno, errno.ENODEV)

    def test_no_privilege(self) -> None:
        """Without ``CAP_NET_RAW`` the error says so."""
        self.system.privileged = False
        self.assertOneLineError(
            "cannot open interface eth0: needs CAP_NET_RAW (run as root or grant the capability)",
            interface="eth0",
        )

    def test_no_such_namespace(self) -> None:
        """A missing network namespace is named as such, not as a missing interface."""
        self.assertOneLineError(
            "cannot open interface eth0 in network namespace nope: no such network namespace",
            interface="eth0",
            netns="nope",
        )

    def test_not_ethernet(self) -> None:
        """An interface without a 6-byte MAC (a tun device) is refused, and its socket closed."""
        self.system.add_interface("tun0", mac=b"")
        self.assertOneLineError(
            "cannot open interface tun0: not an Ethernet interface (no 6-byte MAC address)",
            interface="tun0",
        )
        self.assertTrue(all(sock.closed for sock in self.system.sockets.values()))

    def test_stop(self) -> None:
        """
        ``stopListening`` stops reading at once; the socket closes and the
        protocol stops on the next reactor turn, when the ``Deferred`` fires ``None``.
        """
        sock = self.start()
        d = self.port.stopListening()
        self.assertNotIn(self.port, self.reactor.getReaders())
        self.assertNoResult(d)
        self.reactor.advance(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(sock.closed)
        self.assertEqual(self.port.fileno(), -1)
        self.assertFalse(self.port.connected)
        self.assertEqual(self.protocol.stopped, 1)
        self.assertIsNone(self.protocol.transport)

    def test_stop_twice(self) -> None:
        """A second ``stopListening``, before or after the first completes, is harmless."""
        self.start()
        first = self.port.stopListening()
        second = self.port.stopListening()
        self.reactor.advance(0)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIsNone(self.successResultOf(self.port.stopListening()))
        self.assertEqual(self.protocol.stopped, 1)

    def test_stop_unstarted(self) -> None:
        """Stopping a port that never started succeeds at once."""
        self.assertIsNone(self.successResultOf(self.port.stopListening()))

    def test_repr(self) -> None:
        """The port's ``repr`` names its protocol, state and interface."""
        self.assertIn("not listening on eth0", repr(self.port))
        self.start()
        self.assertIn(" listening on eth0", repr(self.port))
        self.assertNotIn("not", repr(self.port))
        self.assertIn("RecordingProtocol", self.port.logPrefix())


class AoEPortReadTests(AoEPortTestsMixin, SynchronousTestCase):
    """``doRead``: from the socket to the protocol."""

    def test_delivers_in_order(self) -> None:
        """Every waiting frame reaches the protocol, whole, in order, with its address."""
        sock = self.start()
        frames = [ethernet_frame(bytes([i]) * 4, INITIATOR_MAC, TARGET_MAC) for i in range(3)]
        for frame in frames:
            self.interface.receive(frame)
        self.port.doRead()
        self.assertEqual([f for f, _ in self.protocol.frames], frames)
        self.assertEqual(self.protocol.frames[0][1][4], INITIATOR_MAC)
        self.assertEqual(len(sock.inbound), 0)
        self.assertEqual(self.port.frames_received, 3)

    def test_bounded(self) -> None:
        """One ``doRead`` takes at most ``max_frames_per_read`` frames; the next takes the rest."""
        sock = self.start()
        for i in range(11):
            self.interface.receive(ethernet_frame(bytes([i]), INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual(len(self.protocol.frames), 8)
        self.assertEqual(len(sock.inbound), 3)
        self.port.doRead()
        self.assertEqual(len(self.protocol.frames), 11)

    def test_retry_later_errors(self) -> None:
        """``EAGAIN``, ``EWOULDBLOCK`` and ``EINTR`` end the loop with no other effect."""
        sock = self.start()
        for code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            sock.recv_errors.append(OSError(code, "later"))
            self.interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, TARGET_MAC))
            self.port.doRead()
            self.assertEqual(len(sock.inbound), 1)
            self.port.doRead()
        self.assertEqual(len(self.protocol.frames), 3)
        self.assertTrue(self.port.connected)

    def test_interface_down(self) -> None:
        """``ENETDOWN`` (the interface went down) is logged; the port stays open."""
        sock = self.start()
        sock.recv_errors.append(OSError(errno.ENETDOWN, "Network is down"))
        with capturedLogs() as events:
            self.port.doRead()
        self.assertTrue(any("is down" in e["log_format"] for e in events))
        self.assertTrue(self.port.connected)

    def test_other_errors_raise(self) -> None:
        """Any other receive error propagates, so the reactor closes the port."""
        sock = self.start()
        sock.recv_errors.append(OSError(errno.EBADF, "Bad file descriptor"))
        self.assertRaises(OSError, self.port.doRead)

    def test_skips_outgoing(self) -> None:
        """Frames marked ``PACKET_OUTGOING`` (our own) never reach the protocol."""
        self.start()
        ours = ethernet_frame(config_request(), TARGET_MAC, INITIATOR_MAC)
        self.interface.receive(ours, pkttype=socket.PACKET_OUTGOING)
        self.interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual([f[:6] for f, _ in self.protocol.frames], [TARGET_MAC])
        self.assertEqual(self.port.frames_ignored, 1)

    def test_skips_other_hosts(self) -> None:
        """Frames for other stations (seen in promiscuous mode) never reach the protocol."""
        self.start()
        self.interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, OTHER_MAC))
        self.interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, BROADCAST_MAC))
        self.port.doRead()
        self.assertEqual([f[:6] for f, _ in self.protocol.frames], [BROADCAST_MAC])

    def test_accept_other_hosts(self) -> None:
        """With ``accept_other_hosts`` frames for other stations are passed on too."""
        self.port.accept_other_hosts = True
        self.start()
        self.interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, OTHER_MAC))
        self.port.doRead()
        self.assertEqual(len(self.protocol.frames), 1)

    def test_short_frames(self) -> None:
        """Frames shorter than 60 bytes (as Linux sends on virtio) are passed on unpadded."""
        self.start()
        frame = ethernet_frame(b"\x10" * 18, INITIATOR_MAC, TARGET_MAC)
        self.assertEqual(len(frame), 32)
        self.interface.receive(frame)
        self.port.doRead()
        self.assertEqual(self.protocol.frames[0][0], frame)

    def test_receive_size(self) -> None:
        """The receive size follows the MTU: a full jumbo frame arrives whole."""
        self.interface.mtu = 9000
        self.start()
        frame = ethernet_frame(b"x" * 9000, INITIATOR_MAC, TARGET_MAC)
        self.interface.receive(frame)
        self.port.doRead()
        self.assertEqual(self.protocol.frames[0][0], frame)

    def test_protocol_exception(self) -> None:
        """An exception from the protocol is logged and the following frames are still read."""
        self.start()
        self.protocol.raise_for = ethernet_frame(b"boom", INITIATOR_MAC, TARGET_MAC)
        self.interface.receive(ethernet_frame(b"boom", INITIATOR_MAC, TARGET_MAC))
        self.interface.receive(ethernet_frame(b"fine", INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual(len(self.protocol.frames), 1)
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(errors), 1)


class AoEPortWriteTests(AoEPortTestsMixin, SynchronousTestCase):
    """``write``: one frame per call, out through the socket."""

    def test_pads_short_frames(self) -> None:
        """A frame shorter than 60 bytes is padded with zeros to 60."""
        sock = self.start()
        frame = ethernet_frame(b"\x18" * 18, TARGET_MAC, INITIATOR_MAC)
        self.port.write(frame)
        self.assertEqual(sock.sent, [frame + bytes(MIN_FRAME_SIZE - len(frame))])

    def test_unpadded(self) -> None:
        """With ``pad_frames`` off (a peer acting like Linux on virtio) short frames go as is."""
        self.port.pad_frames = False
        sock = self.start()
        frame = ethernet_frame(b"\x18" * 18, TARGET_MAC, INITIATOR_MAC)
        self.port.write(frame)
        self.assertEqual(sock.sent, [frame])

    def test_one_frame_per_write(self) -> None:
        """Each ``write`` sends exactly one frame, long ones unchanged; nothing is buffered."""
        sock = self.start()
        frames = [ethernet_frame(bytes([i]) * 1000, TARGET_MAC, INITIATOR_MAC) for i in range(3)]
        for frame in frames:
            self.port.write(frame)
        self.assertEqual(sock.sent, frames)
        self.assertEqual(self.port.frames_sent, 3)

    def test_write_sequence(self) -> None:
        """``writeSequence`` sends its pieces joined as one frame."""
        sock = self.start()
        self.port.writeSequence([INITIATOR_MAC, TARGET_MAC, b"\x88\xa2", b"x" * 100])
        self.assertEqual(sock.sent, [INITIATOR_MAC + TARGET_MAC + b"\x88\xa2" + b"x" * 100])

    def test_eintr_retried(self) -> None:
        """A send interrupted by a signal is retried."""
        sock = self.start()
        sock.send_errors.append(OSError(errno.EINTR, "Interrupted"))
        self.port.write(ethernet_frame(b"x" * 100, TARGET_MAC, INITIATOR_MAC))
        self.assertEqual(len(sock.sent), 1)

    def test_no_buffer_space(self) -> None:
        """
        ``ENOBUFS`` and ``EAGAIN`` drop the frame: counted, logged at the 1st,
        2nd, 4th... drop, never raised (the initiator retransmits).
        """
        sock = self.start()
        with capturedLogs() as events:
            for i in range(5):
                sock.send_errors.append(OSError(errno.ENOBUFS if i % 2 else errno.EAGAIN, "full"))
                self.port.write(ethernet_frame(config_request(), TARGET_MAC, INITIATOR_MAC))
        self.assertEqual(sock.sent, [])
        self.assertEqual(self.port.frames_dropped, 5)
        counts = [e["count"] for e in events if "dropped" in e["log_format"]]
        self.assertEqual(counts, [1, 2, 4])

    def test_other_send_errors_raise(self) -> None:
        """A send error that is not transient (an oversize frame) raises."""
        self.start()
        exc = self.assertRaises(
            OSError, self.port.write, ethernet_frame(b"x" * 2000, TARGET_MAC, INITIATOR_MAC)
        )
        self.assertEqual(exc.errno, errno.EMSGSIZE)


class MaxSectorsTests(SynchronousTestCase):
    """``max_sectors_for_mtu``: what fits one frame."""

    def test_table(self) -> None:
        """2 at 1500, 17 at 9000, 1 at 576, never below 1, never above 255."""
        for mtu, sectors in [
            (1500, 2),
            (9000, 17),
            (576, 1),
            (534, 1),
            (533, 1),
            (68, 1),
            (1046, 2),
            (65535, 127),
            (1 << 20, 255),
        ]:
            self.assertEqual(max_sectors_for_mtu(mtu), sectors, f"MTU {mtu}")

    def test_fits(self) -> None:
        """The header, the ATA argument and the sectors fit the MTU whenever one sector does."""
        for mtu in range(534, 140000, 97):
            sectors = max_sectors_for_mtu(mtu)
            if sectors < 255:
                self.assertLessEqual(22 + 512 * sectors, mtu)
                self.assertGreater(22 + 512 * (sectors + 1), mtu)


# -- PACKET_MMAP rings ----------------------------------------------------------


class RingAoEPortTestsMixin(AoEPortTestsMixin):
    """The port on a fake system that offers rings: the same tests, through the ring walk."""

    def setUp(self) -> None:
        super().setUp()
        self.system.rings = True

    def start(self) -> Any:
        """Start the port, check it has rings, and return its fake socket."""
        sock = super().start()
        self.assertIsNotNone(sock.rings)  # type: ignore[attr-defined]
        self.assertIs(self.port._rings, sock.rings)  # type: ignore[attr-defined]
        return sock


class RingAoEPortReadTests(RingAoEPortTestsMixin, AoEPortReadTests):
    """``doRead`` from the RX ring: what ``recvfrom`` gave, without a system call per frame."""

    def test_delivers_in_order(self) -> None:
        """Frames arrive whole, in order, with the address ``recvfrom`` gives; slots go back."""
        sock = self.start()
        frames = [ethernet_frame(bytes([i]) * 4, INITIATOR_MAC, TARGET_MAC) for i in range(3)]
        for frame in frames:
            self.interface.receive(frame)
        self.port.doRead()
        self.assertEqual([f for f, _ in self.protocol.frames], frames)
        for _, addr in self.protocol.frames:
            self.assertEqual(addr, ("eth0", ETHERTYPE, socket.PACKET_HOST, 1, INITIATOR_MAC))
            self.assertIsInstance(_, bytes)
        self.assertEqual(self.port.frames_received, 3)
        rings = sock.rings
        self.assertFalse(any(rings.rx_ready(i) for i in range(len(rings.rx_offsets))))

    def test_bounded(self) -> None:
        """One ``doRead`` takes at most ``max_frames_per_read`` frames; the rest wait."""
        sock = self.start()
        for i in range(11):
            self.interface.receive(ethernet_frame(bytes([i]), INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual(len(self.protocol.frames), 8)
        self.assertEqual(sum(sock.rings.rx_ready(i) for i in range(len(sock.rings.rx_offsets))), 3)
        self.port.doRead()
        self.assertEqual([f[-1] for f, _ in self.protocol.frames], list(range(11)))

    def test_wraps_around(self) -> None:
        """The walk goes on from slot 0 after the last slot, for ever."""
        sock = self.start()
        slots = len(sock.rings.rx_offsets)
        for i in range(slots * 2 + 5):
            self.interface.receive(ethernet_frame(i.to_bytes(4, "big"), INITIATOR_MAC, TARGET_MAC))
            if i % 7 == 6:
                self.port.doRead()
        self.port.doRead()
        received = [int.from_bytes(f[14:18], "big") for f, _ in self.protocol.frames]
        self.assertEqual(received, list(range(slots * 2 + 5)))
        self.assertEqual(sock.rx_dropped, 0)

    def test_retry_later_errors(self) -> None:
        """An empty ring ends the drain with no system call at all (no ``EAGAIN`` read)."""
        sock = self.start()
        sock.recv_errors.append(OSError(errno.EBADF, "recvfrom must not be called"))
        self.port.doRead()
        self.interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual(len(self.protocol.frames), 1)
        self.assertEqual(len(sock.recv_errors), 1)

    def test_interface_down(self) -> None:
        """Nothing is read from the socket, so no receive error can close the port."""
        sock = self.start()
        sock.recv_errors.append(OSError(errno.ENETDOWN, "Network is down"))
        self.port.doRead()
        self.assertTrue(self.port.connected)

    def test_other_errors_raise(self) -> None:
        """(Receive errors do not apply to the ring: see ``test_retry_later_errors``.)"""
        self.start()
        self.port.doRead()
        self.assertTrue(self.port.connected)


class RingAoEPortWriteTests(RingAoEPortTestsMixin, AoEPortWriteTests):
    """``write`` through the TX ring: the same frames, sent at once outside a drain."""

    def test_one_send_per_write_outside_a_drain(self) -> None:
        """Outside a drain each ``write`` is flushed at once: nothing waits in the ring."""
        sock = self.start()
        for i in range(3):
            self.port.write(ethernet_frame(bytes([i]) * 100, TARGET_MAC, INITIATOR_MAC))
            self.assertEqual(len(sock.sent), i + 1)
        self.assertEqual(sock.flushes, 3)

    def test_ring_full_drops(self) -> None:
        """With every TX slot still queued, ``write`` drops the frame and counts it."""
        sock = self.start()
        sock.tx_stalled = True
        slots = len(sock.rings.tx_offsets)
        for _ in range(slots + 3):
            self.port.write(ethernet_frame(b"x" * 100, TARGET_MAC, INITIATOR_MAC))
        self.assertEqual(self.port.frames_sent, slots)
        self.assertEqual(self.port.frames_dropped, 3)
        sock.tx_stalled = False
        self.port.write(ethernet_frame(b"y" * 100, TARGET_MAC, INITIATOR_MAC))
        self.assertEqual(len(sock.sent), slots + 1)
        self.assertEqual(sock.sent[-1][14:15], b"y")


@implementer(IZeroCopyFrameSink)
class IntoProtocol(RecordingProtocol):
    """
    Answer every frame into the reply slot with ``reply_for(frame)``, as ``AoEProtocol`` does.

    ``keep`` keeps the views it was given (which the port must release);
    frames whose reply is ``b""`` are answered with ``write`` instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[memoryview] = []
        self.keep = False
        self.slots: list[memoryview | None] = []
        self.written_in_drain_finished: list[bytes] = []

    def reply_for(self, frame: bytes) -> bytes:
        return frame[6:12] + frame[:6] + frame[12:]

    def frameReceivedInto(self, frame: memoryview, reply: memoryview | None) -> int:
        data = bytes(frame)
        self.frames.append((data, None))
        self.slots.append(reply)
        if self.keep:
            self.kept.append(frame)
        answer = self.reply_for(data)
        if not answer.startswith(INITIATOR_MAC) or reply is None:
            assert self.transport is not None
            self.transport.write(answer)  # type: ignore[call-arg]
            return 0
        reply[: len(answer)] = answer
        return len(answer)

    def drainFinished(self) -> None:
        assert self.transport is not None
        for frame in self.written_in_drain_finished:
            self.transport.write(frame)  # type: ignore[call-arg]


class RingIntoTests(SynchronousTestCase):
    """A protocol with ``frameReceivedInto``: replies written straight into TX slots, batched."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem(rings=True)
        self.interface, self.peer = self.system.add_veth("eth0", "peer0", mtu=1500)
        self.interface.mac = TARGET_MAC
        self.peer.mac = INITIATOR_MAC
        self.peer_sock = self.system.sockets[self.system.open("peer0", ETHERTYPE)]
        self.protocol = IntoProtocol()
        self.port = AoEPort("eth0", self.protocol, reactor=self.reactor, system=self.system)
        self.port.startListening()
        self.sock = self.system.socket_for(self.port)

    @property
    def seen(self) -> list[bytes]:
        """The frames the peer has received."""
        return [frame for frame, _ in self.peer_sock.inbound]

    def test_replies_in_place(self) -> None:
        """Each reply goes out as written into the slot, in order, padded to 60 bytes."""
        frames = [ethernet_frame(bytes([i]) * 20, INITIATOR_MAC, TARGET_MAC) for i in range(5)]
        for frame in frames:
            self.interface.receive(frame)
        self.port.doRead()
        expected = [self.protocol.reply_for(f) for f in frames]
        self.assertEqual(self.seen, [e + bytes(MIN_FRAME_SIZE - len(e)) for e in expected])
        self.assertEqual(self.port.frames_sent, 5)
        self.assertTrue(all(isinstance(slot, memoryview) for slot in self.protocol.slots))

    def test_batched(self) -> None:
        """Replies are sent ``tx_batch`` at a time and at the end of the drain: few sends."""
        for i in range(20):
            self.interface.receive(ethernet_frame(bytes([i]) * 100, INITIATOR_MAC, TARGET_MAC))
        self.port.tx_batch = 8
        self.port.doRead()
        self.assertEqual(len(self.seen), 20)
        self.assertEqual(self.sock.flushes, 3)

    def test_general_path_writes_batched(self) -> None:
        """Replies the protocol writes (not into the slot) join the same batches, in order."""
        self.protocol.reply_for = lambda frame: (  # type: ignore[method-assign]
            (INITIATOR_MAC if frame[14] % 2 else OTHER_MAC) + frame[:6] + frame[12:]
        )
        for i in range(6):
            self.interface.receive(ethernet_frame(bytes([i]) * 100, INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual([f[14] for f in self.seen], list(range(6)))
        self.assertEqual(self.sock.flushes, 1)

    def test_drain_finished_writes_in_last_batch(self) -> None:
        """What ``drainFinished`` writes goes out with the drain's last batch."""
        late = ethernet_frame(b"late" * 20, TARGET_MAC, INITIATOR_MAC)
        self.protocol.written_in_drain_finished = [late]
        self.interface.receive(ethernet_frame(b"x" * 50, INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual(self.seen[-1], late)
        self.assertEqual(len(self.seen), 2)
        self.assertEqual(self.sock.flushes, 1)

    def test_views_released(self) -> None:
        """The frame's view is released when the call returns: a kept one cannot be read."""
        self.protocol.keep = True
        self.interface.receive(ethernet_frame(b"x" * 50, INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        [kept] = self.protocol.kept
        self.assertRaises(ValueError, bytes, kept)

    def test_tx_ring_full(self) -> None:
        """With no free TX slot the protocol gets ``None``; its written reply is dropped."""
        self.sock.tx_stalled = True
        slots = len(self.sock.rings.tx_offsets)
        for i in range(slots + 2):
            frame = ethernet_frame(i.to_bytes(2, "big") * 30, INITIATOR_MAC, TARGET_MAC)
            self.interface.receive(frame)
            self.port.doRead()
        self.assertIsNone(self.protocol.slots[-1])
        self.assertEqual(self.port.frames_sent, slots)
        self.assertEqual(self.port.frames_dropped, 2)

    def test_flush_errors(self) -> None:
        """A transient flush error counts a drop; the queued replies go with the next flush."""
        self.sock.send_errors.append(OSError(errno.ENOBUFS, "full"))
        self.interface.receive(ethernet_frame(b"a" * 50, INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual((self.seen, self.port.frames_dropped), ([], 1))
        self.interface.receive(ethernet_frame(b"b" * 50, INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual([f[14:15] for f in self.seen], [b"a", b"b"])

    def test_other_flush_errors_logged_in_a_drain(self) -> None:
        """Any other flush error in a drain is logged, not raised: the port stays open."""
        self.sock.send_errors.append(OSError(errno.EINVAL, "bad"))
        self.interface.receive(ethernet_frame(b"a" * 50, INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(self.port.connected)

    def test_close_releases(self) -> None:
        """Stopping the port releases the rings' views (unmapping is in ``tests.test_ring``)."""
        rings = self.port._rings
        assert rings is not None
        self.port.connectionLost(None)
        self.assertIsNone(self.port._rings)
        self.assertRaises(ValueError, bytes, rings.view)
        self.assertEqual(rings.tx_frames, [])


class RingSetupTests(SynchronousTestCase):
    """When the port uses rings, and how it falls back when it cannot."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem(rings=True)
        self.interface = self.system.add_interface("eth0", mac=TARGET_MAC, mtu=9000)
        self.protocol = RecordingProtocol()

    def port(self, **kwargs: Any) -> AoEPort:
        port = AoEPort("eth0", self.protocol, reactor=self.reactor, system=self.system, **kwargs)
        port.startListening()
        return port

    def test_geometry(self) -> None:
        """The RX ring holds ``receive_frames`` (at least 256), each slot a frame of the MTU."""
        port = self.port(receive_frames=1000)
        rings = port._rings
        assert rings is not None
        self.assertGreaterEqual(rings.rx.frame_nr, 1000)
        self.assertGreaterEqual(rings.tx.frame_nr, 256)
        self.assertGreaterEqual(rings.tx.frame_capacity(), 9000 + 14)

    def test_switched_off(self) -> None:
        """``rings=False`` keeps one system call per frame."""
        port = self.port(rings=False)
        self.assertIsNone(port._rings)
        self.interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, TARGET_MAC))
        self.assertEqual(len(self.system.socket_for(port).inbound), 1)

    def test_no_rings_on_offer(self) -> None:
        """A system that offers no rings (``map_rings`` gives ``None``): plain path, no warning."""
        self.system.rings = False
        with capturedLogs() as events:
            port = self.port()
        self.assertIsNone(port._rings)
        self.assertFalse(any("PACKET_MMAP" in e["log_format"] for e in events))

    def test_fallback(self) -> None:
        """If the kernel refuses a ring the port logs it once and reads frames one by one."""
        self.system.ring_errors.append(OSError(errno.EINVAL, "Invalid argument"))
        with capturedLogs() as events:
            port = self.port()
        self.assertIsNone(port._rings)
        warnings = [e for e in events if "no PACKET_MMAP rings" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, TARGET_MAC))
        port.doRead()
        self.assertEqual(len(self.protocol.frames), 1)
        port.write(ethernet_frame(config_request(), TARGET_MAC, INITIATOR_MAC))
        self.assertEqual(len(self.system.socket_for(port).sent), 1)

    def test_ring_size(self) -> None:
        """``ring_frames`` and ``ring_size`` say what the port's rings hold and map."""
        port = self.port(receive_frames=1000)
        rings = port._rings
        assert rings is not None
        self.assertEqual(port.ring_frames, rings.rx.frame_nr)
        self.assertEqual(port.ring_size, rings.rx.size + rings.tx.size)

    def test_ring_size_without_rings(self) -> None:
        """A port without rings maps nothing: ``ring_frames`` and ``ring_size`` are 0."""
        port = self.port(rings=False)
        self.assertEqual((port.ring_frames, port.ring_size), (0, 0))

    def test_ring_logged(self) -> None:
        """The port's opening line says how many receive slots and MiB its rings take."""
        with capturedLogs() as events:
            port = self.port(receive_frames=1000)
        (line,) = [e for e in events if e["log_format"].startswith("AoE port open")]
        self.assertIn(f"{port.ring_frames} receive slots", line["rings"])
        self.assertIn(f"{port.ring_size / (1 << 20):.1f} MiB", line["rings"])

    def test_oversize_write(self) -> None:
        """A frame longer than the MTU allows is refused with ``EMSGSIZE``, as ``send`` does."""
        port = self.port()
        frame = ethernet_frame(b"x" * 9001, TARGET_MAC, INITIATOR_MAC)
        exc = self.assertRaises(OSError, port.write, frame)
        self.assertEqual(exc.errno, errno.EMSGSIZE)
        self.assertEqual(port.frames_sent, 0)


@implementer_only(IPacketSystem)
class _NoRingSystem(MemoryPacketSystem):
    """A memory system that has ``map_rings`` but does not declare ``IRingPacketSystem``."""


class NoRingSystemTests(SynchronousTestCase):
    """A system is asked for rings only if it provides ``IRingPacketSystem``."""

    def test_undeclared_rings_unused(self) -> None:
        """A ``map_rings`` method alone does not count: one system call per frame."""
        system = _NoRingSystem(rings=True)
        self.assertTrue(verifyObject(IPacketSystem, system))
        self.assertFalse(IRingPacketSystem.providedBy(system))
        interface = system.add_interface("eth0", mac=TARGET_MAC)
        protocol = RecordingProtocol()
        port = AoEPort("eth0", protocol, reactor=MemoryReactorClock(), system=system)
        port.startListening()
        self.assertIsNone(port._rings)
        self.assertIsNone(system.socket_for(port).rings)
        interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, TARGET_MAC))
        port.doRead()
        self.assertEqual(len(protocol.frames), 1)


class _UndeclaredProtocol(RecordingProtocol):
    """
    Has ``drainFinished`` and ``frameReceivedInto`` methods but declares no frame-sink interface.

    The port must treat it as a plain datagram protocol: it goes by what a
    protocol declares, never by the methods it happens to have.
    """

    def __init__(self) -> None:
        super().__init__()
        self.drains = 0
        self.into_calls = 0

    def drainFinished(self) -> None:
        self.drains += 1

    def frameReceivedInto(self, frame: memoryview, reply: memoryview | None) -> int:
        self.into_calls += 1
        return 0


@implementer(IFrameSink)
class _SinkProtocol(_UndeclaredProtocol):
    """Declares ``IFrameSink`` only: told where drains end, fed with copies."""


class FrameSinkTests(SynchronousTestCase):
    """What the port calls depends on what the protocol provides, on both paths."""

    def port(self, protocol: RecordingProtocol, rings: bool) -> tuple[AoEPort, Any]:
        """Start a port on a fake ``eth0`` (with or without rings) for ``protocol``."""
        system = MemoryPacketSystem(rings=rings)
        interface = system.add_interface("eth0", mac=TARGET_MAC)
        port = AoEPort("eth0", protocol, reactor=MemoryReactorClock(), system=system)
        port.startListening()
        self.assertEqual(port._rings is not None, rings)
        return port, interface

    def check_neither(self, rings: bool) -> None:
        """Providing neither interface: ``datagramReceived`` with bytes, no ``drainFinished``."""
        protocol = _UndeclaredProtocol()
        self.assertFalse(IFrameSink.providedBy(protocol))
        port, interface = self.port(protocol, rings)
        for i in range(3):
            interface.receive(ethernet_frame(bytes([i]) * 20, INITIATOR_MAC, TARGET_MAC))
        port.doRead()
        self.assertEqual(len(protocol.frames), 3)
        self.assertTrue(all(type(frame) is bytes for frame, _ in protocol.frames))
        self.assertEqual((protocol.drains, protocol.into_calls), (0, 0))

    def test_neither(self) -> None:
        """Neither interface, one system call per frame."""
        self.check_neither(rings=False)

    def test_neither_rings(self) -> None:
        """Neither interface, frames from the RX ring."""
        self.check_neither(rings=True)

    def check_sink(self, rings: bool) -> None:
        """An ``IFrameSink``: ``drainFinished`` once per drain with frames; copies, not views."""
        protocol = _SinkProtocol()
        self.assertTrue(verifyObject(IFrameSink, protocol))
        self.assertFalse(IZeroCopyFrameSink.providedBy(protocol))
        port, interface = self.port(protocol, rings)
        for i in range(3):
            interface.receive(ethernet_frame(bytes([i]) * 20, INITIATOR_MAC, TARGET_MAC))
        port.doRead()
        self.assertEqual((len(protocol.frames), protocol.drains), (3, 1))
        port.doRead()
        self.assertEqual(protocol.drains, 1)
        self.assertEqual(protocol.into_calls, 0)

    def test_sink(self) -> None:
        """``IFrameSink``, one system call per frame."""
        self.check_sink(rings=False)

    def test_sink_rings(self) -> None:
        """``IFrameSink``, frames from the RX ring."""
        self.check_sink(rings=True)

    def test_zero_copy_sink(self) -> None:
        """An ``IZeroCopyFrameSink`` (``IntoProtocol``) provides both interfaces."""
        protocol = IntoProtocol()
        self.assertTrue(verifyObject(IZeroCopyFrameSink, protocol))
        self.assertTrue(verifyObject(IFrameSink, protocol))

    def test_zero_copy_sink_without_rings(self) -> None:
        """Without rings an ``IZeroCopyFrameSink`` gets ``datagramReceived``, ``drainFinished``."""
        protocol = IntoProtocol()
        late = ethernet_frame(b"late" * 20, TARGET_MAC, INITIATOR_MAC)
        protocol.written_in_drain_finished = [late]
        port, interface = self.port(protocol, rings=False)
        interface.receive(ethernet_frame(b"x" * 50, INITIATOR_MAC, TARGET_MAC))
        port.doRead()
        self.assertEqual(len(protocol.frames), 1)
        self.assertEqual(protocol.slots, [])
        self.assertEqual(port.frames_sent, 1)


class AdoptTests(SynchronousTestCase):
    """``socket_fd``: a port on a packet socket opened (and bound) by someone else."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem()
        self.interface = self.system.add_interface("eth0", mac=TARGET_MAC, mtu=9000)
        self.protocol = RecordingProtocol()

    def test_adopts(self) -> None:
        """The port uses the given socket: no other is opened; MAC and MTU are learnt from it."""
        fd = self.system.open("eth0", ETHERTYPE)
        port = AoEPort("eth0", self.protocol, reactor=self.reactor, system=self.system,
                       socket_fd=fd)  # fmt: skip
        port.startListening()
        self.assertEqual(port.fileno(), fd)
        self.assertEqual(list(self.system.sockets), [fd])
        self.assertEqual((port.mac, port.mtu), (TARGET_MAC, 9000))
        self.interface.receive(ethernet_frame(config_request(), INITIATOR_MAC, TARGET_MAC))
        port.doRead()
        self.assertEqual(len(self.protocol.frames), 1)
        port.connectionLost(None)
        self.assertTrue(self.system.sockets[fd].closed)

    def test_adopts_with_rings(self) -> None:
        """An adopted socket gets its rings as an opened one does."""
        self.system.rings = True
        fd = self.system.open("eth0", ETHERTYPE)
        port = AoEPort("eth0", self.protocol, reactor=self.reactor, system=self.system,
                       socket_fd=fd)  # fmt: skip
        port.startListening()
        self.assertIsNotNone(port._rings)

    def test_bad_descriptor(self) -> None:
        """A descriptor that is not an open packet socket: ``CannotOpenInterface`` (EBADF)."""
        port = AoEPort("eth0", self.protocol, reactor=self.reactor, system=self.system,
                       socket_fd=77)  # fmt: skip
        exc = self.assertRaises(CannotOpenInterface, port.startListening)
        self.assertEqual(exc.socketError.errno, errno.EBADF)
        self.assertFalse(port.connected)


def _fanout_socket(pair: VethPair, group: int) -> socket.socket:
    """Open a packet socket on the server end, bind it and join fanout ``group`` (hash mode)."""
    sock = open_packet_socket(pair.server_if, ETHERTYPE, pair.server_ns)
    sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | PACKET_FANOUT_HASH << 16)
    return sock


class RealRingPortTests(SynchronousTestCase):
    """Rings on real ``AF_PACKET`` sockets on a veth pair (root only)."""

    def setUp(self) -> None:
        self.pair = VethPair.create(self)
        self.reactor = MemoryReactorClock()
        self.client = AoEPort(self.pair.client_if, RecordingProtocol(), reactor=self.reactor,
                              netns=self.pair.client_ns, rings=False)  # fmt: skip
        self.client.startListening()
        self.addCleanup(self.client.connectionLost, None)

    def exchange(self, port: AoEPort, protocol: IntoProtocol) -> None:
        """Send 40 frames to ``port``, let it answer them in place, and check the replies."""
        assert self.client.mac is not None and port.mac is not None
        frames = [ethernet_frame(bytes([i]) * 100, self.client.mac, port.mac) for i in range(40)]
        protocol.reply_for = lambda frame: frame[6:12] + frame[:6] + frame[12:]  # type: ignore[method-assign]
        for frame in frames:
            self.client.write(frame)
        deadline = time.monotonic() + 5
        while port.frames_received < 40 and time.monotonic() < deadline:
            port.doRead()
            time.sleep(0.001)
        self.assertEqual([f for f, _ in protocol.frames], frames)
        client_protocol = self.client.protocol
        assert isinstance(client_protocol, RecordingProtocol)
        while len(client_protocol.frames) < 40 and time.monotonic() < deadline:
            self.client.doRead()
            time.sleep(0.001)
        self.assertEqual(
            [f for f, _ in client_protocol.frames], [protocol.reply_for(f) for f in frames]
        )

    def test_rings(self) -> None:
        """A port on a real socket gets rings, and frames go both ways through them."""
        protocol = IntoProtocol()
        port = AoEPort(self.pair.server_if, protocol, reactor=self.reactor,
                       netns=self.pair.server_ns)  # fmt: skip
        port.startListening()
        self.addCleanup(port.connectionLost, None)
        self.assertIsNotNone(port._rings)
        self.exchange(port, protocol)

    def test_adopted_fanout_socket(self) -> None:
        """
        A socket already in a ``PACKET_FANOUT`` group, adopted by fd, gets rings and serves.
        """
        sock = _fanout_socket(self.pair, 0x4242)
        protocol = IntoProtocol()
        port = AoEPort(self.pair.server_if, protocol, reactor=self.reactor,
                       socket_fd=sock.detach())  # fmt: skip
        port.startListening()
        self.addCleanup(port.connectionLost, None)
        self.assertIsNotNone(port._rings)
        self.assertEqual(port.mtu, self.pair.mtu)
        self.exchange(port, protocol)

    def test_worker_restarted_on_the_same_socket(self) -> None:
        """
        A port adopting a socket a previous port had rings on (as a restarted
        worker adopts its predecessor's) gets rings again and serves.
        """
        sock = _fanout_socket(self.pair, 0x4343)
        self.addCleanup(sock.close)
        first = AoEPort(self.pair.server_if, IntoProtocol(), reactor=self.reactor,
                        socket_fd=os.dup(sock.fileno()))  # fmt: skip
        first.startListening()
        self.assertIsNotNone(first._rings)
        first.connectionLost(None)
        protocol = IntoProtocol()
        port = AoEPort(self.pair.server_if, protocol, reactor=self.reactor,
                       socket_fd=os.dup(sock.fileno()))  # fmt: skip
        port.startListening()
        self.addCleanup(port.connectionLost, None)
        self.assertIsNotNone(port._rings)
        self.exchange(port, protocol)


class RingMisuseTests(RingIntoTests):
    """A protocol that breaks the ``frameReceivedInto`` contract is reported."""

    def test_both_slot_and_write(self) -> None:
        """Writing a frame and also a reply into the slot (the same one) is logged, sent once."""
        into = self.protocol.frameReceivedInto

        def both(frame: memoryview, reply: memoryview | None) -> int:
            assert self.protocol.transport is not None
            self.protocol.transport.write(ethernet_frame(b"w" * 50, TARGET_MAC, INITIATOR_MAC))  # type: ignore[call-arg]
            return into(frame, reply)

        self.protocol.frameReceivedInto = both  # type: ignore[method-assign]
        self.interface.receive(ethernet_frame(b"x" * 50, INITIATOR_MAC, TARGET_MAC))
        self.port.doRead()
        [error] = self.flushLoggedErrors(RuntimeError)
        self.assertIn("as well", str(error.value))
        self.assertEqual(len(self.seen), 1)
        self.assertEqual(self.port.frames_sent, 1)
