"""
Tests for ``aoe_twisted.port``: the raw Ethernet port, and the fake system its tests use.

The packet-system contract runs twice, as Twisted's tuntap tests do: against
``MemoryPacketSystem`` and against real ``AF_PACKET`` sockets on a veth pair
(root only).  The port tests then rely on the fake, proven equivalent by it.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from aoe_twisted.port import (
    AoEPort,
    CannotOpenInterface,
    EthernetAddress,
    _IPacketSystem,
    _RealPacketSystem,
    max_sectors_for_mtu,
)
from aoe_twisted.testing import MemoryPacketSystem
from aoe_twisted.wire import BROADCAST_MAC, ETHERTYPE, MIN_FRAME_SIZE
from tests.netns import VethPair

SERVER_MAC = bytes.fromhex("02aa00000001")
HOST_MAC = bytes.fromhex("020000000001")
OTHER_MAC = bytes.fromhex("020000000009")


def aoe_frame(
    dst: bytes, src: bytes, body: bytes = b"\x10" * 18, ethertype: int = ETHERTYPE
) -> bytes:
    """Return an unpadded Ethernet frame of ``ethertype`` carrying ``body``."""
    return dst + src + ethertype.to_bytes(2, "big") + body


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
    What every ``_IPacketSystem`` does, fake or real.

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
        """The system provides ``_IPacketSystem``."""
        self.assertTrue(verifyObject(_IPacketSystem, self.system))  # type: ignore[attr-defined]

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
        frame = aoe_frame(self.mac_b, self.mac_a)
        self.assertEqual(self.system.send(self.a, frame), len(frame))  # type: ignore[attr-defined]
        data, addr = receive(self.system, self.b)
        self.assertEqual(data, frame)  # type: ignore[attr-defined]
        self.assertEqual(addr[0], self.if_b)  # type: ignore[attr-defined]
        self.assertEqual(addr[1], ETHERTYPE)  # type: ignore[attr-defined]
        self.assertEqual(addr[2], socket.PACKET_HOST)  # type: ignore[attr-defined]
        self.assertEqual(addr[4], self.mac_a)  # type: ignore[attr-defined]

    def test_packet_types(self) -> None:
        """Broadcast and other hosts' frames arrive too, marked as such; forged sources are kept."""
        self.system.send(self.a, aoe_frame(BROADCAST_MAC, self.mac_a))
        self.system.send(self.a, aoe_frame(OTHER_MAC, HOST_MAC))
        first = receive(self.system, self.b)[1]
        second = receive(self.system, self.b)[1]
        self.assertEqual(first[2], socket.PACKET_BROADCAST)  # type: ignore[attr-defined]
        self.assertEqual(second[2], socket.PACKET_OTHERHOST)  # type: ignore[attr-defined]
        self.assertEqual(second[4], HOST_MAC)  # type: ignore[attr-defined]

    def test_own_frames_and_other_ethertypes_filtered(self) -> None:
        """A socket does not see its own frames, nor frames of another EtherType."""
        self.system.send(self.a, aoe_frame(self.mac_b, self.mac_a, ethertype=0x88B5))
        frame = aoe_frame(self.mac_b, self.mac_a)
        self.system.send(self.a, frame)
        self.assertEqual(receive(self.system, self.b)[0], frame)  # type: ignore[attr-defined]
        for fd in (self.a, self.b):
            with self.assertRaises(OSError):  # type: ignore[attr-defined]
                self.system.recvfrom(fd, 2048)

    def test_oversize(self) -> None:
        """A frame longer than the MTU plus the Ethernet header is refused with ``EMSGSIZE``."""
        with self.assertRaises(OSError) as caught:  # type: ignore[attr-defined]
            self.system.send(self.a, aoe_frame(self.mac_b, self.mac_a, b"x" * 1501))
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
        system = _RealPacketSystem()
        return system, (pair.server_ns, pair.server_if), (pair.client_ns, pair.client_if)

    def test_real_class(self) -> None:
        """``_RealPacketSystem`` implements the whole interface."""
        self.assertTrue(verifyClass(_IPacketSystem, _RealPacketSystem))


# -- the port -----------------------------------------------------------------


class AoEPortTestsMixin:
    """Shared set-up: a port on ``eth0`` of a fake system, on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem()
        self.interface = self.system.add_interface("eth0", mac=SERVER_MAC, mtu=1500)
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
        self.assertEqual(self.port.mac, SERVER_MAC)
        self.assertEqual(self.port.mtu, 9000)
        self.assertEqual(self.port.getHost(), EthernetAddress("eth0", SERVER_MAC, 9000))
        self.assertEqual(str(self.port.getHost()), "eth0 (02:aa:00:00:00:01, MTU 9000)")

    def test_namespace(self) -> None:
        """With ``netns`` the socket is opened on that namespace's interface."""
        self.system.add_interface("eth0", mac=HOST_MAC, netns="other")
        port = AoEPort("eth0", RecordingProtocol(), reactor=self.reactor, system=self.system,
                       netns="other")
        port.startListening()
        self.assertEqual(self.system.socket_for(port).netns, "other")
        self.assertEqual(port.mac, HOST_MAC)

    def test_receive_buffer(self) -> None:
        """``receive_frames`` grows the receive buffer to hold that many full frames."""
        port = AoEPort("eth0", RecordingProtocol(), reactor=self.reactor, system=self.system,
                       receive_frames=1000)
        port.startListening()
        self.assertGreaterEqual(self.system.socket_for(port).receive_buffer, 1000 * 1500)

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
        frames = [aoe_frame(SERVER_MAC, HOST_MAC, bytes([i]) * 4) for i in range(3)]
        for frame in frames:
            self.interface.receive(frame)
        self.port.doRead()
        self.assertEqual([f for f, _ in self.protocol.frames], frames)
        self.assertEqual(self.protocol.frames[0][1][4], HOST_MAC)
        self.assertEqual(len(sock.inbound), 0)
        self.assertEqual(self.port.frames_received, 3)

    def test_bounded(self) -> None:
        """One ``doRead`` takes at most ``max_frames_per_read`` frames; the next takes the rest."""
        sock = self.start()
        for i in range(11):
            self.interface.receive(aoe_frame(SERVER_MAC, HOST_MAC, bytes([i])))
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
            self.interface.receive(aoe_frame(SERVER_MAC, HOST_MAC))
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
        self.interface.receive(aoe_frame(HOST_MAC, SERVER_MAC), pkttype=socket.PACKET_OUTGOING)
        self.interface.receive(aoe_frame(SERVER_MAC, HOST_MAC))
        self.port.doRead()
        self.assertEqual([f[:6] for f, _ in self.protocol.frames], [SERVER_MAC])
        self.assertEqual(self.port.frames_ignored, 1)

    def test_skips_other_hosts(self) -> None:
        """Frames for other stations (seen in promiscuous mode) never reach the protocol."""
        self.start()
        self.interface.receive(aoe_frame(OTHER_MAC, HOST_MAC))
        self.interface.receive(aoe_frame(BROADCAST_MAC, HOST_MAC))
        self.port.doRead()
        self.assertEqual([f[:6] for f, _ in self.protocol.frames], [BROADCAST_MAC])

    def test_accept_other_hosts(self) -> None:
        """With ``accept_other_hosts`` frames for other stations are passed on too."""
        self.port.accept_other_hosts = True
        self.start()
        self.interface.receive(aoe_frame(OTHER_MAC, HOST_MAC))
        self.port.doRead()
        self.assertEqual(len(self.protocol.frames), 1)

    def test_short_frames(self) -> None:
        """Frames shorter than 60 bytes (as Linux sends on virtio) are passed on unpadded."""
        self.start()
        frame = aoe_frame(SERVER_MAC, HOST_MAC, b"\x10" * 18)
        self.assertEqual(len(frame), 32)
        self.interface.receive(frame)
        self.port.doRead()
        self.assertEqual(self.protocol.frames[0][0], frame)

    def test_receive_size(self) -> None:
        """The receive size follows the MTU: a full jumbo frame arrives whole."""
        self.interface.mtu = 9000
        self.start()
        frame = aoe_frame(SERVER_MAC, HOST_MAC, b"x" * 9000)
        self.interface.receive(frame)
        self.port.doRead()
        self.assertEqual(self.protocol.frames[0][0], frame)

    def test_protocol_exception(self) -> None:
        """An exception from the protocol is logged and the following frames are still read."""
        self.start()
        self.protocol.raise_for = SERVER_MAC + HOST_MAC + b"\x88\xa2boom"
        self.interface.receive(aoe_frame(SERVER_MAC, HOST_MAC, b"boom"))
        self.interface.receive(aoe_frame(SERVER_MAC, HOST_MAC, b"fine"))
        self.port.doRead()
        self.assertEqual(len(self.protocol.frames), 1)
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(errors), 1)


class AoEPortWriteTests(AoEPortTestsMixin, SynchronousTestCase):
    """``write``: one frame per call, out through the socket."""

    def test_pads_short_frames(self) -> None:
        """A frame shorter than 60 bytes is padded with zeros to 60."""
        sock = self.start()
        frame = aoe_frame(HOST_MAC, SERVER_MAC, b"\x18" * 18)
        self.port.write(frame)
        self.assertEqual(sock.sent, [frame + bytes(MIN_FRAME_SIZE - len(frame))])

    def test_unpadded(self) -> None:
        """With ``pad_frames`` off (a peer acting like Linux on virtio) short frames go as is."""
        self.port.pad_frames = False
        sock = self.start()
        frame = aoe_frame(HOST_MAC, SERVER_MAC, b"\x18" * 18)
        self.port.write(frame)
        self.assertEqual(sock.sent, [frame])

    def test_one_frame_per_write(self) -> None:
        """Each ``write`` sends exactly one frame, long ones unchanged; nothing is buffered."""
        sock = self.start()
        frames = [aoe_frame(HOST_MAC, SERVER_MAC, bytes([i]) * 1000) for i in range(3)]
        for frame in frames:
            self.port.write(frame)
        self.assertEqual(sock.sent, frames)
        self.assertEqual(self.port.frames_sent, 3)

    def test_write_sequence(self) -> None:
        """``writeSequence`` sends its pieces joined as one frame."""
        sock = self.start()
        self.port.writeSequence([HOST_MAC, SERVER_MAC, b"\x88\xa2", b"x" * 100])
        self.assertEqual(sock.sent, [HOST_MAC + SERVER_MAC + b"\x88\xa2" + b"x" * 100])

    def test_eintr_retried(self) -> None:
        """A send interrupted by a signal is retried."""
        sock = self.start()
        sock.send_errors.append(OSError(errno.EINTR, "Interrupted"))
        self.port.write(aoe_frame(HOST_MAC, SERVER_MAC, b"x" * 100))
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
                self.port.write(aoe_frame(HOST_MAC, SERVER_MAC))
        self.assertEqual(sock.sent, [])
        self.assertEqual(self.port.frames_dropped, 5)
        counts = [e["count"] for e in events if "dropped" in e["log_format"]]
        self.assertEqual(counts, [1, 2, 4])

    def test_other_send_errors_raise(self) -> None:
        """A send error that is not transient (an oversize frame) raises."""
        self.start()
        exc = self.assertRaises(
            OSError, self.port.write, aoe_frame(HOST_MAC, SERVER_MAC, b"x" * 2000)
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
