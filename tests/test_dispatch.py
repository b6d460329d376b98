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
    ATACmdStatus,
    Command,
    ConfigCommand,
    Error,
    EthernetFrame,
    Header,
    ProtocolError,
)
from aoe_twisted.testing import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    ata_request,
    config_request,
    ethernet_frame,
)
from tests import strategies

TAG = b"\x00\x00\x12\x34"
SIZE = 64 * SECTOR_SIZE


def make_target(shelf: int = 1, slot: int = 1, **kwargs: object) -> Target:
    """Return a target on a small memory disk."""
    return Target(shelf, slot, MemoryBackend(SIZE), **kwargs)  # type: ignore[arg-type]


def make_dispatcher(*targets: Target) -> Dispatcher:
    """Return a dispatcher for ``targets`` (one target at 1.1 by default)."""
    return Dispatcher(TARGET_MAC, list(targets) if targets else [make_target()])


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
        targets = [make_target(1, 2), make_target(1, 2)]
        self.assertRaises(ValueError, Dispatcher, TARGET_MAC, targets)

    def test_same_slot_other_shelf(self) -> None:
        """The same slot on two shelves is fine."""
        Dispatcher(TARGET_MAC, [make_target(1, 2), make_target(2, 2)])

    def test_bad_mac(self) -> None:
        """The interface MAC must be six bytes and unicast."""
        self.assertRaises(ValueError, Dispatcher, b"\x02\x00", [])
        self.assertRaises(ValueError, Dispatcher, BROADCAST_MAC, [])


class FilterTests(SynchronousTestCase):
    """Frames that get no reply, and how they are counted."""

    def test_not_aoe(self) -> None:
        """A frame of another EtherType is counted and ignored."""
        dispatcher = make_dispatcher()
        self.assertEqual(dispatcher.serve(ethernet_frame(config_request(), ethertype=0x0800)), [])
        self.assertEqual(dispatcher.counters["not_aoe"], 1)

    def test_short_ethernet(self) -> None:
        """A frame shorter than an Ethernet header is counted malformed."""
        dispatcher = make_dispatcher()
        self.assertEqual(dispatcher.serve(b"\x00" * 13), [])
        self.assertEqual(dispatcher.counters["malformed"], 1)

    def test_short_aoe(self) -> None:
        """An AoE frame too short for its header is counted malformed, with a reason."""
        dispatcher = make_dispatcher()
        decision = dispatcher.frame_received(ethernet_frame(b"\x10\x00\x00"))
        self.assertEqual(decision.replies, ())
        self.assertEqual(dispatcher.counters["malformed"], 1)
        self.assertIn("header", decision.malformed)

    def test_multicast_source(self) -> None:
        """A frame claiming a multicast or broadcast source is dropped as malformed."""
        dispatcher = make_dispatcher()
        for src in (BROADCAST_MAC, bytes.fromhex("010000000001")):
            with self.subTest(src=src):
                decision = dispatcher.frame_received(ethernet_frame(config_request(), src))
                self.assertEqual(decision.replies, ())
                self.assertIn("multicast", decision.malformed)
        self.assertEqual(dispatcher.counters["malformed"], 2)

    def test_response_ignored(self) -> None:
        """Another target's response is counted and never answered."""
        dispatcher = make_dispatcher()
        data = config_request(verflags=0x18)
        self.assertEqual(dispatcher.serve(ethernet_frame(data)), [])
        self.assertEqual(dispatcher.counters["response"], 1)

    def test_malformed_response_ignored(self) -> None:
        """A response with an unknown command gets no error reply either."""
        dispatcher = make_dispatcher()
        data = config_request(verflags=0x18, aoe_command=9)
        self.assertEqual(dispatcher.serve(ethernet_frame(data)), [])
        self.assertEqual(dispatcher.counters["malformed"], 1)

    def test_unaddressed(self) -> None:
        """A request for a shelf.slot we do not export is counted unaddressed."""
        dispatcher = make_dispatcher()
        self.assertEqual(dispatcher.serve(ethernet_frame(config_request(shelf=2, slot=1))), [])
        self.assertEqual(dispatcher.counters["unaddressed"], 1)

    def test_silent(self) -> None:
        """A request a target chose not to answer (masked host) is counted silent."""
        dispatcher = make_dispatcher(make_target(acl=MemoryACLStore(mask_list=(OTHER_MAC,))))
        self.assertEqual(dispatcher.serve(ethernet_frame(config_request())), [])
        self.assertEqual(dispatcher.counters["silent"], 1)

    def test_received_counts_all(self) -> None:
        """Every frame is counted as received, whatever its fate."""
        dispatcher = make_dispatcher()
        for data in (b"", ethernet_frame(config_request()), ethernet_frame(b"", ethertype=1)):
            dispatcher.serve(data)
        self.assertEqual(dispatcher.counters["received"], 3)


class ReplyTests(SynchronousTestCase):
    """Reply frames: addressing, padding, errors, several targets."""

    def test_reply_frame(self) -> None:
        """A reply goes to the requester from our MAC with the AoE EtherType."""
        [reply] = make_dispatcher().serve(ethernet_frame(config_request(tag=TAG)))
        ethernet, header = decode(reply)
        self.assertEqual(
            (ethernet.dst, ethernet.src, ethernet.ethertype), (INITIATOR_MAC, TARGET_MAC, ETHERTYPE)
        )
        self.assertEqual((header.flag_response, header.tag), (True, TAG))

    def test_padding(self) -> None:
        """A short reply is padded to the 60-byte Ethernet minimum."""
        [reply] = make_dispatcher().serve(ethernet_frame(config_request()))
        self.assertEqual(len(reply), MIN_FRAME_SIZE)

    def test_long_reply_not_padded(self) -> None:
        """A reply longer than the minimum is sent as it is: a two-sector read."""
        [reply] = make_dispatcher().serve(ethernet_frame(ata_request(slot=1, count=2)))
        self.assertEqual(len(reply), 14 + 10 + 12 + 2 * SECTOR_SIZE)

    def test_counts_answers(self) -> None:
        """An answered frame is counted once, and each reply frame too."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2))
        dispatcher.serve(ethernet_frame(config_request()))
        self.assertEqual((dispatcher.counters["answered"], dispatcher.counters["replies"]), (1, 2))

    def test_broadcast_to_several_targets(self) -> None:
        """A broadcast query is answered by every target, each with its own address, in order."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2), make_target(5, 0))
        replies = dispatcher.serve(ethernet_frame(config_request()))
        addresses = [(h.major, h.minor) for _, h in map(decode, replies)]
        self.assertEqual(addresses, [(1, 1), (1, 2), (5, 0)])

    def test_shelf_wildcard_several_targets(self) -> None:
        """A query to one shelf's every slot is answered by that shelf's targets only."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2), make_target(5, 0))
        replies = dispatcher.serve(ethernet_frame(config_request(shelf=1)))
        self.assertEqual([decode(r)[1].minor for r in replies], [1, 2])

    def test_unicast_one_target(self) -> None:
        """A request to one shelf.slot is answered by that target alone."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2))
        [reply] = dispatcher.serve(ethernet_frame(ata_request(slot=2, count=2)))
        self.assertEqual((decode(reply)[1].major, decode(reply)[1].minor), (1, 2))

    def test_unknown_command(self) -> None:
        """An unknown command gets error 1 echoing the tag, from the addressed target."""
        data = config_request(shelf=1, slot=1, tag=TAG, aoe_command=9)
        [reply] = make_dispatcher().serve(ethernet_frame(data))
        _, header = decode(reply)
        self.assertEqual(
            (header.flag_error, header.error, header.command, header.tag),
            (True, Error.UNRECOGNIZED_COMMAND_CODE, 9, TAG),
        )

    def test_unknown_command_counted(self) -> None:
        """A frame answered with an error still counts as malformed."""
        dispatcher = make_dispatcher()
        data = config_request(shelf=1, slot=1, aoe_command=9)
        decision = dispatcher.frame_received(ethernet_frame(data))
        self.assertEqual(len(decision.replies), 1)
        self.assertEqual(dispatcher.counters["malformed"], 1)
        self.assertIn(INITIATOR_MAC.hex(":"), decision.malformed)

    def test_bad_version(self) -> None:
        """A request of another AoE version gets error 5 from every addressed target."""
        dispatcher = make_dispatcher(make_target(1, 1), make_target(1, 2))
        data = config_request(verflags=0x20)
        replies = dispatcher.serve(ethernet_frame(data))
        self.assertEqual(
            [(h.error, h.minor) for _, h in map(decode, replies)],
            [(Error.UNSUPPORTED_VERSION, 1), (Error.UNSUPPORTED_VERSION, 2)],
        )

    def test_padded_request(self) -> None:
        """A request padded to 60 bytes is answered like the unpadded one."""
        data = ethernet_frame(config_request(), pad=True)
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
            [(BROADCAST_MAC, TARGET_MAC, 1, 1), (BROADCAST_MAC, TARGET_MAC, 2, 3)],
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
        target = make_target(acl=MemoryACLStore(mask_list=(INITIATOR_MAC, OTHER_MAC)))
        frames = make_dispatcher(target).announcements()
        self.assertEqual([decode(f)[0].dst for f in frames], [INITIATOR_MAC, OTHER_MAC])


class PropertyTests(SynchronousTestCase):
    """``frame_received`` never raises, whatever arrives."""

    def dispatcher(self) -> Dispatcher:
        """Return a dispatcher with two targets at the addresses the strategies hit often."""
        return Dispatcher(TARGET_MAC, [make_target(0, 0), make_target(1, 1)])

    @settings(max_examples=300)
    @given(st.binary(max_size=200))
    def test_any_bytes(self, data: bytes) -> None:
        """Arbitrary bytes are counted and never raise."""
        dispatcher = self.dispatcher()
        for reply in dispatcher.serve(data):
            self.assertGreaterEqual(len(reply), MIN_FRAME_SIZE)
        self.assertEqual(dispatcher.counters["received"], 1)

    @settings(max_examples=300)
    @given(strategies.mutated_messages(), st.sampled_from([INITIATOR_MAC, OTHER_MAC]))
    def test_near_valid_messages(self, payload: bytes, src: bytes) -> None:
        """Mutated AoE messages never raise; every reply comes from us to the sender."""
        dispatcher = self.dispatcher()
        for reply in dispatcher.serve(ethernet_frame(payload, src)):
            ethernet, header = decode(reply)
            self.assertEqual((ethernet.dst, ethernet.src), (src, TARGET_MAC))
            self.assertTrue(header.flag_response)
        self.assertEqual(dispatcher.counters["unencodable"], 0)

    @settings(max_examples=200)
    @given(strategies.aoe_frames)
    def test_valid_frames(self, ethernet: EthernetFrame) -> None:
        """Well-formed AoE frames from any source never raise nor produce unencodable replies."""
        dispatcher = self.dispatcher()
        dispatcher.serve(ethernet.to_bytes())
        self.assertEqual(dispatcher.counters["unencodable"], 0)


def write_frame(lba: int = 0) -> bytes:
    """Return a frame of a one-sector WRITE SECTORS EXT to e1.1 at ``lba``."""
    data = b"\x5a" * SECTOR_SIZE
    return ethernet_frame(ata_request(ATACmdStatus.WRITE_48BIT, slot=1, lba=lba, data=data))


class DecisionTests(SynchronousTestCase):
    """What ``frame_received`` decides: replies now, disk operations, written targets."""

    def test_general_read_is_pending(self) -> None:
        """The general path answers a read with a pending operation, not with data."""
        dispatcher = Dispatcher(TARGET_MAC, [make_target()], fast_path=False)
        decision = dispatcher.frame_received(ethernet_frame(ata_request(slot=1, count=2)))
        self.assertEqual(decision.replies, ())
        [pending] = decision.pending
        self.assertEqual((pending.io.kind, pending.io.offset, pending.io.length), (1, 0, 1024))
        self.assertEqual(pending.initiator, INITIATOR_MAC)
        done = dispatcher.complete(pending, b"\x33" * 1024)
        [reply] = done.replies
        _, header = decode(reply)
        self.assertEqual(header.arg.data, b"\x33" * 1024)
        self.assertIsNone(done.written)
        self.assertEqual((dispatcher.counters.answered, dispatcher.counters.replies), (1, 1))

    def test_complete_out_of_order(self) -> None:
        """Operations of two targets complete in any order, each into its own reply."""
        dispatcher = Dispatcher(TARGET_MAC, [make_target(1, 1), make_target(1, 2)], fast_path=False)
        [first] = dispatcher.frame_received(ethernet_frame(ata_request(slot=1, count=2))).pending
        [second] = dispatcher.frame_received(ethernet_frame(ata_request(slot=2, count=2))).pending
        late = dispatcher.complete(second, b"\x02" * 1024).replies
        early = dispatcher.complete(first, b"\x01" * 1024).replies
        self.assertEqual([decode(r)[1].minor for r in late + early], [2, 1])
        self.assertEqual(decode(early[0])[1].arg.data, b"\x01" * 1024)

    def test_write_names_its_target(self) -> None:
        """A write's reply names the target written, by either path."""
        for fast_path in (True, False):
            target = make_target()
            dispatcher = Dispatcher(TARGET_MAC, [target], fast_path=fast_path)
            [reply] = dispatcher.serve(write_frame())
            self.assertFalse(decode(reply)[1].arg.cmd_status & ATACmdStatus.ERR_STATUS)
            decision = dispatcher.frame_received(write_frame(lba=1))
            if not fast_path:
                [pending] = decision.pending
                self.assertTrue(pending.writes)
                decision = dispatcher.complete(pending, None)
            self.assertIs(decision.written, target, fast_path)
            self.assertEqual(decision.refusal, b"", fast_path)

    def test_held_write_carries_its_refusal(self) -> None:
        """
        With ``hold_writes`` a write's decision carries its ABRT reply, the
        same by either path; the fast path still answers it, but not in place.
        """
        decisions = []
        for fast_path in (True, False):
            target = make_target()
            dispatcher = Dispatcher(TARGET_MAC, [target], fast_path=fast_path, hold_writes=True)
            slot = memoryview(bytearray(100))
            self.assertEqual(dispatcher.frame_received_into(write_frame(), slot), 0)
            decision = dispatcher.frame_received(write_frame())
            if fast_path:
                self.assertEqual(dispatcher.counters.fast, 1)
            else:
                [pending] = decision.pending
                decision = dispatcher.complete(pending, None)
            self.assertIs(decision.written, target)
            self.assertEqual(dispatcher.counters.replies, 1)
            decisions.append(decision)
        fast, general = decisions
        self.assertEqual((fast.replies, fast.refusal), (general.replies, general.refusal))
        _, ok = decode(fast.replies[0])
        _, refused = decode(fast.refusal)
        self.assertEqual(ok.arg.cmd_status, ATACmdStatus.READY_STATUS)
        self.assertEqual(
            refused.arg.cmd_status, ATACmdStatus.ERR_STATUS | ATACmdStatus.READY_STATUS
        )
        self.assertEqual(refused.arg.err_feature, 0x04)  # ABRT
        self.assertEqual((refused.tag, refused.minor), (ok.tag, ok.minor))

    def test_failed_write_is_not_written(self) -> None:
        """A write whose operation failed acknowledges nothing."""
        dispatcher = Dispatcher(TARGET_MAC, [make_target()], fast_path=False, hold_writes=True)
        [pending] = dispatcher.frame_received(write_frame()).pending
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
        data = config_request(ConfigCommand.FORCE_SET, b"hi", shelf=1, slot=1)
        decision = dispatcher.frame_received(ethernet_frame(data))
        [reply] = decision.replies
        _, answer = decode(reply)
        self.assertTrue(answer.flag_error)
        self.assertEqual(answer.error, Error.DEVICE_UNAVAILABLE)
        self.assertIn("No space left on device", decision.fault)
        self.assertIn("e1.1", decision.fault)
        self.assertEqual(dispatcher.counters.faults, 1)
