"""
Tests for ``aoe_twisted.initiator.client``: the initiator against real targets on a fake network.

The targets are the project's own sans-IO core (``Dispatcher`` over
``Target`` over ``MemoryBackend``); ``FakeNetwork`` carries frames between
them and the client protocol on a ``MemoryReactorClock``, with a latency,
and can drop or hold frames.  No sockets, no real time: every test is
deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.identify import build_identify
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ETHERTYPE,
    VERSION,
    ATAArg,
    Command,
    ConfigArg,
    Error,
    EthernetFrame,
    Header,
)
from aoe_twisted.initiator.client import (
    CLIENT_TAG_BIT,
    AoEClient,
    AoEClientError,
    AoEClientProtocol,
    AoEProtocolError,
    AoETimeout,
    ATAError,
    BadReply,
    RemoteDisk,
    RetryPolicy,
    TargetInfo,
    TargetNotFound,
    parse_identify,
)
from aoe_twisted.interfaces import IIdentifier
from aoe_twisted.testing import INITIATOR_MAC, ethernet_frame

MiB = 1 << 20


def mac(n: int) -> bytes:
    """Return a locally administered unicast MAC ending in ``n``."""
    return bytes.fromhex("02bb000000") + bytes([n])


@define(eq=False)
class FakeHost:
    """
    One server on the fake segment: a ``Dispatcher`` with the targets it exports.

    ``outstanding`` counts requests it is working on (received, reply not yet
    sent); ``peak`` is the most there ever were.  A request arriving while
    ``outstanding`` is already the buffer count is dropped and counted in
    ``overflowed``, as AoEr11 lets a target do.  ``silent`` hosts receive
    but never answer.
    """

    dispatcher: Dispatcher
    buffer_count: int
    outstanding: int = 0
    peak: int = 0
    overflowed: int = 0
    silent: bool = False
    requests: list[Header] = field(factory=list)


@define(eq=False, slots=False)
class FakeNetwork:
    """
    An Ethernet segment in memory between one client protocol and some ``FakeHost``s.

    It is the protocol's transport (``write``, ``mac``, ``mtu``).  Each
    request is handed to every host it is addressed to; replies come back
    ``latency`` seconds later on ``clock``.  ``drop_request`` and
    ``drop_reply`` decide, per decoded message, whether the frame is lost;
    ``reply_delay`` may give a reply its own delay.
    """

    clock: MemoryReactorClock
    hosts: list[FakeHost] = field(factory=list)
    latency: float = 0.001
    mtu: int = 1500
    mac: bytes = INITIATOR_MAC
    drop_request: Callable[[Header], bool] = lambda header: False
    drop_reply: Callable[[Header], bool] = lambda header: False
    reply_delay: Callable[[Header], float | None] = lambda header: None
    sent: list[Header] = field(factory=list)
    frames: list[bytes] = field(factory=list)
    protocol: AoEClientProtocol | None = None

    def connect(self, retry: RetryPolicy | None = None) -> AoEClientProtocol:
        """Make the client protocol and connect it to this network."""
        self.protocol = AoEClientProtocol(self.clock, retry, first_tag=0)
        self.protocol.makeConnection(self)  # type: ignore[arg-type]
        return self.protocol

    def add_host(self, n: int, *targets: Target) -> FakeHost:
        """Add a server with MAC ``mac(n)`` exporting ``targets``."""
        for target in targets:
            target.max_sectors = min(target.max_sectors, (self.mtu - 22) // 512)
        host = FakeHost(Dispatcher(mac(n), list(targets)), targets[0].buffer_count)
        self.hosts.append(host)
        return host

    def write(self, frame: bytes) -> None:
        """Carry one frame from the client to the hosts it is addressed to."""
        self.frames.append(frame)
        ethernet = EthernetFrame.from_bytes(frame)
        header = Header.from_bytes(ethernet.payload)
        self.sent.append(header)
        if self.drop_request(header):
            return
        for host in self.hosts:
            if ethernet.dst not in (BROADCAST_MAC, host.dispatcher.mac):
                continue
            host.requests.append(header)
            if host.silent:
                continue
            if host.outstanding >= host.buffer_count:
                host.overflowed += 1
                continue
            replies = host.dispatcher.serve(frame)
            if not replies:
                continue
            host.outstanding += 1
            host.peak = max(host.peak, host.outstanding)
            self.clock.callLater(self.latency, self._sent_by, host, replies)

    def _sent_by(self, host: FakeHost, replies: list[bytes]) -> None:
        """The host finished a request: put its replies on the wire."""
        host.outstanding -= 1
        for reply in replies:
            header = Header.from_bytes(EthernetFrame.from_bytes(reply).payload)
            if self.drop_reply(header):
                continue
            delay = self.reply_delay(header)
            if delay:
                self.clock.callLater(delay, self.deliver, reply)
            else:
                self.deliver(reply)

    def deliver(self, frame: bytes) -> None:
        """Hand a frame to the client protocol as the port would."""
        assert self.protocol is not None
        self.protocol.datagramReceived(frame, None)


def make_target(
    shelf: int,
    slot: int,
    size: int = MiB,
    *,
    buffer_count: int = 16,
    max_sectors: int = 2,
    config: bytes = b"",
    identifier: Any = None,
) -> Target:
    """A target with a memory disk of ``size`` bytes."""
    return Target(
        shelf,
        slot,
        MemoryBackend(size),
        acl=MemoryACLStore(config_string=config),
        buffer_count=buffer_count,
        max_sectors=max_sectors,
        identifier=identifier,
    )


def run(clock: MemoryReactorClock, d: Deferred[Any], limit: float = 3600.0) -> Deferred[Any]:
    """
    Advance ``clock`` from one scheduled call to the next until ``d`` has fired.

    Stops if nothing is scheduled any more (a hang: the test then finds ``d``
    unfired) or the clock passes ``limit`` seconds.
    """
    while not d.called:
        calls = clock.getDelayedCalls()
        if not calls:
            break
        when = min(call.getTime() for call in calls)
        if when > limit:
            break
        clock.advance(max(0.0, when - clock.seconds()))
    return d


def pattern(length: int, seed: int = 1) -> bytes:
    """``length`` bytes that differ from sector to sector."""
    return bytes((i * 7 + seed + i // 512) & 0xFF for i in range(length))


def ata_requests(headers: list[Header]) -> list[ATAArg]:
    """The ATA arguments among ``headers``, IDENTIFY left out."""
    return [h.arg for h in headers if isinstance(h.arg, ATAArg) and h.arg.cmd_status != 0xEC]


@implementer(IIdentifier)
class LBA28Identifier:
    """An IDENTIFY page without LBA48: the size is in words 60-61 only."""

    def __init__(self, sectors: int) -> None:
        page = bytearray(build_identify(sectors, model="old disk"))
        page[83 * 2 + 1] &= ~0x04 & 0xFF  # clear word 83 bit 10
        page[100 * 2 : 104 * 2] = bytes(8)
        self.page = bytes(page)

    def identify(self) -> bytes:
        return self.page


class ClientTestCase(SynchronousTestCase):
    """A fake network with helpers to open targets on it."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = FakeNetwork(self.clock)

    def connect(self, retry: RetryPolicy | None = None) -> AoEClient:
        return AoEClient(self.net.connect(retry), interface="fake0")

    def open_disk(
        self, client: AoEClient, shelf: int = 1, slot: int = 0, **kwargs: Any
    ) -> RemoteDisk:
        disk: RemoteDisk = self.successResultOf(run(self.clock, client.open(shelf, slot, **kwargs)))
        return disk

    def assertNoTimersLeft(self) -> None:
        """Nothing is scheduled any more: no request left behind."""
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DiscoveryTests(ClientTestCase):
    """``AoEClient.discover``: a broadcast query, every answer, then IDENTIFY."""

    def test_several_targets(self) -> None:
        """Every target on every host is found with its config and its size."""
        self.net.add_host(
            1,
            make_target(1, 0, 4 * MiB, buffer_count=8, config=b"one"),
            make_target(1, 1, 2 * MiB, buffer_count=4),
        )
        self.net.add_host(2, make_target(2, 5, 1 * MiB, buffer_count=32, max_sectors=1))
        client = self.connect()
        found = self.successResultOf(run(self.clock, client.discover(timeout=1.0)))
        self.assertEqual(
            [
                (t.name, t.mac, t.buffer_count, t.sector_count, t.config_string, t.size)
                for t in found
            ],
            [
                ("e1.0", mac(1), 8, 2, b"one", 4 * MiB),
                ("e1.1", mac(1), 4, 2, b"", 2 * MiB),
                ("e2.5", mac(2), 32, 1, b"", 1 * MiB),
            ],
        )
        self.assertTrue(all(t.lba48 for t in found))
        self.assertEqual(found[0].firmware_version, 1)
        self.assertEqual(found[0].model, "aoe-twisted")
        self.assertEqual(found[0].serial, "1.0")
        self.assertNoTimersLeft()

    def test_query_is_broadcast_with_client_tag(self) -> None:
        """The query goes to everyone (ff:ff.., shelf 0xffff, slot 0xff) with tag bit 31 set."""
        self.net.add_host(1, make_target(1, 0))
        client = self.connect()
        run(self.clock, client.discover(timeout=1.0, identify=False))
        query = self.net.sent[0]
        self.assertEqual(EthernetFrame.from_bytes(self.net.frames[0]).dst, BROADCAST_MAC)
        self.assertEqual((query.major, query.minor), (BROADCAST_MAJOR, BROADCAST_MINOR))
        self.assertEqual(query.command, Command.QUERY_CONFIG_INFORMATION)
        self.assertTrue(int.from_bytes(query.tag, "big") & CLIENT_TAG_BIT)

    def test_lost_query_is_repeated(self) -> None:
        """The query is sent twice in the wait, so one lost broadcast hides no target."""
        self.net.add_host(1, make_target(1, 0))
        lost = []

        def drop_first(header: Header) -> bool:
            if header.command == Command.QUERY_CONFIG_INFORMATION and not lost:
                lost.append(header)
                return True
            return False

        self.net.drop_request = drop_first
        client = self.connect()
        found = self.successResultOf(run(self.clock, client.discover(timeout=1.0)))
        self.assertEqual([t.name for t in found], ["e1.0"])

    def test_duplicate_answers_listed_once(self) -> None:
        """A target that answers both copies of the query is listed once."""
        self.net.add_host(1, make_target(1, 0))
        client = self.connect()
        found = self.successResultOf(run(self.clock, client.discover(identify=False)))
        self.assertEqual(len([h for h in self.net.sent if h.command == 1]), 2)
        self.assertEqual(len(found), 1)

    def test_nobody_answers(self) -> None:
        """With no target the result is an empty list after the timeout, not a hang."""
        client = self.connect()
        d = run(self.clock, client.discover(timeout=1.5))
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(self.clock.seconds(), 1.5)
        self.assertNoTimersLeft()

    def test_sector_count_zero_means_two(self) -> None:
        """A config reply with sector count 0 is read as 2 (AoEr11 section 3.2)."""
        client = self.connect()
        d = client.discover(timeout=1.0, identify=False)
        tag = self.net.sent[0].tag
        reply = Header(
            VERSION,
            True,
            False,
            0,
            7,
            3,
            Command.QUERY_CONFIG_INFORMATION,
            tag,
            ConfigArg(10, 0x4019, 0, VERSION, 0, 2, b"hi"),
        )
        self.net.deliver(ethernet_frame(reply.to_bytes(), mac(9), INITIATOR_MAC))
        [info] = self.successResultOf(run(self.clock, d))
        self.assertEqual(
            (
                info.name,
                info.sector_count,
                info.buffer_count,
                info.config_string,
                info.firmware_version,
                info.size,
            ),
            ("e7.3", 2, 10, b"hi", 0x4019, None),
        )

    def test_foreign_and_wildcard_replies_ignored(self) -> None:
        """
        Replies with the kernel's tags (bit 31 clear), from wildcard addresses,
        requests, other EtherTypes and garbage are not targets.
        """
        client = self.connect()
        d = client.discover(timeout=1.0, identify=False)
        tag = self.net.sent[0].tag
        config = ConfigArg(10, 1, 2, VERSION, 0, 0, b"")

        def frame(header: Header, ethertype: int = ETHERTYPE) -> bytes:
            return ethernet_frame(header.to_bytes(), mac(9), INITIATOR_MAC, ethertype)

        reply = Header(VERSION, True, False, 0, 7, 3, Command.QUERY_CONFIG_INFORMATION, tag, config)
        kernel_tag = Header(VERSION, True, False, 0, 7, 3, 1, bytes(4), config)
        wildcard = Header(VERSION, True, False, 0, 0xFFFF, 3, 1, tag, config)
        request = Header(VERSION, False, False, 0, 7, 3, 1, tag, config)
        for junk in (
            frame(kernel_tag),
            frame(wildcard),
            frame(request),
            frame(reply, ethertype=0x0800),
            b"\x00" * 20,
            frame(reply)[:20],
        ):
            self.net.deliver(junk)
        self.assertEqual(self.successResultOf(run(self.clock, d)), [])
        self.assertEqual(client.protocol.ignored, 6)

    def test_identify_unanswered(self) -> None:
        """A target that answers the query but not IDENTIFY is listed without a size."""
        self.net.add_host(1, make_target(1, 0))
        self.net.drop_request = lambda h: h.command == Command.ISSUE_ATA_COMMAND
        client = self.connect(RetryPolicy(0.5, 1.0, 1))
        [info] = self.successResultOf(run(self.clock, client.discover()))
        self.assertIsNone(info.size)
        self.assertEqual(info.name, "e1.0")


class OpenTests(ClientTestCase):
    """``AoEClient.open``: find one target by address."""

    def test_open(self) -> None:
        """The target at the address answers; its MAC, limits and size are known."""
        self.net.add_host(1, make_target(1, 0, 3 * MiB, buffer_count=5))
        self.net.add_host(2, make_target(1, 1))
        disk = self.open_disk(self.connect(), 1, 0)
        self.assertEqual(
            (disk.name, disk.info.mac, disk.window, disk.size, disk.sectors),
            ("e1.0", mac(1), 5, 3 * MiB, 3 * MiB // 512),
        )
        query = self.net.sent[0]
        self.assertEqual((query.major, query.minor), (1, 0))

    def test_not_found(self) -> None:
        """No target at the address: ``TargetNotFound`` after the retries, naming it."""
        self.net.add_host(1, make_target(1, 0))
        client = self.connect(RetryPolicy(0.5, 2.0, 2))
        failure = self.failureResultOf(run(self.clock, client.open(3, 4)), TargetNotFound)
        self.assertEqual(str(failure.value), "e3.4: no such AoE target answered on fake0")
        self.assertEqual(len(self.net.sent), 3)
        self.assertNoTimersLeft()

    def test_lba28_size(self) -> None:
        """Without LBA48 in IDENTIFY word 83 the size comes from words 60-61."""
        self.net.add_host(1, make_target(1, 0, MiB, identifier=LBA28Identifier(2048)))
        disk = self.open_disk(self.connect())
        self.assertEqual((disk.size, disk.info.lba48, disk.info.model), (MiB, False, "old disk"))


class ReadWriteTests(ClientTestCase):
    """``RemoteDisk.read``/``write``: frames of the sector count, commands, data."""

    def test_round_trip(self) -> None:
        """What is written reads back, and sits on the target's disk."""
        target = make_target(1, 0)
        self.net.add_host(1, target)
        disk = self.open_disk(self.connect())
        data = pattern(20 * 512)
        self.assertIsNone(self.successResultOf(run(self.clock, disk.write(100, data))))
        self.assertEqual(self.successResultOf(run(self.clock, disk.read(100, 20))), data)
        self.assertEqual(target.backend.read(100 * 512, len(data)), data)

    def test_split_into_sector_count_frames(self) -> None:
        """Seven sectors at a sector count of 2 go as 2+2+2+1, 48-bit, E flag, W for writes."""
        self.net.add_host(1, make_target(1, 0))
        disk = self.open_disk(self.connect())
        self.assertEqual(disk.sectors_per_frame, 2)
        before = len(self.net.sent)
        run(self.clock, disk.write(10, pattern(7 * 512)))
        writes = ata_requests(self.net.sent[before:])
        self.assertEqual(
            [(a.lba, a.sector_count) for a in writes], [(10, 2), (12, 2), (14, 2), (16, 1)]
        )
        self.assertTrue(
            all(a.cmd_status == 0x34 and a.flag_lba48_extended and a.flag_write for a in writes)
        )
        self.assertEqual([len(a.data) for a in writes], [1024, 1024, 1024, 512])
        before = len(self.net.sent)
        run(self.clock, disk.read(10, 7))
        reads = ata_requests(self.net.sent[before:])
        self.assertEqual(
            [(a.lba, a.sector_count, a.cmd_status) for a in reads],
            [(10, 2, 0x24), (12, 2, 0x24), (14, 2, 0x24), (16, 1, 0x24)],
        )
        self.assertTrue(all(a.flag_lba48_extended and not a.flag_write for a in reads))

    def test_mtu_limits_frame(self) -> None:
        """A target's sector count above what the MTU carries is cut to the MTU's."""
        self.net.mtu = 9000
        self.net.add_host(1, make_target(1, 0, max_sectors=17))
        self.net.mtu = 1500
        disk = self.open_disk(self.connect())
        self.assertEqual((disk.info.sector_count, disk.sectors_per_frame), (17, 2))

    def test_jumbo_frames(self) -> None:
        """At MTU 9000 a frame carries 17 sectors."""
        self.net.mtu = 9000
        self.net.add_host(1, make_target(1, 0, max_sectors=255))
        disk = self.open_disk(self.connect())
        self.assertEqual(disk.sectors_per_frame, 17)
        data = pattern(40 * 512)
        run(self.clock, disk.write(0, data))
        self.assertEqual(self.successResultOf(run(self.clock, disk.read(0, 40))), data)
        self.assertEqual([a.sector_count for a in ata_requests(self.net.sent)[-3:]], [17, 17, 6])

    def test_lba28_when_asked(self) -> None:
        """
        With ``use_lba28`` a transfer below 2**28 uses READ/WRITE SECTORS (0x20/0x30)
        without the E flag and with 0xE0 in LBA byte 3, as Linux sends them.
        """
        target = make_target(1, 0)
        self.net.add_host(1, target)
        disk = self.open_disk(self.connect(), use_lba28=True)
        data = pattern(3 * 512)
        before = len(self.net.sent)
        run(self.clock, disk.write(5, data))
        self.assertEqual(self.successResultOf(run(self.clock, disk.read(5, 3))), data)
        sent = ata_requests(self.net.sent[before:])
        self.assertEqual(
            [(a.cmd_status, a.flag_lba48_extended, a.lba) for a in sent],
            [
                (0x30, False, 0xE0000005),
                (0x30, False, 0xE0000007),
                (0x20, False, 0xE0000005),
                (0x20, False, 0xE0000007),
            ],
        )
        self.assertEqual(target.backend.read(5 * 512, len(data)), data)

    def test_lba28_only_target(self) -> None:
        """A target without LBA48 gets 28-bit commands without being asked."""
        self.net.add_host(1, make_target(1, 0, identifier=LBA28Identifier(2048)))
        disk = self.open_disk(self.connect())
        run(self.clock, disk.read(0, 1))
        [arg] = ata_requests(self.net.sent)
        self.assertEqual((arg.cmd_status, arg.flag_lba48_extended), (0x20, False))
        self.assertRaises(ValueError, disk.read, (1 << 28) - 1, 2)

    def test_unaligned_bytes(self) -> None:
        """``write_at``/``read_at`` handle byte ranges inside and across sectors."""
        target = make_target(1, 0)
        self.net.add_host(1, target)
        disk = self.open_disk(self.connect())
        background = pattern(8 * 512, seed=3)
        run(self.clock, disk.write(0, background))
        message = b"hello, AoE" * 100
        run(self.clock, disk.write_at(700, message))
        expected = background[:700] + message + background[700 + len(message) :]
        self.assertEqual(target.backend.read(0, 8 * 512), expected)
        self.assertEqual(
            self.successResultOf(run(self.clock, disk.read_at(700, len(message)))), message
        )
        self.assertEqual(self.successResultOf(run(self.clock, disk.read_at(3, 2))), background[3:5])

    def test_zero_and_bad_lengths(self) -> None:
        """Nothing to do fires at once; a partial sector or negative LBA is a ValueError."""
        self.net.add_host(1, make_target(1, 0))
        disk = self.open_disk(self.connect())
        self.assertEqual(self.successResultOf(disk.read(0, 0)), b"")
        self.assertIsNone(self.successResultOf(disk.write(0, b"")))
        self.assertRaises(ValueError, disk.write, 0, b"x" * 100)
        self.assertRaises(ValueError, disk.read, -1, 1)

    def test_flush_and_identify(self) -> None:
        """``flush`` sends FLUSH CACHE EXT; ``identify`` returns the page."""
        self.net.add_host(1, make_target(1, 0, 2 * MiB))
        disk = self.open_disk(self.connect())
        self.assertIsNone(self.successResultOf(run(self.clock, disk.flush())))
        self.assertEqual(self.net.sent[-1].arg.cmd_status, 0xEA)
        page = self.successResultOf(run(self.clock, disk.identify()))
        self.assertEqual(parse_identify(page).size, 2 * MiB)

    def test_progress(self) -> None:
        """The progress callback hears every frame's bytes, adding up to the transfer."""
        self.net.add_host(1, make_target(1, 0))
        disk = self.open_disk(self.connect())
        seen: list[int] = []
        run(self.clock, disk.read(0, 9, seen.append))
        self.assertEqual(seen, [1024] * 4 + [512])


class WindowTests(ClientTestCase):
    """At most ``min(buffer count, max_in_flight)`` requests are in flight to a target."""

    def test_never_exceeds_buffer_count(self) -> None:
        """A long read keeps exactly the buffer count in flight, never more."""
        host = self.net.add_host(1, make_target(1, 0, buffer_count=4))
        self.net.latency = 0.01
        disk = self.open_disk(self.connect())
        data = self.successResultOf(run(self.clock, disk.read(0, 200)))
        self.assertEqual(len(data), 200 * 512)
        self.assertEqual(
            (disk.window, disk.peak_in_flight, host.peak, host.overflowed), (4, 4, 4, 0)
        )
        self.assertEqual(self.net.protocol.retransmits, 0)

    def test_cap(self) -> None:
        """A large buffer count is capped at ``max_in_flight``."""
        host = self.net.add_host(1, make_target(1, 0, buffer_count=500))
        disk = self.open_disk(self.connect(), max_in_flight=8)
        run(self.clock, disk.write(0, pattern(100 * 512)))
        self.assertEqual((disk.window, disk.peak_in_flight, host.peak), (8, 8, 8))

    def test_shared_between_operations(self) -> None:
        """Concurrent reads and writes on one disk share its window."""
        host = self.net.add_host(1, make_target(1, 0, buffer_count=3))
        disk = self.open_disk(self.connect())
        ops = [disk.read(0, 30), disk.write(100, pattern(30 * 512)), disk.read(200, 11)]
        for op in ops:
            run(self.clock, op)
            self.successResultOf(op)
        self.assertEqual((disk.peak_in_flight, host.peak, host.overflowed), (3, 3, 0))
        self.assertEqual(disk.in_flight, 0)

    def test_in_flight_at_protocol(self) -> None:
        """The protocol never has more outstanding tags than the window."""
        self.net.add_host(1, make_target(1, 0, buffer_count=6))
        client = self.connect()
        disk = self.open_disk(client)
        seen = []
        original = self.net.write

        def record(frame: bytes) -> None:
            seen.append(client.protocol.in_flight)
            original(frame)

        self.net.write = record  # type: ignore[method-assign]
        run(self.clock, disk.read(0, 100))
        self.assertEqual(max(seen), 6)


class CloseTests(ClientTestCase):
    """``AoEClient.close``: what is in flight and what is queued fails at once."""

    def test_queued_operation_fails(self) -> None:
        """
        An operation queued behind a full window fails when the client closes, rather
        than being sent on the closed port and retried there until its retries run
        out; no retransmission timer is left.
        """
        target = make_target(1, 0, buffer_count=1)
        self.net.add_host(1, target)
        client = self.connect(RetryPolicy(0.5, 4.0, 4))
        disk = self.open_disk(client)
        self.net.latency = 1.0
        first = disk.read(0, 1)  # in flight: the window is 1
        second = disk.read(8, 1)  # queued
        sent = len(self.net.sent)
        client.close()
        self.net.protocol.closing = True
        self.net.protocol.doStop()  # the port stops, as it does after close()
        self.failureResultOf(first, AoEClientError)
        self.failureResultOf(second, AoEClientError)
        self.assertEqual(len(self.net.sent), sent)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()
                          and getattr(c.func, "__name__", "") == "_expire_due"], [])


class LossTests(ClientTestCase):
    """Lost frames are sent again with new tags; a silent target times out."""

    def test_dropped_requests_retransmitted(self) -> None:
        """Every third request frame is lost; the read still returns the right data."""
        target = make_target(1, 0)
        self.net.add_host(1, target)
        client = self.connect()
        disk = self.open_disk(client)
        data = pattern(64 * 512)
        target.backend.write(0, data)
        count = [0]

        def every_third(header: Header) -> bool:
            count[0] += 1
            return count[0] % 3 == 0

        self.net.drop_request = every_third
        before = len(self.net.sent)
        self.assertEqual(self.successResultOf(run(self.clock, disk.read(0, 64))), data)
        sent = self.net.sent[before:]
        tags = [int.from_bytes(h.tag, "big") for h in sent]
        self.assertEqual(len(set(tags)), len(tags), "a retransmission reused a tag")
        self.assertTrue(all(tag & CLIENT_TAG_BIT for tag in tags))
        self.assertGreater(client.protocol.retransmits, 0)
        self.assertEqual(len(sent), 32 + client.protocol.retransmits)
        # Every chunk of the read went out at least once more after each loss.
        lbas = sorted(h.arg.lba for h in sent)
        self.assertEqual(sorted(set(lbas)), list(range(0, 64, 2)))
        self.assertNoTimersLeft()

    def test_dropped_replies(self) -> None:
        """Lost write acknowledgements: the writes are retransmitted and the data is right."""
        target = make_target(1, 0)
        self.net.add_host(1, target)
        client = self.connect()
        disk = self.open_disk(client)
        count = [0]

        def every_other(header: Header) -> bool:
            count[0] += 1
            return count[0] % 2 == 0

        self.net.drop_reply = every_other
        data = pattern(16 * 512, seed=9)
        self.assertIsNone(self.successResultOf(run(self.clock, disk.write(8, data))))
        self.assertEqual(target.backend.read(8 * 512, len(data)), data)
        self.assertGreater(client.protocol.retransmits, 0)

    def test_backoff_and_new_tag(self) -> None:
        """A lost frame is resent after 0.5 s, then 1 s, 2 s: each time with a new tag."""
        self.net.add_host(1, make_target(1, 0))
        client = self.connect(RetryPolicy(0.5, 4.0, 4))
        disk = self.open_disk(client)
        start = self.clock.seconds()
        drops = [3]
        times: list[float] = []

        def lose_three(header: Header) -> bool:
            times.append(self.clock.seconds() - start)
            drops[0] -= 1
            return drops[0] >= 0

        self.net.drop_request = lose_three
        d = run(self.clock, disk.read(0, 1))
        self.successResultOf(d)
        self.assertEqual([round(t, 6) for t in times], [0.0, 0.5, 1.5, 3.5])
        tags = [h.tag for h in self.net.sent[-4:]]
        self.assertEqual(len(set(tags)), 4)

    def test_late_reply_ignored(self) -> None:
        """
        A reply slower than the timeout arrives after its tag was retired: it is
        counted as stale and ignored, and the retransmission's reply completes the read.
        """
        self.net.add_host(1, make_target(1, 0))
        client = self.connect(RetryPolicy(0.5, 4.0, 4))
        disk = self.open_disk(client)
        slow = [True]

        def first_slow(header: Header) -> float | None:
            if slow:
                slow.pop()
                return 0.8
            return None

        self.net.reply_delay = first_slow
        completions: list[bytes] = []
        d = disk.read(0, 1)
        d.addCallback(lambda data: completions.append(data) or data)
        run(self.clock, d)
        self.successResultOf(d)
        self.assertEqual(len(completions), 1)
        self.assertEqual(client.protocol.retransmits, 1)
        run(self.clock, Deferred())  # let the late reply arrive
        self.assertEqual(client.protocol.stale_replies, 1)
        self.assertEqual(len(completions), 1)

    def test_silent_target_times_out(self) -> None:
        """
        A target that stops answering fails the read with ``AoETimeout`` after
        the first try and every retry (0.5+1+2+4+4 s), leaving nothing scheduled.
        """
        host = self.net.add_host(1, make_target(1, 0))
        disk = self.open_disk(self.connect())
        host.silent = True
        start = self.clock.seconds()
        before = len(self.net.sent)
        failure = self.failureResultOf(run(self.clock, disk.read(0, 1)), AoETimeout)
        self.assertAlmostEqual(self.clock.seconds() - start, 11.5)
        self.assertEqual(len(self.net.sent) - before, 5)
        self.assertEqual(failure.value.attempts, 5)
        self.assertEqual(
            str(failure.value),
            "e1.0: timed out: no answer to read of LBA 0+1 after 5 tries in 11.5 s",
        )
        self.assertNoTimersLeft()

    def test_long_read_fails_fast(self) -> None:
        """
        A long read from a dead target fails once, when the first frames time
        out: the frames still queued are never sent.
        """
        host = self.net.add_host(1, make_target(1, 0, buffer_count=4))
        disk = self.open_disk(self.connect(RetryPolicy(0.5, 1.0, 2)))
        host.silent = True
        start = self.clock.seconds()
        before = len(self.net.sent)
        self.failureResultOf(run(self.clock, disk.read(0, 1000)), AoETimeout)
        self.assertAlmostEqual(self.clock.seconds() - start, 0.5 + 1 + 1)
        self.assertEqual(len(self.net.sent) - before, 4 * 3)
        self.assertEqual(disk.in_flight, 0)
        self.assertNoTimersLeft()
        # The disk is still usable once the target is back.
        host.silent = False
        self.successResultOf(run(self.clock, disk.read(0, 4)))

    def test_cancel(self) -> None:
        """Cancelling an operation abandons its frames; their replies are stale."""
        self.net.add_host(1, make_target(1, 0, buffer_count=4))
        self.net.latency = 0.1
        client = self.connect()
        disk = self.open_disk(client)
        d = disk.read(0, 100)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual((disk.in_flight, client.protocol.in_flight), (0, 0))
        run(self.clock, Deferred())
        self.assertEqual(client.protocol.stale_replies, 4)
        self.assertNoTimersLeft()


class ErrorTests(ClientTestCase):
    """ATA and AoE errors become exceptions that say which."""

    def test_idnf(self) -> None:
        """Reading past the end of the disk: ``ATAError`` with IDNF."""
        self.net.add_host(1, make_target(1, 0, MiB))
        disk = self.open_disk(self.connect())
        failure = self.failureResultOf(run(self.clock, disk.read(2047, 2)), ATAError)
        error = failure.value
        self.assertEqual((error.status, error.error, error.names), (0x41, 0x10, ("IDNF",)))
        self.assertEqual(
            str(error),
            "e1.0: read of LBA 2047+2 failed: ATA error IDNF (sector not found: address out "
            "of range) [status 0x41, error 0x10]",
        )

    def test_abrt_and_unc_named(self) -> None:
        """Each error bit is named in the message."""
        self.assertIn("ABRT (command aborted)", str(ATAError(0x41, 0x04, "e1.0", "write")))
        self.assertIn("UNC (uncorrectable data error)", str(ATAError(0x41, 0x40)))
        self.assertEqual(ATAError(0x41, 0x54).names, ("ABRT", "IDNF", "UNC"))

    def test_reserved(self) -> None:
        """A target reserved by another host answers error 6: ``AoEProtocolError``."""
        target = make_target(1, 0)
        self.net.add_host(1, target)
        disk = self.open_disk(self.connect())
        target.acl.set_reserve_list((mac(99),))
        failure = self.failureResultOf(run(self.clock, disk.write(0, bytes(512))), AoEProtocolError)
        self.assertEqual(failure.value.code, Error.TARGET_IS_RESERVED)
        self.assertEqual(
            str(failure.value),
            "e1.0: write of LBA 0+1 refused: AoE error 6 (target is reserved by another host)",
        )
        self.assertEqual(target.backend.read(0, 512), bytes(512))

    def test_unknown_aoe_error(self) -> None:
        """An error number AoEr11 does not define is still reported, as a number."""
        self.assertEqual(
            str(AoEProtocolError(77, "e1.0", "read")),
            "e1.0: read refused: AoE error 77 (unknown error)",
        )

    def test_short_read_reply(self) -> None:
        """A read reply with fewer bytes than asked for fails with ``BadReply``."""
        self.net.add_host(1, make_target(1, 0))
        disk = self.open_disk(self.connect())
        original = self.net.deliver

        def truncate(frame: bytes) -> None:
            original(frame[: 14 + 22 + 512])

        self.net.deliver = truncate  # type: ignore[method-assign]
        failure = self.failureResultOf(run(self.clock, disk.read(0, 2)), BadReply)
        self.assertIn("carried 512 bytes, expected 1024", str(failure.value))


class IdentifyParsingTests(SynchronousTestCase):
    """``parse_identify`` reads the size as the Linux driver does."""

    def test_lba48(self) -> None:
        identity = parse_identify(build_identify(1 << 40, serial="S1", model="M"))
        self.assertEqual(
            (identity.sectors, identity.lba48, identity.serial, identity.model),
            (1 << 40, True, "S1", "M"),
        )

    def test_lba28(self) -> None:
        identity = parse_identify(LBA28Identifier(12345).identify())
        self.assertEqual((identity.sectors, identity.lba48), (12345, False))

    def test_short(self) -> None:
        self.assertRaises(BadReply, parse_identify, bytes(100))

    def test_target_info_name(self) -> None:
        info = TargetInfo(12, 3, mac(1), 16, 2, 1, b"")
        self.assertEqual(info.name, "e12.3")


class RetryPolicyTests(SynchronousTestCase):
    """``RetryPolicy`` checks itself and lists its waits."""

    def test_timeouts(self) -> None:
        self.assertEqual(RetryPolicy().timeouts(), [0.5, 1.0, 2.0, 4.0, 4.0])
        self.assertEqual(RetryPolicy(1.0, 1.0, 0).timeouts(), [1.0])

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, RetryPolicy, 0)
        self.assertRaises(ValueError, RetryPolicy, 1.0, 0.5)
        self.assertRaises(ValueError, RetryPolicy, 1.0, 2.0, -1)


class TagTests(SynchronousTestCase):
    """Tags have bit 31 set and are never reused while outstanding."""

    def test_wraps_and_skips_outstanding(self) -> None:
        clock = MemoryReactorClock()
        net = FakeNetwork(clock)
        protocol = net.connect()
        protocol._counter = 0x7FFF_FFFE
        first = protocol.request(mac(1), 1, 0, Command.QUERY_CONFIG_INFORMATION, ConfigArg())
        protocol._counter = 0x7FFF_FFFD
        second = protocol.request(mac(1), 1, 0, Command.QUERY_CONFIG_INFORMATION, ConfigArg())
        third = protocol.request(mac(1), 1, 0, Command.QUERY_CONFIG_INFORMATION, ConfigArg())
        tags = [int.from_bytes(h.tag, "big") for h in net.sent]
        self.assertEqual(tags, [0xFFFF_FFFF, 0xFFFF_FFFE, 0x8000_0000])
        for d in (first, second, third):
            d.cancel()
            self.failureResultOf(d)
