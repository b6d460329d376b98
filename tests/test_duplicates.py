"""
Tests for ``DuplicateWatch``: another server answering for an address we serve.

The other server is a real core ``Dispatcher`` with a ``Target`` on a memory
disk, answering the frames the watch sends with genuine config and IDENTIFY
replies; its disk identity decides whether it is a second path (the same
identity) or a duplicate (another, or none).  Hand-made replies (the codec)
cover the error answers a healthy target never gives.
"""

from __future__ import annotations

from attrs import evolve
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.duplicates import (
    MAX_ASKING,
    Duplicate,
    DuplicateWatch,
    SecondPath,
)
from aoe_twisted.core.identify import DefaultIdentifier, page_identity
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    ETHERTYPE,
    SECTOR_SIZE,
    VERSION,
    ATAArg,
    ATACmdStatus,
    ATAError,
    Command,
    ConfigArg,
    ConfigCommand,
    EthernetFrame,
    Header,
    RawArg,
)
from tests import strategies

SHELF = 7
SLOT = 3
ADDRESS = (SHELF, SLOT)
SECTORS = 64
#: Our interface, the other server's, a third server's, and our own second interface.
OURS = bytes.fromhex("02aa00000001")
THEIRS = bytes.fromhex("02bb00000002")
THIRD = bytes.fromhex("02cc00000003")
SIBLING = bytes.fromhex("02aa00000002")
#: A host that is neither: an initiator on the segment.
HOST = bytes.fromhex("020000000009")
DISK_A = b"dev=2049 ino=12"
DISK_B = b"dev=2049 ino=13"


def identifier(identity: bytes | None, serial: str | None = None) -> DefaultIdentifier:
    """Return the IDENTIFY a target gives a ``SECTORS`` disk of ``identity`` (none: no WWN)."""
    return DefaultIdentifier.for_disk(
        SECTORS, identity, serial=serial, fallback_serial=f"{SHELF}.{SLOT}"
    )


def page(identity: bytes | None, serial: str | None = None) -> bytes:
    """Return the IDENTIFY page of a ``SECTORS`` disk of ``identity``."""
    return identifier(identity, serial).identify()


def other_server(
    identity: bytes | None,
    mac: bytes = THEIRS,
    mask: tuple[bytes, ...] = (),
    serial: str | None = None,
) -> Dispatcher:
    """Return another server at ``mac`` serving e7.3 on a disk of ``identity``."""
    target = Target(
        SHELF,
        SLOT,
        MemoryBackend(SECTORS * SECTOR_SIZE),
        acl=MemoryACLStore(mask_list=mask),
        identifier=identifier(identity, serial),
    )
    return Dispatcher(mac, [target])


def exchange(
    watch: DuplicateWatch, servers: list[Dispatcher], frames: list[bytes], now: float = 0.0
) -> list[Duplicate | SecondPath]:
    """
    Deliver ``frames`` (and everything they lead to) between ``watch`` and ``servers``.

    A frame goes to each server it is addressed to (broadcast: all); every
    reply goes back to ``watch``.  Returns every verdict, in order.
    """
    verdicts: list[Duplicate | SecondPath] = []
    while frames:
        frame = frames.pop(0)
        dst = frame[:6]
        for server in servers:
            if dst in (server.mac, BROADCAST_MAC):
                for reply in server.serve(frame):
                    sent, found = watch.frame_received(reply, now)
                    frames.extend(sent)
                    verdicts.extend(found)
    return verdicts


def response(
    src: bytes,
    command: int,
    arg: object,
    *,
    tag: bytes = bytes(4),
    address: tuple[int, int] = ADDRESS,
    flag_response: bool = True,
    flag_error: bool = False,
    error: int = 0,
    dst: bytes = OURS,
) -> bytes:
    """Return an AoE message from ``src`` built with the codec, padded as servers send it."""
    header = Header(
        VERSION, flag_response, flag_error, error, address[0], address[1], command, tag, arg  # type: ignore[arg-type]
    )
    return EthernetFrame(dst, src, ETHERTYPE, header.to_bytes()).to_bytes(pad=True)


def config_reply(src: bytes = THEIRS, **kwargs: object) -> bytes:
    """Return a config read reply (an announcement, with the default tag 0) from ``src``."""
    arg = ConfigArg(16, 1, 255, VERSION, ConfigCommand.READ, 0, b"")
    return response(src, Command.QUERY_CONFIG_INFORMATION, arg, **kwargs)  # type: ignore[arg-type]


def decode(frame: bytes) -> tuple[EthernetFrame, Header]:
    """Return a frame and its AoE message, decoded."""
    ethernet = EthernetFrame.from_bytes(frame)
    return ethernet, Header.from_bytes(ethernet.payload)


def asked(watch: DuplicateWatch, src: bytes = THEIRS, now: float = 0.0) -> Header:
    """Show ``watch`` an announcement from ``src``; return the IDENTIFY request it sends."""
    frames, verdicts = watch.frame_received(config_reply(src), now)
    assert verdicts == [], verdicts
    assert len(frames) == 1, frames
    return decode(frames[0])[1]


def identify_reply(request: Header, arg: object, src: bytes = THEIRS, **kwargs: object) -> bytes:
    """Return a reply to the IDENTIFY ``request`` from ``src`` carrying ``arg``."""
    return response(
        src, Command.ISSUE_ATA_COMMAND, arg, tag=request.tag, **kwargs  # type: ignore[arg-type]
    )


class ProbeTests(SynchronousTestCase):
    """``watch`` returns the probe: a broadcast config read for the address."""

    def test_probe_is_a_broadcast_config_read(self) -> None:
        """The probe decodes as a config read request for the shelf.slot, from our MAC."""
        watch = DuplicateWatch(OURS)
        frames = watch.watch(ADDRESS, page(DISK_A), 0.0)
        self.assertEqual(len(frames), 1)
        ethernet, header = decode(frames[0])
        self.assertEqual((ethernet.dst, ethernet.src, ethernet.ethertype),
                         (BROADCAST_MAC, OURS, ETHERTYPE))
        self.assertFalse(header.flag_response)
        self.assertEqual((header.major, header.minor), ADDRESS)
        self.assertEqual(header.command, Command.QUERY_CONFIG_INFORMATION)
        self.assertIsInstance(header.arg, ConfigArg)
        self.assertEqual(header.arg.command, ConfigCommand.READ)  # type: ignore[union-attr]
        self.assertEqual(int.from_bytes(header.tag, "big") & 0xFF000000, 0x7A000000)
        self.assertGreaterEqual(len(frames[0]), 60)

    def test_tag_base(self) -> None:
        """Our tags carry ``tag_base`` in their top byte."""
        watch = DuplicateWatch(OURS, tag_base=0x55000000)
        _, header = decode(watch.watch(ADDRESS, page(DISK_A), 0.0)[0])
        self.assertEqual(header.tag[0], 0x55)

    def test_other_server_answers_probe(self) -> None:
        """A real target answers the probe, which the watch takes as a server to ask."""
        watch = DuplicateWatch(OURS)
        server = other_server(DISK_A)
        (reply,) = server.serve(watch.watch(ADDRESS, page(DISK_A), 0.0)[0])
        frames, verdicts = watch.frame_received(reply, 0.1)
        self.assertEqual(verdicts, [])
        self.assertEqual(len(frames), 1)
        ethernet, header = decode(frames[0])
        self.assertEqual((ethernet.dst, ethernet.src), (THEIRS, OURS))
        self.assertEqual((header.major, header.minor, header.command),
                         (SHELF, SLOT, Command.ISSUE_ATA_COMMAND))
        self.assertFalse(header.flag_response)
        self.assertEqual(header.arg.cmd_status, ATACmdStatus.IDENTIFY)  # type: ignore[union-attr]

    def test_bad_arguments(self) -> None:
        """Misuse by the caller is a ``ValueError``: bad MAC, tag base, address or page."""
        self.assertRaises(ValueError, DuplicateWatch, b"\x01" * 6)
        self.assertRaises(ValueError, DuplicateWatch, OURS[:5])
        self.assertRaises(ValueError, DuplicateWatch, OURS, 0x7A000001)
        self.assertRaises(ValueError, DuplicateWatch, OURS, own_macs=[b"x"])
        self.assertRaises(ValueError, DuplicateWatch, OURS, identify_timeout=0)
        watch = DuplicateWatch(OURS)
        self.assertRaises(ValueError, watch.watch, (0xFFFF, 0), None, 0.0)
        self.assertRaises(ValueError, watch.watch, (1, 0xFF), None, 0.0)
        self.assertRaises(ValueError, watch.watch, ADDRESS, b"\0" * 511, 0.0)
        self.assertEqual(watch.watching(), ())


class VerdictTests(SynchronousTestCase):
    """Another server's IDENTIFY decides: a second path, or a duplicate."""

    def test_same_disk_is_a_second_path(self) -> None:
        """A server over the same disk identity is a second path, listed by ``paths``."""
        watch = DuplicateWatch(OURS)
        probe = watch.watch(ADDRESS, page(DISK_A), 0.0)
        verdicts = exchange(watch, [other_server(DISK_A)], probe)
        self.assertEqual(verdicts, [SecondPath(ADDRESS, THEIRS)])
        self.assertEqual(watch.paths(ADDRESS), (THEIRS,))
        self.assertEqual(watch.duplicates(ADDRESS), ())
        self.assertIn("02:bb:00:00:00:02", verdicts[0].describe())

    def test_different_disk_is_a_duplicate(self) -> None:
        """A server over another disk is a duplicate naming both MACs and both serials."""
        watch = DuplicateWatch(OURS)
        probe = watch.watch(ADDRESS, page(DISK_A), 0.0)
        verdicts = exchange(watch, [other_server(DISK_B)], probe)
        self.assertEqual(len(verdicts), 1)
        (verdict,) = verdicts
        assert isinstance(verdict, Duplicate)
        self.assertEqual((verdict.address, verdict.ours, verdict.theirs), (ADDRESS, OURS, THEIRS))
        ours, theirs = page_identity(page(DISK_A))[0], page_identity(page(DISK_B))[0]
        self.assertIn(f"a different disk (serial {ours} vs {theirs}", verdict.reason)
        line = verdict.describe()
        self.assertIn("e7.3", line)
        self.assertIn("02:aa:00:00:00:01", line)
        self.assertIn("02:bb:00:00:00:02", line)
        self.assertEqual(watch.duplicates(ADDRESS), (THEIRS,))
        self.assertEqual(watch.paths(ADDRESS), ())

    def test_same_serial_other_wwn(self) -> None:
        """One serial given to two different disks does not make them one: the WWNs differ."""
        watch = DuplicateWatch(OURS)
        probe = watch.watch(ADDRESS, page(DISK_A, serial="S1"), 0.0)
        (verdict,) = exchange(watch, [other_server(DISK_B, serial="S1")], probe)
        assert isinstance(verdict, Duplicate)
        self.assertIn("world-wide name", verdict.reason)

    def test_no_identity_is_a_duplicate(self) -> None:
        """Disks without a world-wide name (memory disks, vblade) are never a second path."""
        for ours, theirs, who in [
            (None, None, "neither"),
            (None, DISK_A, "our disk"),
            (DISK_A, None, "theirs"),
        ]:
            watch = DuplicateWatch(OURS)
            probe = watch.watch(ADDRESS, page(ours), 0.0)
            (verdict,) = exchange(watch, [other_server(theirs)], probe)
            assert isinstance(verdict, Duplicate), verdict
            self.assertIn(who, verdict.reason)
            self.assertIn("world-wide name", verdict.reason)

    def test_unknown_own_identity(self) -> None:
        """Without our own page, another server is a duplicate at once, without asking it."""
        watch = DuplicateWatch(OURS)
        watch.watch(ADDRESS, None, 0.0)
        frames, verdicts = watch.frame_received(config_reply(), 0.0)
        self.assertEqual(frames, [])
        self.assertEqual(
            verdicts, [Duplicate(ADDRESS, OURS, THEIRS, "our own disk's identity is unknown")]
        )
        self.assertTrue(watch.settled(ADDRESS, 1.0))

    def test_announcement_is_noticed(self) -> None:
        """A server that comes up later and announces (tag 0, broadcast) is checked too."""
        watch = DuplicateWatch(OURS)
        watch.watch(ADDRESS, page(DISK_A), 0.0)
        server = other_server(DISK_B)
        (announcement,) = server.announcements()
        frames, verdicts = watch.frame_received(announcement, 50.0)
        self.assertEqual(verdicts, [])
        verdicts = exchange(watch, [server], frames, 50.0)
        self.assertEqual([type(v) for v in verdicts], [Duplicate])

    def test_reply_to_someone_else(self) -> None:
        """Any response from another MAC for the address shows a server, even an ATA one."""
        watch = DuplicateWatch(OURS)
        watch.watch(ADDRESS, page(DISK_A), 0.0)
        arg = ATAArg(sector_count=1, cmd_status=ATACmdStatus.READY_STATUS, data=bytes(512))
        reply = response(THEIRS, Command.ISSUE_ATA_COMMAND, arg, tag=b"\0\0\0\x05", dst=HOST)
        frames, _ = watch.frame_received(reply, 0.0)
        self.assertEqual(len(frames), 1)
        self.assertEqual(decode(frames[0])[0].dst, THEIRS)

    def test_two_servers(self) -> None:
        """Each other MAC is judged on its own: one second path, one duplicate."""
        watch = DuplicateWatch(OURS)
        probe = watch.watch(ADDRESS, page(DISK_A), 0.0)
        servers = [other_server(DISK_A), other_server(DISK_B, mac=THIRD)]
        verdicts = exchange(watch, servers, probe)
        self.assertEqual(
            {(type(v), v.theirs) for v in verdicts},
            {(SecondPath, THEIRS), (Duplicate, THIRD)},
        )
        self.assertEqual(watch.paths(ADDRESS), (THEIRS,))
        self.assertEqual(watch.duplicates(ADDRESS), (THIRD,))


class ErrorReplyTests(SynchronousTestCase):
    """An IDENTIFY answered with an error is a duplicate: its identity cannot be read."""

    def setUp(self) -> None:
        self.watch = DuplicateWatch(OURS)
        self.watch.watch(ADDRESS, page(DISK_A), 0.0)
        self.request = asked(self.watch)

    def judge(self, reply: bytes) -> Duplicate:
        """Return the single verdict on ``reply``, checked to be a duplicate."""
        frames, verdicts = self.watch.frame_received(reply, 0.1)
        self.assertEqual(frames, [])
        self.assertEqual(len(verdicts), 1)
        (verdict,) = verdicts
        assert isinstance(verdict, Duplicate), verdict
        self.assertEqual(verdict.theirs, THEIRS)
        self.assertIn("its disk's identity could not be read", verdict.reason)
        self.assertFalse(self.watch.settled(ADDRESS, 0.5))
        self.assertTrue(self.watch.settled(ADDRESS, 1.0))
        return verdict

    def test_ata_error(self) -> None:
        """ATA ``ERR|DRDY`` with ``ABRT`` (a target whose page could not be built)."""
        arg = ATAArg(
            err_feature=ATAError.ABRT,
            sector_count=1,
            cmd_status=ATACmdStatus.ERR_STATUS | ATACmdStatus.READY_STATUS,
        )
        verdict = self.judge(identify_reply(self.request, arg))
        self.assertIn("ATA status 0x41", verdict.reason)

    def test_aoe_error(self) -> None:
        """An AoE error reply (E flag), its argument raw as the codec keeps it."""
        verdict = self.judge(
            identify_reply(self.request, RawArg(b"\0" * 3), flag_error=True, error=3)
        )
        self.assertIn("AoE error 3", verdict.reason)

    def test_short_page(self) -> None:
        """A page shorter than 512 bytes."""
        arg = ATAArg(sector_count=1, cmd_status=ATACmdStatus.READY_STATUS, data=bytes(100))
        verdict = self.judge(identify_reply(self.request, arg))
        self.assertIn("100 bytes", verdict.reason)

    def test_hostile_serial_is_printable(self) -> None:
        """A serial with control characters from the wire reaches the reason as '?'."""
        evil = bytearray(page(DISK_B))
        evil[20:40] = b"\n\x1b[31m".ljust(20, b" ")  # the serial field, bytes swapped in pairs
        arg = ATAArg(sector_count=1, cmd_status=ATACmdStatus.READY_STATUS, data=bytes(evil))
        _, (verdict,) = self.watch.frame_received(identify_reply(self.request, arg), 0.1)
        assert isinstance(verdict, Duplicate)
        self.assertNotIn("\n", verdict.reason)
        self.assertNotIn("\x1b", verdict.reason)


class TimeoutTests(SynchronousTestCase):
    """An IDENTIFY nobody answers: ``expire`` calls it a duplicate; ``settled`` waits for it."""

    def test_masked_target_expires_as_duplicate(self) -> None:
        """A target whose mask list leaves us out announces but answers nothing."""
        watch = DuplicateWatch(OURS)
        server = other_server(DISK_A, mask=(HOST,))
        self.assertEqual(exchange(watch, [server], watch.watch(ADDRESS, page(DISK_A), 0.0)), [])
        (announcement,) = server.announcements()  # unicast to the masked-in host; overheard
        frames, verdicts = watch.frame_received(announcement, 0.2)
        self.assertEqual(verdicts, [])
        self.assertEqual(server.serve(frames[0]), [])
        self.assertFalse(watch.settled(ADDRESS, 1.1))
        self.assertEqual(watch.expire(1.2), [])
        (verdict,) = watch.expire(1.21)
        self.assertEqual((verdict.theirs, verdict.ours), (THEIRS, OURS))
        self.assertIn("no answer to IDENTIFY in 1 s", verdict.reason)
        self.assertTrue(watch.settled(ADDRESS, 1.21))
        self.assertEqual(watch.expire(5.0), [])
        self.assertEqual(watch.duplicates(ADDRESS), (THEIRS,))

    def test_answer_after_expiry_is_ignored(self) -> None:
        """Once judged, a late IDENTIFY reply changes nothing and asks nothing."""
        watch = DuplicateWatch(OURS, identify_timeout=0.5)
        server = other_server(DISK_A)
        watch.watch(ADDRESS, page(DISK_A), 0.0)
        frames, _ = watch.frame_received(config_reply(), 0.0)
        self.assertEqual(len(watch.expire(0.6)), 1)
        (late,) = server.serve(frames[0])
        self.assertEqual(watch.frame_received(late, 0.7), ([], []))
        self.assertEqual(watch.paths(ADDRESS), ())

    def test_settled(self) -> None:
        """Settled once ``wait`` has passed with no IDENTIFY outstanding, not before."""
        watch = DuplicateWatch(OURS, wait=2.0)
        self.assertFalse(watch.settled(ADDRESS, 10.0))
        watch.watch(ADDRESS, page(DISK_A), 10.0)
        self.assertFalse(watch.settled(ADDRESS, 11.9))
        self.assertTrue(watch.settled(ADDRESS, 12.0))
        request = asked(watch, now=12.5)
        self.assertFalse(watch.settled(ADDRESS, 12.5))
        reply = other_server(DISK_A).serve(
            EthernetFrame(THEIRS, OURS, ETHERTYPE, request.to_bytes()).to_bytes()
        )[0]
        _, verdicts = watch.frame_received(reply, 12.6)
        self.assertEqual(verdicts, [SecondPath(ADDRESS, THEIRS)])
        self.assertTrue(watch.settled(ADDRESS, 12.6))


class RetransmitTests(SynchronousTestCase):
    """``retransmit`` repeats the probe and unanswered IDENTIFY requests."""

    def test_probe_repeated_once(self) -> None:
        """With two probes, the second leaves at half the wait, and only once."""
        watch = DuplicateWatch(OURS, wait=1.0)
        (probe,) = watch.watch(ADDRESS, page(DISK_A), 0.0)
        self.assertEqual(watch.retransmit(0.49), [])
        self.assertEqual(watch.retransmit(0.5), [probe])
        self.assertEqual(watch.retransmit(0.9), [])

    def test_single_probe(self) -> None:
        """With ``probes=1`` nothing is repeated."""
        watch = DuplicateWatch(OURS, probes=1)
        watch.watch(ADDRESS, page(DISK_A), 0.0)
        self.assertEqual(watch.retransmit(0.9), [])

    def test_identify_repeated_with_same_tag(self) -> None:
        """An unanswered IDENTIFY goes again, same tag, until it expires; a copy's answer counts."""
        watch = DuplicateWatch(OURS, probes=1, identify_resend=0.25)
        watch.watch(ADDRESS, page(DISK_A), 0.0)
        frames, _ = watch.frame_received(config_reply(), 0.0)
        self.assertEqual(watch.retransmit(0.2), [])
        self.assertEqual(watch.retransmit(0.25), frames)
        self.assertEqual(watch.retransmit(0.3), [])
        self.assertEqual(watch.retransmit(0.5), frames)
        (reply,) = other_server(DISK_A).serve(frames[0])
        self.assertEqual(watch.frame_received(reply, 0.6), ([], [SecondPath(ADDRESS, THEIRS)]))
        self.assertEqual(watch.retransmit(0.9), [])

    def test_no_resend_after_timeout(self) -> None:
        """Past ``identify_timeout`` the request is not sent again (``expire`` judges it)."""
        watch = DuplicateWatch(OURS, probes=1, identify_resend=0.25)
        watch.watch(ADDRESS, page(DISK_A), 0.0)
        watch.frame_received(config_reply(), 0.0)
        self.assertEqual(watch.retransmit(1.5), [])


class IgnoredTests(SynchronousTestCase):
    """Frames that prove nothing about another server are ignored."""

    def setUp(self) -> None:
        self.watch = DuplicateWatch(OURS, own_macs=[SIBLING])
        self.watch.watch(ADDRESS, page(DISK_A), 0.0)

    def assertIgnored(self, frame: bytes) -> None:
        """``frame`` gives no frame and no verdict."""
        self.assertEqual(self.watch.frame_received(frame, 0.0), ([], []))

    def test_own_frames(self) -> None:
        """Our own responses (from our MAC or our other interfaces') are ours."""
        self.assertIgnored(config_reply(OURS))
        self.assertIgnored(config_reply(SIBLING))

    def test_requests(self) -> None:
        """A request (the other server's own probe, an initiator's query) is not a server."""
        self.assertIgnored(config_reply(THEIRS, flag_response=False))
        probe = DuplicateWatch(THEIRS).watch(ADDRESS, None, 0.0)[0]
        self.assertIgnored(probe)

    def test_other_addresses(self) -> None:
        """Responses for addresses we do not watch, or no longer watch."""
        self.assertIgnored(config_reply(address=(SHELF, SLOT + 1)))
        self.assertIgnored(config_reply(address=(0xFFFF, 0xFF)))
        self.watch.forget(ADDRESS)
        self.assertIgnored(config_reply())
        self.assertEqual(self.watch.watching(), ())

    def test_not_aoe(self) -> None:
        """Another EtherType, or too short to be anything."""
        frame = bytearray(config_reply())
        frame[12:14] = b"\x08\x00"
        self.assertIgnored(bytes(frame))
        self.assertIgnored(b"")
        self.assertIgnored(config_reply()[:20])

    def test_multicast_source(self) -> None:
        """A frame claiming a multicast source is never asked (we would send to a group)."""
        self.assertIgnored(config_reply(b"\x03" + THEIRS[1:]))

    def test_malformed(self) -> None:
        """A response that does not decode (wrong version) is ignored."""
        frame = bytearray(config_reply())
        frame[14] = 0x28
        self.assertIgnored(bytes(frame))

    def test_asked_once(self) -> None:
        """A MAC is asked once; while outstanding and once judged, it is not asked again."""
        request = asked(self.watch)
        self.assertIgnored(config_reply())
        (reply,) = other_server(DISK_A).serve(
            EthernetFrame(THEIRS, OURS, ETHERTYPE, request.to_bytes()).to_bytes()
        )
        self.assertEqual(self.watch.frame_received(reply, 0.0)[1], [SecondPath(ADDRESS, THEIRS)])
        self.assertIgnored(config_reply())
        self.assertIgnored(reply)

    def test_reply_matched_by_mac_and_tag(self) -> None:
        """An IDENTIFY answer with our tag from another MAC is not the answer we wait for."""
        request = asked(self.watch)
        arg = ATAArg(sector_count=1, cmd_status=ATACmdStatus.READY_STATUS, data=page(DISK_A))
        frames, verdicts = self.watch.frame_received(identify_reply(request, arg, src=THIRD), 0.0)
        self.assertEqual(verdicts, [])
        self.assertEqual(decode(frames[0])[0].dst, THIRD)  # THIRD is a server to ask in turn
        wrong_tag = Header(
            VERSION, True, False, 0, SHELF, SLOT, Command.ISSUE_ATA_COMMAND, b"\0\0\0\0", arg
        )
        self.assertIgnored(EthernetFrame(OURS, THEIRS, ETHERTYPE, wrong_tag.to_bytes()).to_bytes())
        self.assertFalse(self.watch.settled(ADDRESS, 5.0))

    def test_watch_again_starts_afresh(self) -> None:
        """``forget`` then ``watch`` (or ``watch`` again) forgets verdicts and questions."""
        request = asked(self.watch)
        self.watch.watch(ADDRESS, page(DISK_A), 1.0)
        arg = ATAArg(sector_count=1, cmd_status=ATACmdStatus.READY_STATUS, data=page(DISK_A))
        frames, verdicts = self.watch.frame_received(identify_reply(request, arg), 1.0)
        self.assertEqual(verdicts, [])  # the old question's answer is no answer now...
        self.assertEqual(len(frames), 1)  # ...but shows the server, which is asked anew
        self.assertEqual(self.watch.expire(100.0)[0].theirs, THEIRS)

    def test_spoofed_flood_is_bounded(self) -> None:
        """Responses from many MACs ask at most ``MAX_ASKING`` at a time."""
        sent = 0
        for i in range(MAX_ASKING * 4):
            mac = bytes.fromhex("02dd") + i.to_bytes(4, "big")
            sent += len(self.watch.frame_received(config_reply(mac), 0.0)[0])
        self.assertEqual(sent, MAX_ASKING)


class HostileTests(SynchronousTestCase):
    """Whatever arrives, ``frame_received`` never raises and sends only IDENTIFY requests."""

    def watch(self) -> DuplicateWatch:
        """Return a watch of e7.3 (with our page) and e0.0 (without one)."""
        watch = DuplicateWatch(OURS)
        watch.watch(ADDRESS, page(DISK_A), 0.0)
        watch.watch((0, 0), None, 0.0)
        return watch

    def check(self, frame: bytes) -> None:
        """Feed ``frame`` (as bytes and as a memoryview) to a watch; check what it sends."""
        watch = self.watch()
        frames, verdicts = watch.frame_received(frame, 0.0)
        in_place = self.watch().frame_received(memoryview(bytearray(frame)), 0.0)
        self.assertEqual(in_place, (frames, verdicts))
        for sent in frames:
            ethernet, header = decode(sent)
            self.assertEqual(ethernet.src, OURS)
            self.assertEqual(ethernet.dst, frame[6:12])
            self.assertEqual(header.arg.cmd_status, ATACmdStatus.IDENTIFY)  # type: ignore[union-attr]
        for verdict in verdicts:
            self.assertEqual(verdict.theirs, frame[6:12])
        watch.expire(10.0)
        watch.retransmit(10.0)

    @settings(max_examples=300)
    @given(st.binary(max_size=128))
    def test_random_bytes(self, frame: bytes) -> None:
        """Random bytes."""
        self.check(frame)

    @settings(max_examples=300)
    @given(
        st.sampled_from([ADDRESS, (0, 0)]),
        strategies.macs,
        strategies.mutated_messages(),
    )
    def test_mutated_responses(
        self, address: tuple[int, int], src: bytes, message: bytes
    ) -> None:
        """Near-valid AoE messages with the response flag, for a watched address."""
        head = bytearray(message.ljust(5, b"\0"))
        head[0] |= 0x08  # the response flag; the version may stay mutated
        head[2:5] = address[0].to_bytes(2, "big") + bytes([address[1]])
        self.check(EthernetFrame(OURS, src, ETHERTYPE, bytes(head)).to_bytes())

    @settings(max_examples=300)
    @given(strategies.macs, strategies.headers)
    def test_valid_responses(self, src: bytes, header: Header) -> None:
        """Every valid message, as a response for e7.3, from any MAC."""
        header = evolve(header, flag_response=True, major=SHELF, minor=SLOT)
        self.check(EthernetFrame(OURS, src, ETHERTYPE, header.to_bytes()).to_bytes())
