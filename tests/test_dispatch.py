"""Tests for ``Dispatcher``: frames in, routing to targets, padded reply frames out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    ETHERTYPE,
    MIN_FRAME_SIZE,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    Error,
    EthernetFrame,
    Header,
    ProtocolError,
)
from tests import strategies

OURS = bytes.fromhex("02aa00000001")
HOST = bytes.fromhex("020000000001")
OTHER = bytes.fromhex("020000000002")
TAG = b"\x00\x00\x12\x34"
SIZE = 64 * SECTOR_SIZE


def make_target(shelf: int = 1, slot: int = 1, **kwargs: object) -> Target:
    """Return a target on a small memory disk."""
    return Target(shelf, slot, MemoryBackend(SIZE), **kwargs)  # type: ignore[arg-type]


def make_dispatcher(*targets: Target) -> Dispatcher:
    """Return a dispatcher for ``targets`` (one target at 1.1 by default)."""
    return Dispatcher(OURS, list(targets) if targets else [make_target()])


def frame(payload: bytes, src: bytes = HOST, ethertype: int = ETHERTYPE) -> bytes:
    """Return an unpadded Ethernet frame to us carrying ``payload``."""
    return EthernetFrame(OURS, src, ethertype, payload).to_bytes()


def config_query(major: int = 0xFFFF, minor: int = 0xFF, **kwargs: object) -> bytes:
    """Return the encoding of a config read, broadcast by default, as Linux discovers."""
    header = Header(
        major=major,
        minor=minor,
        command=Command.QUERY_CONFIG_INFORMATION,
        tag=TAG,
        arg=ConfigArg(),
        **kwargs,  # type: ignore[arg-type]
    )
    return header.to_bytes()


def read_request(major: int = 1, minor: int = 1, count: int = 2) -> bytes:
    """Return the encoding of a READ SECTORS EXT of ``count`` sectors at LBA 0."""
    arg = ATAArg(flag_lba48_extended=True, sector_count=count, cmd_status=ATACmdStatus.READ_48BIT)
    return Header(major=major, minor=minor, command=0, tag=TAG, arg=arg).to_bytes()


def with_byte(data: bytes, index: int, value: int) -> bytes:
    """Return ``data`` with byte ``index`` replaced by ``value``."""
    return data[:index] + bytes([value]) + data[index + 1 :]


def decode(reply: bytes) -> tuple[EthernetFrame, Header]:
    """
    Decode a reply frame and the AoE message it carries.

    An error reply to an unknown command does not decode (the codec refuses
    the command before it looks at the E flag); its partial header is used.
    """
    ethernet = EthernetFrame.from_bytes(reply)
    try:
        return ethernet, Header.from_bytes(ethernet.payload)
    except ProtocolError as e:
        if e.header is None:
            raise
        return ethernet, e.header


class ConstructionTests(SynchronousTestCase):
    """What a dispatcher refuses to be built from."""

    def test_duplicate_address(self) -> None:
        """Two targets at the same shelf.slot are refused."""
        self.assertRaises(ValueError, Dispatcher, OURS, [make_target(1, 2), make_target(1, 2)])

    def test_same_slot_other_shelf(self) -> None:
        """The same slot on two shelves is fine."""
        Dispatcher(OURS, [make_target(1, 2), make_target(2, 2)])

    def test_bad_mac(self) -> None:
        """The interface MAC must be six bytes and unicast."""
        self.assertRaises(ValueError, Dispatcher, b"\x02\x00", [])
        self.assertRaises(ValueError, Dispatcher, BROADCAST_MAC, [])


class FilterTests(SynchronousTestCase):
    """Frames that get no reply, and how they are counted."""

    def test_not_aoe(self) -> None:
        """A frame of another EtherType is counted and ignored."""
        dispatcher = make_dispatcher()
        self.assertEqual(dispatcher.serve(frame(config_query(), ethertype=0x0800)), [])
        self.assertEqual(dispatcher.counters["not_aoe"], 1)

    def test_short_ethernet(self) -> None:
        """A frame shorter than an Ethernet header is counted malformed."""
        dispatcher = make_dispatcher()
        self.assertEqual(dispatcher.serve(b"\x00" * 13), [])
        self.assertEqual(dispatcher.counters["malformed"], 1)

    def test_short_aoe(self) -> None:
        """An AoE frame too short for its header is counted malformed, with a reason."""
        dispatcher = make_dispatcher()
        decision = dispatcher.frame_received(frame(b"\x10\x00\x00"))
        self.assertEqual(decision.replies, ())
        self.assertEqual(dispatcher.counters["malformed"], 1)
        self.assertIn("header", decision.malformed)

    def test_multicast_source(self) -> None:
        """A frame claiming a multicast or broadcast source is dropped as malformed."""
        dispatcher = make_dispatcher()
        for src in (BROADCAST_MAC, bytes.fromhex("010000000001")):
            with self.subTest(src=src):
                decision = dispatcher.frame_received(frame(config_query(), src=src))
                self.assertEqual(decision.replies, ())
                self.assertIn("multicast", decision.malformed)
        self.assertEqual(dispatcher.counters["malformed"], 2)

    def test_response_ignored(self) -> None:
        """Another target's response is counted and never answered."""
        dispatcher = make_dispatcher()
        data = config_query(flag_response=True)
        self.assertEqual(dispatcher.serve(frame(data)), [])
        self.assertEqual(dispatcher.counters["response"], 1)

    def test_malformed_response_ignored(self) -> None:
        """A response with an unknown command gets no error reply either."""
        dispatcher = make_dispatcher()
        data = with_byte(config_query(flag_response=True), 5, 9)
        self.assertEqual(dispatcher.serve(frame(data)), [])
        self.assertEqual(dispatcher.counters["malformed"], 1)

    def test_unaddressed(self) -> None:
        """A request for a shelf.slot we do not export is counted unaddressed."""
        dispatcher = make_dispatcher()
        self.assertEqual(dispatcher.serve(frame(config_query(2, 1))), [])
        self.assertEqual(dispatcher.counters["unaddressed"], 1)

    def test_silent(self) -> None:
        """A request a target chose not to answer (masked host) is counted silent."""
        dispatcher = make_dispatcher(make_target(acl=MemoryACLStore(mask_list=(OTHER,))))
        self.assertEqual(dispatcher.serve(frame(config_query())), [])
        self.assertEqual(dispatcher.counters["silent"], 1)

    def test_received_counts_all(self) -> None:
        """Every frame is counted as received, whatever its fate."""
        dispatcher = make_dispatcher()
        for data in (b"", frame(config_query()), frame(b"", ethertype=1)):
            dispatcher.serve(data)
        self.assertEqual(dispatcher.counters["received"], 3)


class ReplyTests(SynchronousTestCase):
    """Reply frames: addressing, padding, errors, several targets."""

    def test_reply_frame(self) -> None:
        """A reply goes to the requester from our MAC with the AoE EtherType."""
        [reply] = make_dispatcher().serve(frame(config_query()))
        ethernet, header = decode(reply)
        self.assertEqual((ethernet.dst, ethernet.src, ethernet.ethertype), (HOST, OURS, ETHERTYPE))
        self.assertEqual((header.flag_response, header.tag), (True, TAG))

    def test_padding(self) -> None:
        """A short reply is padded to the 60-byte Ethernet minimum."""
        [reply] = make_dispatcher().serve(frame(config_query()))
        self.assertEqual(len(reply), MIN_FRAME_SIZE)

    def test_long_reply_not_padded(self) -> None:
        """A reply longer than the minimum is sent as it is: a two-sector read."""
        [reply] = make_dispatcher().serve(frame(read_request()))
        self.assertEqual(len(reply), 14 + 10 + 12 + 2 * SECTOR_SIZE)

    def test_counts_answers(self) -> None:
        """An answered frame is counted once, and each reply frame too."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2))
        dispatcher.serve(frame(config_query()))
        self.assertEqual((dispatcher.counters["answered"], dispatcher.counters["replies"]), (1, 2))

    def test_broadcast_to_several_targets(self) -> None:
        """A broadcast query is answered by every target, each with its own address, in order."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2), make_target(5, 0))
        replies = dispatcher.serve(frame(config_query()))
        addresses = [(h.major, h.minor) for _, h in map(decode, replies)]
        self.assertEqual(addresses, [(1, 1), (1, 2), (5, 0)])

    def test_shelf_wildcard_several_targets(self) -> None:
        """A query to one shelf's every slot is answered by that shelf's targets only."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2), make_target(5, 0))
        replies = dispatcher.serve(frame(config_query(1, 0xFF)))
        self.assertEqual([decode(r)[1].minor for r in replies], [1, 2])

    def test_unicast_one_target(self) -> None:
        """A request to one shelf.slot is answered by that target alone."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2))
        [reply] = dispatcher.serve(frame(read_request(1, 2)))
        self.assertEqual((decode(reply)[1].major, decode(reply)[1].minor), (1, 2))

    def test_unknown_command(self) -> None:
        """An unknown command gets error 1 echoing the tag, from the addressed target."""
        data = with_byte(config_query(1, 1), 5, 9)
        [reply] = make_dispatcher().serve(frame(data))
        _, header = decode(reply)
        self.assertEqual(
            (header.flag_error, header.error, header.command, header.tag),
            (True, Error.UNRECOGNIZED_COMMAND_CODE, 9, TAG),
        )

    def test_unknown_command_counted(self) -> None:
        """A frame answered with an error still counts as malformed."""
        dispatcher = make_dispatcher()
        decision = dispatcher.frame_received(frame(with_byte(config_query(1, 1), 5, 9)))
        self.assertEqual(len(decision.replies), 1)
        self.assertEqual(dispatcher.counters["malformed"], 1)
        self.assertIn(HOST.hex(":"), decision.malformed)

    def test_bad_version(self) -> None:
        """A request of another AoE version gets error 5 from every addressed target."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2))
        data = with_byte(config_query(), 0, 0x20)
        replies = dispatcher.serve(frame(data))
        self.assertEqual(
            [(h.error, h.minor) for _, h in map(decode, replies)],
            [(Error.UNSUPPORTED_VERSION, 1), (Error.UNSUPPORTED_VERSION, 2)],
        )

    def test_padded_request(self) -> None:
        """A request padded to 60 bytes is answered like the unpadded one."""
        data = EthernetFrame(OURS, HOST, ETHERTYPE, config_query()).to_bytes(pad=True)
        self.assertEqual(len(make_dispatcher().serve(data)), 1)


class AnnouncementTests(SynchronousTestCase):
    """The start-up announcements."""

    def test_broadcast(self) -> None:
        """Each target announces itself once to the broadcast address."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(2, 3))
        frames = dispatcher.announcements()
        decoded = [decode(f) for f in frames]
        self.assertEqual(
            [(e.dst, e.src, h.major, h.minor) for e, h in decoded],
            [(BROADCAST_MAC, OURS, 1, 1), (BROADCAST_MAC, OURS, 2, 3)],
        )

    def test_content(self) -> None:
        """An announcement is a padded config read response with tag 0."""
        [announcement] = make_dispatcher().announcements()
        self.assertEqual(len(announcement), MIN_FRAME_SIZE)
        _, header = decode(announcement)
        self.assertEqual(
            (header.flag_response, header.tag, header.command, header.arg.command),
            (True, bytes(4), Command.QUERY_CONFIG_INFORMATION, ConfigCommand.READ),
        )

    def test_masked_target(self) -> None:
        """A target with a mask list announces itself to each MAC on it, not to broadcast."""
        target = make_target(acl=MemoryACLStore(mask_list=(HOST, OTHER)))
        frames = make_dispatcher(target).announcements()
        self.assertEqual([decode(f)[0].dst for f in frames], [HOST, OTHER])


class PropertyTests(SynchronousTestCase):
    """``frame_received`` never raises, whatever arrives."""

    def dispatcher(self) -> Dispatcher:
        """Return a dispatcher with two targets at the addresses the strategies hit often."""
        return Dispatcher(OURS, [make_target(0, 0), make_target(1, 1)])

    @settings(max_examples=300)
    @given(st.binary(max_size=200))
    def test_any_bytes(self, data: bytes) -> None:
        """Arbitrary bytes are counted and never raise."""
        dispatcher = self.dispatcher()
        for reply in dispatcher.serve(data):
            self.assertGreaterEqual(len(reply), MIN_FRAME_SIZE)
        self.assertEqual(dispatcher.counters["received"], 1)

    @settings(max_examples=300)
    @given(strategies.mutated_messages(), st.sampled_from([HOST, OTHER]))
    def test_near_valid_messages(self, payload: bytes, src: bytes) -> None:
        """Mutated AoE messages never raise; every reply comes from us to the sender."""
        dispatcher = self.dispatcher()
        for reply in dispatcher.serve(frame(payload, src=src)):
            ethernet, header = decode(reply)
            self.assertEqual((ethernet.dst, ethernet.src), (src, OURS))
            self.assertTrue(header.flag_response)
        self.assertEqual(dispatcher.counters["unencodable"], 0)

    @settings(max_examples=200)
    @given(strategies.aoe_frames)
    def test_valid_frames(self, ethernet: EthernetFrame) -> None:
        """Well-formed AoE frames from any source never raise nor produce unencodable replies."""
        dispatcher = self.dispatcher()
        dispatcher.serve(ethernet.to_bytes())
        self.assertEqual(dispatcher.counters["unencodable"], 0)


def write_request(major: int = 1, minor: int = 1, lba: int = 0, fill: int = 0x5A) -> bytes:
    """Return the encoding of a one-sector WRITE SECTORS EXT at ``lba``."""
    arg = ATAArg(
        flag_lba48_extended=True,
        flag_write=True,
        sector_count=1,
        cmd_status=ATACmdStatus.WRITE_48BIT,
        lba=lba,
        data=bytes([fill]) * SECTOR_SIZE,
    )
    return Header(major=major, minor=minor, command=0, tag=TAG, arg=arg).to_bytes()


class DecisionTests(SynchronousTestCase):
    """What ``frame_received`` decides: replies now, disk operations, written targets."""

    def test_general_read_is_pending(self) -> None:
        """The general path answers a read with a pending operation, not with data."""
        dispatcher = Dispatcher(OURS, [make_target()], fast_path=False)
        decision = dispatcher.frame_received(frame(read_request()))
        self.assertEqual(decision.replies, ())
        [pending] = decision.pending
        self.assertEqual((pending.io.kind, pending.io.offset, pending.io.length), (1, 0, 1024))
        self.assertEqual(pending.initiator, HOST)
        done = dispatcher.complete(pending, b"\x33" * 1024)
        [reply] = done.replies
        _, header = decode(reply)
        self.assertEqual(header.arg.data, b"\x33" * 1024)
        self.assertIsNone(done.written)
        self.assertEqual((dispatcher.counters.answered, dispatcher.counters.replies), (1, 1))

    def test_complete_out_of_order(self) -> None:
        """Operations of two targets complete in any order, each into its own reply."""
        dispatcher = Dispatcher(OURS, [make_target(1, 1), make_target(1, 2)], fast_path=False)
        [first] = dispatcher.frame_received(frame(read_request(1, 1))).pending
        [second] = dispatcher.frame_received(frame(read_request(1, 2))).pending
        late = dispatcher.complete(second, b"\x02" * 1024).replies
        early = dispatcher.complete(first, b"\x01" * 1024).replies
        self.assertEqual([decode(r)[1].minor for r in late + early], [2, 1])
        self.assertEqual(decode(early[0])[1].arg.data, b"\x01" * 1024)

    def test_write_names_its_target(self) -> None:
        """A write's reply names the target written, by either path."""
        for fast_path in (True, False):
            target = make_target()
            dispatcher = Dispatcher(OURS, [target], fast_path=fast_path)
            [reply] = dispatcher.serve(frame(write_request()))
            self.assertFalse(decode(reply)[1].arg.cmd_status & ATACmdStatus.ERR_STATUS)
            decision = dispatcher.frame_received(frame(write_request(lba=1)))
            if not fast_path:
                [pending] = decision.pending
                self.assertTrue(pending.writes)
                decision = dispatcher.complete(pending, None)
            self.assertIs(decision.written, target, fast_path)
            self.assertEqual(decision.refusal, b"", fast_path)

    def test_held_write_carries_its_refusal(self) -> None:
        """With ``hold_writes`` a write goes the general way and carries its ABRT reply."""
        target = make_target()
        dispatcher = Dispatcher(OURS, [target], hold_writes=True)
        decision = dispatcher.frame_received(frame(write_request()))
        self.assertEqual(dispatcher.counters.fast, 0)
        [pending] = decision.pending
        done = dispatcher.complete(pending, None)
        self.assertIs(done.written, target)
        _, ok = decode(done.replies[0])
        _, refused = decode(done.refusal)
        self.assertEqual(ok.arg.cmd_status, ATACmdStatus.READY_STATUS)
        self.assertEqual(
            refused.arg.cmd_status, ATACmdStatus.ERR_STATUS | ATACmdStatus.READY_STATUS
        )
        self.assertEqual(refused.arg.err_feature, 0x04)  # ABRT
        self.assertEqual((refused.tag, refused.minor), (ok.tag, ok.minor))
        self.assertEqual(dispatcher.counters.replies, 1)
        # Reads still take the fast path.
        dispatcher.frame_received(frame(read_request()))
        self.assertEqual(dispatcher.counters.fast, 1)

    def test_failed_write_is_not_written(self) -> None:
        """A write whose operation failed acknowledges nothing."""
        dispatcher = Dispatcher(OURS, [make_target()], fast_path=False, hold_writes=True)
        [pending] = dispatcher.frame_received(frame(write_request())).pending
        done = dispatcher.complete(pending, None, OSError(28, "No space left on device"))
        self.assertIsNone(done.written)
        self.assertEqual(done.refusal, b"")
        self.assertEqual(decode(done.replies[0])[1].arg.err_feature, 0x04)

    def test_store_failure_is_a_fault(self) -> None:
        """A config change the store cannot keep: DEVICE_UNAVAILABLE, and a fault to log."""

        class FullStore(MemoryACLStore):
            def set_config_string(self, value: bytes) -> None:
                raise OSError(28, "No space left on device")

        dispatcher = make_dispatcher(make_target(acl=FullStore()))
        header = Header(
            major=1,
            minor=1,
            command=Command.QUERY_CONFIG_INFORMATION,
            tag=TAG,
            arg=ConfigArg(command=ConfigCommand.FORCE_SET, string_length=2, string=b"hi"),
        )
        data = header.to_bytes()
        decision = dispatcher.frame_received(frame(data))
        [reply] = decision.replies
        _, answer = decode(reply)
        self.assertTrue(answer.flag_error)
        self.assertEqual(answer.error, Error.DEVICE_UNAVAILABLE)
        self.assertIn("No space left on device", decision.fault)
        self.assertIn("e1.1", decision.fault)
        self.assertEqual(dispatcher.counters.faults, 1)
