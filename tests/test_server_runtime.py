"""
Targets changed while serving (#12): ``Dispatcher`` and ``AoEProtocol``/``AoEService``.

The dispatcher's ``add``/``remove``/``replace``/``forget_removed`` are
tested on frames, with no reactor.  The rest runs the real ``AoEService``
and ``AoEPort`` over ``MemoryPacketSystem`` (which ``tests.test_port``
checks against real sockets) on a ``MemoryReactorClock``: targets added,
removed, replaced and moved between interfaces while other targets keep
answering; per-target group commit; the duplicate-address watch against a
second "server" built from the real core; the stats snapshot and the
logging of backend failures.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from attrs import evolve
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.stats import REQUEST_KINDS
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    ATAError,
    Command,
    ConfigArg,
    EthernetFrame,
    Header,
    MACMaskCommand,
    ReserveReleaseCommand,
    format_mac,
)
from aoe_twisted.interfaces import IDiskIdentity
from aoe_twisted.server import AoEService
from aoe_twisted.testing import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    MemoryPacketSystem,
    ata_request,
    config_request,
    ethernet_frame,
    mask_request,
    reserve_request,
)

SIZE = 64 * SECTOR_SIZE
#: The second interface's MAC (the first is ``TARGET_MAC``).
SECOND_MAC = bytes.fromhex("02bb00000001")
#: ``ERR|DRDY``: the status of a refused ATA command.
ERR_DRDY = ATACmdStatus.READY_STATUS | ATACmdStatus.ERR_STATUS


def memory_target(shelf: int = 1, slot: int = 2, fill: int = 0, **kwargs: Any) -> Target:
    """A target on a fresh memory disk whose every byte is ``fill``."""
    backend = MemoryBackend(SIZE)
    if fill:
        backend.write(0, bytes([fill]) * SIZE)
    return Target(shelf, slot, backend, **kwargs)


def decode(frame: bytes) -> tuple[EthernetFrame, Header]:
    """Decode a frame a server sent."""
    ethernet = EthernetFrame.from_bytes(frame)
    return ethernet, Header.from_bytes(ethernet.payload)


def ata_of(frame: bytes) -> ATAArg:
    """The ATA argument of a reply frame."""
    arg = decode(frame)[1].arg
    assert isinstance(arg, ATAArg), arg
    return arg


def read(shelf: int = 1, slot: int = 2, lba: int = 0, tag: int = 0x100, **kw: Any) -> bytes:
    """A READ SECTORS EXT of one sector, from the initiator."""
    return ethernet_frame(ata_request(lba=lba, shelf=shelf, slot=slot, tag=tag), **kw)


def write(
    shelf: int = 1, slot: int = 2, lba: int = 0, fill: int = 0x55, tag: int = 0x200, **kw: Any
) -> bytes:
    """A WRITE SECTORS EXT of one sector of ``fill``, from the initiator."""
    data = bytes([fill]) * SECTOR_SIZE
    message = ata_request(
        ATACmdStatus.WRITE_48BIT, lba=lba, data=data, shelf=shelf, slot=slot, tag=tag
    )
    return ethernet_frame(message, **kw)


def identify(shelf: int = 1, slot: int = 2, tag: int = 0x300, **kw: Any) -> bytes:
    """An IDENTIFY DEVICE, from the initiator."""
    return ethernet_frame(ata_request(ATACmdStatus.IDENTIFY, shelf=shelf, slot=slot, tag=tag), **kw)


def config_query(shelf: int = 1, slot: int = 2, tag: int = 0x400) -> bytes:
    """A config read sent to one address (not a broadcast), from the initiator."""
    return ethernet_frame(config_request(shelf=shelf, slot=slot, tag=tag))


#: A broadcast config query, as ``aoe-discover`` sends it.
DISCOVERY = ethernet_frame(config_request(tag=7), dst=BROADCAST_MAC)


def assert_aborted(
    case: SynchronousTestCase, frame: bytes, shelf: int, slot: int, tag: int
) -> None:
    """Check ``frame`` refuses request ``tag`` to ``shelf``.``slot`` with ``ERR|DRDY``/``ABRT``."""
    _, header = decode(frame)
    case.assertTrue(header.flag_response)
    case.assertFalse(header.flag_error)
    case.assertEqual((header.major, header.minor), (shelf, slot))
    case.assertEqual(header.tag, tag.to_bytes(4, "big"))
    arg = ata_of(frame)
    case.assertEqual(arg.cmd_status, ERR_DRDY)
    case.assertEqual(arg.err_feature, ATAError.ABRT)


def assert_succeeded(case: SynchronousTestCase, frame: bytes) -> ATAArg:
    """Check ``frame`` is a successful ATA reply; return its argument."""
    _, header = decode(frame)
    case.assertFalse(header.flag_error)
    arg = ata_of(frame)
    case.assertEqual(arg.cmd_status, ATACmdStatus.READY_STATUS)
    return arg


# -- the dispatcher -----------------------------------------------------------------


class DispatcherChangeTests(SynchronousTestCase):
    """``Dispatcher.add``/``remove``/``replace``/``forget_removed``, on frames."""

    def setUp(self) -> None:
        self.first = memory_target(1, 1, fill=0x11)
        self.dispatcher = Dispatcher(TARGET_MAC, [self.first])

    def test_add(self) -> None:
        """A target added is answered from the next frame on; before, its address is not."""
        self.assertEqual(self.dispatcher.serve(identify(1, 2)), [])
        second = memory_target(1, 2, fill=0x22)
        self.dispatcher.add(second)
        (reply,) = self.dispatcher.serve(read(1, 2))
        self.assertEqual(assert_succeeded(self, reply).data, b"\x22" * SECTOR_SIZE)
        self.assertIs(self.dispatcher.index[(1, 2)], second)
        self.assertEqual(len(self.dispatcher.serve(DISCOVERY)), 2)

    def test_add_taken_address(self) -> None:
        """Adding a target at an address already served raises; the first one stays."""
        exc = self.assertRaises(ValueError, self.dispatcher.add, memory_target(1, 1))
        self.assertEqual(str(exc), "two targets at e1.1")
        self.assertEqual(self.dispatcher.targets, [self.first])
        (reply,) = self.dispatcher.serve(read(1, 1))
        self.assertEqual(assert_succeeded(self, reply).data, b"\x11" * SECTOR_SIZE)

    def test_remove_silent(self) -> None:
        """A target removed (without ``answer_removed``) is returned, then silent at once."""
        self.assertIs(self.dispatcher.remove(1, 1), self.first)
        self.assertEqual(self.dispatcher.targets, [])
        for frame in (read(1, 1), write(1, 1), config_query(1, 1), DISCOVERY):
            self.assertEqual(self.dispatcher.serve(frame), [])
        self.assertEqual(self.dispatcher.removed, {})

    def test_remove_unknown(self) -> None:
        """Removing an address nobody serves returns ``None`` and changes nothing."""
        self.assertIsNone(self.dispatcher.remove(1, 9, answer_removed=True))
        self.assertEqual(self.dispatcher.removed, {})
        self.assertEqual(self.dispatcher.serve(read(1, 9)), [])

    def test_removed_ata_aborted(self) -> None:
        """
        With ``answer_removed``, an ATA request (read, write, IDENTIFY) for the
        removed address is answered ``ERR|DRDY``/``ABRT`` with its tag, and a
        write does not reach the disk.
        """
        self.dispatcher.remove(1, 1, answer_removed=True)
        for frame, tag in ((read(1, 1, tag=5), 5), (write(1, 1, tag=6), 6),
                           (identify(1, 1, tag=7), 7)):  # fmt: skip
            (reply,) = self.dispatcher.serve(frame)
            assert_aborted(self, reply, 1, 1, tag)
            ethernet, _ = decode(reply)
            self.assertEqual((ethernet.dst, ethernet.src), (INITIATOR_MAC, TARGET_MAC))
        self.assertEqual(self.first.backend.read(0, SECTOR_SIZE), b"\x11" * SECTOR_SIZE)

    def test_removed_config_silent(self) -> None:
        """
        A removed address answers no config query, unicast or broadcast (it is
        not discovered again), nor mask and reserve requests.
        """
        self.dispatcher.remove(1, 1, answer_removed=True)
        for frame in (
            config_query(1, 1),
            DISCOVERY,
            ethernet_frame(mask_request(shelf=1, slot=1)),
            ethernet_frame(reserve_request(shelf=1, slot=1)),
        ):
            self.assertEqual(self.dispatcher.serve(frame), [])

    def test_forget_removed(self) -> None:
        """After ``forget_removed`` a removed address is silent to ATA requests too."""
        self.dispatcher.remove(1, 1, answer_removed=True)
        self.assertEqual(len(self.dispatcher.serve(read(1, 1))), 1)
        self.dispatcher.forget_removed(1, 1)
        self.assertEqual(self.dispatcher.serve(read(1, 1)), [])
        self.assertEqual(self.dispatcher.removed, {})

    def test_add_again_after_remove(self) -> None:
        """A removed address served again answers normally, not as removed."""
        self.dispatcher.remove(1, 1, answer_removed=True)
        again = memory_target(1, 1, fill=0x33)
        self.dispatcher.add(again)
        self.assertEqual(self.dispatcher.removed, {})
        (reply,) = self.dispatcher.serve(read(1, 1))
        self.assertEqual(assert_succeeded(self, reply).data, b"\x33" * SECTOR_SIZE)

    def test_replace(self) -> None:
        """``replace`` returns the old target; the next frame is answered by the new one."""
        second = memory_target(1, 2)
        self.dispatcher.add(second)
        new = memory_target(1, 1, fill=0x44, buffer_count=7)
        self.assertIs(self.dispatcher.replace(new), self.first)
        self.assertEqual(self.dispatcher.targets, [new, second])
        (reply,) = self.dispatcher.serve(read(1, 1))
        self.assertEqual(assert_succeeded(self, reply).data, b"\x44" * SECTOR_SIZE)
        (reply,) = self.dispatcher.serve(config_query(1, 1))
        arg = decode(reply)[1].arg
        assert isinstance(arg, ConfigArg)
        self.assertEqual(arg.buffer_count, 7)

    def test_replace_unknown(self) -> None:
        """Replacing at an address nobody serves raises ``KeyError``."""
        self.assertRaises(KeyError, self.dispatcher.replace, memory_target(1, 9))


# -- the service on a fake packet system ----------------------------------------------


class ServiceHarness:
    """A service on ``eth0`` (``TARGET_MAC``) and ``eth1`` (``SECOND_MAC``) of a fake system."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem()
        self.nics = {
            "eth0": self.system.add_interface("eth0", mac=TARGET_MAC),
            "eth1": self.system.add_interface("eth1", mac=SECOND_MAC),
        }

    def serve(self, *targets: Target, interfaces: Any = "eth0", **kwargs: Any) -> AoEService:
        """Start a service for ``targets`` on ``interfaces``; return it."""
        service = AoEService(
            interfaces, list(targets), reactor=self.reactor, system=self.system, **kwargs
        )
        service.privilegedStartService()
        service.startService()
        self.service = service
        self.addCleanup(self._stop)  # type: ignore[attr-defined]
        return service

    def _stop(self) -> None:
        if self.service.running:
            self.service.stopService()
            self.reactor.advance(0)

    def sent(self, interface: str = "eth0") -> list[bytes]:
        """Every frame the service has sent on ``interface``."""
        return self.system.socket_for(self.service.ports[interface]).sent

    def answer(self, *frames: bytes, interface: str = "eth0") -> list[bytes]:
        """Deliver ``frames`` (to ``interface``'s MAC) in one drain; return what was sent."""
        nic = self.nics[interface]
        before = len(self.sent(interface))
        for frame in frames:
            frame = nic.mac + frame[6:] if frame[:6] == TARGET_MAC else frame
            nic.receive(frame)
        self.service.ports[interface].doRead()
        return list(self.sent(interface)[before:])

    def protocol_on(self, interface: str = "eth0") -> Any:
        """The protocol serving ``interface``."""
        return self.service.protocols[interface]


def announcements(frames: list[bytes]) -> list[tuple[int, int]]:
    """The addresses announced (tag-0 config replies to broadcast) among ``frames``."""
    found = []
    for frame in frames:
        ethernet, header = decode(frame)
        if (
            ethernet.dst == BROADCAST_MAC
            and header.flag_response
            and header.command == Command.QUERY_CONFIG_INFORMATION
            and header.tag == bytes(4)
        ):
            found.append((header.major, header.minor))
    return found


class AddRemoveTests(ServiceHarness, SynchronousTestCase):
    """Targets added and removed while the service runs."""

    def test_added_target_announced_and_answers(self) -> None:
        """
        A target added while serving is announced at once (a config reply to
        broadcast from the interface's MAC), answers requests, and its
        address joins the port's kernel filter.
        """
        self.serve(memory_target(1, 1))
        before = len(self.sent())
        self.assertEqual(self.answer(identify(1, 2)), [])
        added = memory_target(1, 2, fill=0x66)
        self.service.add_target(added)
        new = self.sent()[before:]
        self.assertEqual(announcements(new), [(1, 2)])
        self.assertEqual(EthernetFrame.from_bytes(new[0]).src, TARGET_MAC)
        (reply,) = self.answer(read(1, 2))
        self.assertEqual(assert_succeeded(self, reply).data, b"\x66" * SECTOR_SIZE)
        self.assertEqual(self.service.ports["eth0"].filtered_addresses, {(1, 1), (1, 2)})
        self.assertIs(self.service.target(1, 2), added)

    def test_add_taken_address(self) -> None:
        """Adding a target at an address served raises ``ValueError``; nothing changes."""
        first = memory_target(1, 2, fill=0x11)
        self.serve(first)
        self.assertRaises(ValueError, self.service.add_target, memory_target(1, 2))
        self.assertEqual(self.service.targets, [first])
        (reply,) = self.answer(read(1, 2))
        self.assertEqual(assert_succeeded(self, reply).data, b"\x11" * SECTOR_SIZE)

    def test_removed_aborted_during_grace_then_silent(self) -> None:
        """
        A removed target's address answers ATA requests ``ERR|DRDY``/``ABRT``
        during ``removed_grace`` (config queries get nothing), then nothing;
        the kernel filter passes the address only while it is answered.
        """
        self.serve(memory_target(1, 1), memory_target(1, 2), removed_grace=30.0)
        self.service.remove_target(1, 2)
        (reply,) = self.answer(read(1, 2, tag=0x51))
        assert_aborted(self, reply, 1, 2, 0x51)
        self.assertEqual(self.answer(config_query(1, 2)), [])
        self.assertEqual([decode(r)[1].minor for r in self.answer(DISCOVERY)], [1])
        port = self.service.ports["eth0"]
        self.assertEqual(port.filtered_addresses, {(1, 1), (1, 2)})
        self.reactor.advance(29.9)
        (reply,) = self.answer(write(1, 2, tag=0x52))
        assert_aborted(self, reply, 1, 2, 0x52)
        self.reactor.advance(0.2)
        self.assertEqual(self.answer(read(1, 2, tag=0x53)), [])
        self.assertEqual(port.filtered_addresses, {(1, 1)})
        self.assertEqual(len(self.answer(read(1, 1))), 1)

    def test_removed_without_grace_silent(self) -> None:
        """With no ``removed_grace`` a removed target is silent at once."""
        self.serve(memory_target(1, 1), memory_target(1, 2))
        self.service.remove_target(1, 2)
        self.assertEqual(self.answer(read(1, 2)), [])
        self.assertEqual(self.service.ports["eth0"].filtered_addresses, {(1, 1)})

    def test_remove_closes_backend(self) -> None:
        """
        ``remove_target`` returns the target, closes its disk (once flushed)
        and logs one line naming it; the other target's disk stays open.
        """
        kept = memory_target(1, 1)
        gone = memory_target(1, 2, spec="memory:32K")
        self.serve(kept, gone)
        with capturedLogs() as events:
            self.assertIs(self.service.remove_target(1, 2), gone)
        self.assertRaises(ValueError, gone.backend.read, 0, SECTOR_SIZE)
        self.assertEqual(kept.backend.read(0, 1), b"\x00")
        self.assertIsNone(self.service.target(1, 2))
        self.assertEqual(self.service.targets, [kept])
        lines = [formatEvent(e) for e in events if e["log_format"].startswith("removed")]
        self.assertEqual(lines, ["removed e1.2 = memory:32K"])
        self.assertIsNone(self.service.remove_target(1, 2))

    def test_remove_then_add_again(self) -> None:
        """An address removed during its grace and added again answers from the new disk."""
        self.serve(memory_target(1, 2), removed_grace=30.0)
        self.service.remove_target(1, 2)
        self.service.add_target(memory_target(1, 2, fill=0x77))
        (reply,) = self.answer(read(1, 2))
        self.assertEqual(assert_succeeded(self, reply).data, b"\x77" * SECTOR_SIZE)
        self.reactor.advance(31)
        (reply,) = self.answer(read(1, 2))
        self.assertEqual(assert_succeeded(self, reply).data, b"\x77" * SECTOR_SIZE)


class ReplaceTests(ServiceHarness, SynchronousTestCase):
    """``replace_target``: a target's options or disk changed while the others keep serving."""

    def test_others_keep_serving(self) -> None:
        """
        Frames for another target before the change, queued across it and
        after it are all answered, in order; the changed target answers
        from its new disk at once and its old disk is closed.
        """
        other = memory_target(1, 1, fill=0x11)
        old = memory_target(1, 2, fill=0x22)
        self.serve(other, old)
        first = self.answer(*(read(1, 1, tag=t) for t in range(1, 4)))
        self.assertEqual(len(first), 3)
        # Queued in the socket before the change, read after it.
        for tag in range(4, 7):
            self.nics["eth0"].receive(read(1, 1, tag=tag))
        self.nics["eth0"].receive(read(1, 2, tag=7))
        new = memory_target(1, 2, fill=0x99)
        self.assertIs(self.service.replace_target(new), old)
        later = self.answer(read(1, 1, tag=8), read(1, 2, tag=9))
        replies = first + later
        self.assertEqual(
            [int.from_bytes(decode(r)[1].tag, "big") for r in replies], list(range(1, 10))
        )
        for reply in replies:
            minor = decode(reply)[1].minor
            fill = 0x11 if minor == 1 else 0x99
            self.assertEqual(assert_succeeded(self, reply).data, bytes([fill]) * SECTOR_SIZE)
        self.assertRaises(ValueError, old.backend.read, 0, SECTOR_SIZE)
        self.assertIs(self.service.target(1, 2), new)

    def test_same_backend_kept_open(self) -> None:
        """
        A replacement on the same disk object (options changed) keeps it open,
        and the next config reply carries the new options.
        """
        old = memory_target(1, 2, fill=0x22, buffer_count=16)
        self.serve(old)
        self.service.replace_target(evolve(old, buffer_count=9))
        self.assertEqual(old.backend.read(0, 1), b"\x22")
        (reply,) = self.answer(config_query(1, 2))
        arg = decode(reply)[1].arg
        assert isinstance(arg, ConfigArg)
        self.assertEqual(arg.buffer_count, 9)

    def test_unknown_address(self) -> None:
        """Replacing a target that is not served raises ``KeyError``."""
        self.serve(memory_target(1, 1))
        self.assertRaises(KeyError, self.service.replace_target, memory_target(1, 2))


class _CountingDisk(MemoryBackend):
    """A memory disk that records its syncs and how many frames were sent at each."""

    def __init__(self, size: int, sent: Any = None) -> None:
        super().__init__(size)
        self.syncs: list[int] = []
        self.sent = sent

    def sync_data(self) -> None:
        self.syncs.append(len(self.sent()) if self.sent is not None else -1)


class PerTargetSyncTests(ServiceHarness, SynchronousTestCase):
    """A target's own ``sync``: its writes alone wait for group commit."""

    def setUp(self) -> None:
        super().setUp()
        self.durable = Target(1, 1, _CountingDisk(SIZE, lambda: self.sent()), sync=True)
        self.plain = Target(1, 2, _CountingDisk(SIZE, lambda: self.sent()))
        self.serve(self.durable, self.plain)
        self.protocol = self.protocol_on()

    def test_only_sync_target_held(self) -> None:
        """
        A write to a target without ``sync`` is acknowledged at once; one to
        the ``sync`` target is held until ``drainFinished``, which syncs its
        disk once, then sends it.
        """
        sent = self.sent()
        before = len(sent)
        self.protocol.datagramReceived(write(1, 2, tag=1))
        self.assertEqual(len(sent), before + 1)
        self.protocol.datagramReceived(write(1, 1, tag=2))
        self.assertEqual(len(sent), before + 1)
        self.assertEqual(self.durable.backend.syncs, [])
        self.protocol.drainFinished()
        self.assertEqual(len(sent), before + 2)
        self.assertEqual(self.durable.backend.syncs, [before + 1])
        assert_succeeded(self, sent[-1])
        self.assertEqual(decode(sent[-1])[1].tag, (2).to_bytes(4, "big"))
        self.assertEqual(self.plain.backend.syncs, [])

    def test_drain_through_port(self) -> None:
        """
        Through the port, the sync target's disk is synced before its write is
        acknowledged, once per drain, and a drain of writes to the other
        target alone syncs nothing.
        """
        before = len(self.sent())
        replies = self.answer(write(1, 2, tag=1), write(1, 1, tag=2), write(1, 1, tag=3))
        self.assertEqual([int.from_bytes(decode(r)[1].tag, "big") for r in replies], [1, 2, 3])
        self.assertEqual(self.durable.backend.syncs, [before + 1])
        self.assertEqual(self.protocol.synced_writes, 2)
        self.answer(write(1, 2, tag=4), write(1, 2, tag=5))
        self.assertEqual(self.plain.backend.syncs, [])
        self.assertEqual(self.durable.backend.syncs, [before + 1])

    def test_held_behind_is_not_synced(self) -> None:
        """
        A write to the target without ``sync`` that arrives after a ``sync``
        write waits behind it (replies keep their order) but its disk is not
        synced: it never asked for durability.
        """
        replies = self.answer(write(1, 1, tag=1), write(1, 2, tag=2))
        self.assertEqual([int.from_bytes(decode(r)[1].tag, "big") for r in replies], [1, 2])
        self.assertEqual(len(self.durable.backend.syncs), 1)
        self.assertEqual(self.plain.backend.syncs, [])

    def test_replace_sends_held_replies_first(self) -> None:
        """Replacing the sync target first syncs its old disk and sends the held reply."""
        sent = self.sent()
        before = len(sent)
        self.protocol.datagramReceived(write(1, 1, tag=2))
        self.assertEqual(len(sent), before)
        self.service.replace_target(evolve(self.durable, sync=False))
        self.assertEqual(self.durable.backend.syncs, [before])
        self.assertEqual(len(sent), before + 1)
        assert_succeeded(self, sent[-1])


class PlacementTests(ServiceHarness, SynchronousTestCase):
    """Targets placed on some interfaces only, added there, moved between them."""

    def test_placed_target_answers_only_there(self) -> None:
        """
        A target placed on ``eth1`` is announced and answered on ``eth1`` only
        (from its MAC); a target not placed is on both.
        """
        self.serve(
            memory_target(1, 1),
            memory_target(1, 2),
            interfaces=["eth0", "eth1"],
            placement={(1, 2): ("eth1",)},
        )
        self.assertEqual(announcements(self.sent("eth0")), [(1, 1)])
        self.assertEqual(announcements(self.sent("eth1")), [(1, 1), (1, 2)])
        self.assertEqual(self.answer(read(1, 2), interface="eth0"), [])
        (reply,) = self.answer(read(1, 2), interface="eth1")
        self.assertEqual(EthernetFrame.from_bytes(reply).src, SECOND_MAC)
        self.assertEqual(len(self.answer(read(1, 1), interface="eth0")), 1)
        self.assertEqual(len(self.answer(read(1, 1), interface="eth1")), 1)

    def test_add_target_opens_interface(self) -> None:
        """
        A target added on an interface not served yet opens it; the target
        is announced and answered there and not on the first interface (nor
        is the first interface's target, placed there, on the new one).
        """
        self.serve(memory_target(1, 1), placement={(1, 1): ("eth0",)})
        self.assertEqual(list(self.service.ports), ["eth0"])
        self.service.add_target(memory_target(1, 2), ["eth1"])
        self.assertEqual(list(self.service.ports), ["eth0", "eth1"])
        self.assertEqual(self.service.interfaces_of(self.service.target(1, 2)), ("eth1",))
        self.assertEqual(announcements(self.sent("eth1")), [(1, 2)])
        self.assertEqual(self.answer(read(1, 2), interface="eth0"), [])
        self.assertEqual(len(self.answer(read(1, 2), interface="eth1")), 1)
        self.assertEqual(len(self.answer(read(1, 1), interface="eth0")), 1)
        self.assertEqual(self.answer(read(1, 1), interface="eth1"), [])

    def test_replace_moves_between_interfaces(self) -> None:
        """
        A replacement placed on another interface stops on the old one and
        starts on the new one (announced there); the old disk is closed.
        """
        old = memory_target(1, 2, fill=0x22)
        self.serve(old, interfaces=["eth0", "eth1"], placement={(1, 2): ("eth0",)})
        before = len(self.sent("eth1"))
        self.service.replace_target(memory_target(1, 2, fill=0x33), ["eth1"])
        self.assertEqual(announcements(self.sent("eth1")[before:]), [(1, 2)])
        self.assertEqual(self.answer(read(1, 2), interface="eth0"), [])
        (reply,) = self.answer(read(1, 2), interface="eth1")
        self.assertEqual(assert_succeeded(self, reply).data, b"\x33" * SECTOR_SIZE)
        self.assertRaises(ValueError, old.backend.read, 0, SECTOR_SIZE)

    def test_leaving_one_path_is_not_a_removal(self) -> None:
        """
        A target that stays served on ``eth1`` but leaves ``eth0`` is not
        removed: ``eth0`` goes silent (the initiator retransmits on its
        other path), it does not fail the request with ``ABRT`` during
        ``removed_grace`` as for a target that is gone.
        """
        served = memory_target(1, 2)
        self.serve(served, interfaces=["eth0", "eth1"], removed_grace=30.0)
        self.service.replace_target(evolve(served), ["eth1"])
        self.assertEqual(len(self.answer(read(1, 2), interface="eth1")), 1)
        self.assertEqual(self.answer(read(1, 2), interface="eth0"), [])


# -- duplicate addresses ---------------------------------------------------------


@implementer(IDiskIdentity)
class _SharedDisk(MemoryBackend):
    """A memory disk that names itself: two with one name are one (shared) disk."""

    def __init__(self, size: int, identity: bytes) -> None:
        super().__init__(size)
        self.identity = identity

    def disk_identity(self) -> bytes:
        return self.identity


class DuplicateTests(ServiceHarness, SynchronousTestCase):
    """The duplicate watch: ask the segment first, refuse a duplicate, accept a second path."""

    wait = 0.5

    def other_server(self, backend: Any) -> Dispatcher:
        """Another server on the segment (``OTHER_MAC``) serving e1.2 from ``backend``."""
        return Dispatcher(OTHER_MAC, [Target(1, 2, backend)])

    def hear(self, frames: list[bytes]) -> list[bytes]:
        """Deliver another server's ``frames`` to ``eth0``; return what we sent meanwhile."""
        return self.answer(*frames)

    def pump(self, seconds: float) -> None:
        """Let ``seconds`` pass in steps of the watch's tick."""
        self.reactor.pump([0.05] * round(seconds / 0.05))

    def converse(self, other: Dispatcher) -> None:
        """Let ``other`` answer our probe, then the IDENTIFY request it brings."""
        probe = self.sent()[0]
        _, header = decode(probe)
        self.assertFalse(header.flag_response)
        self.assertEqual(header.command, Command.QUERY_CONFIG_INFORMATION)
        (ask,) = self.hear(other.serve(probe))
        ethernet, _request = decode(ask)
        self.assertEqual(ethernet.dst, OTHER_MAC)
        self.assertEqual(ata_of(ask).cmd_status, ATACmdStatus.IDENTIFY)
        self.assertEqual(self.hear(other.serve(ask)), [])

    def test_probing_then_serving(self) -> None:
        """
        With ``duplicate_wait`` a target is first asked about (a broadcast
        config query for its address), not announced or answered; once the
        wait is over with no other server, it is served and announced.
        """
        self.serve(memory_target(1, 2), duplicate_wait=self.wait)
        (probe,) = self.sent()
        ethernet, header = decode(probe)
        self.assertEqual((ethernet.dst, ethernet.src), (BROADCAST_MAC, TARGET_MAC))
        self.assertEqual((header.major, header.minor, header.flag_response), (1, 2, False))
        self.assertEqual(self.answer(identify()), [])
        target = self.service.targets[0]
        self.assertEqual(self.service.state_of(target), ("probing", None, ()))
        self.pump(self.wait - 0.1)
        self.assertEqual(self.answer(identify()), [])
        self.pump(0.2)
        self.assertEqual(announcements(self.sent()), [(1, 2)])
        self.assertEqual(len(self.answer(identify())), 1)
        self.assertEqual(self.service.state_of(target), ("serving", None, ()))

    def test_added_target_probed(self) -> None:
        """A target added while serving is asked about too before it is answered."""
        self.serve(memory_target(1, 1), duplicate_wait=self.wait)
        self.pump(self.wait + 0.1)
        added = memory_target(1, 2)
        self.service.add_target(added)
        self.assertEqual(self.answer(identify()), [])
        self.assertEqual(self.service.state_of(added)[0], "probing")
        self.pump(self.wait - 0.1)
        self.assertEqual(self.answer(identify()), [])
        self.pump(0.2)
        self.assertEqual(len(self.answer(identify())), 1)

    def test_duplicate_refused(self) -> None:
        """
        Another server answering for the address with another disk: the address
        is never served, a critical line names both MACs, ``state_of`` says
        ``duplicate`` with the other MAC.
        """
        self.serve(memory_target(1, 2), duplicate_wait=self.wait)
        with capturedLogs() as events:
            self.converse(self.other_server(MemoryBackend(2 * SIZE)))
        critical = [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1, critical)
        self.assertIn(format_mac(OTHER_MAC), critical[0])
        self.assertIn(format_mac(TARGET_MAC), critical[0])
        self.assertIn("e1.2", critical[0])
        target = self.service.targets[0]
        self.assertEqual(self.service.state_of(target), ("duplicate", OTHER_MAC, ()))
        self.pump(self.wait + 1)
        self.assertEqual(self.answer(identify()), [])
        self.assertEqual(announcements(self.sent()), [])

    def test_duplicate_after_serving(self) -> None:
        """
        A server that comes up later and announces the address: it is
        judged a duplicate, and the address stops being answered.
        """
        self.serve(memory_target(1, 2), duplicate_wait=self.wait)
        self.pump(self.wait + 0.1)
        self.assertEqual(len(self.answer(identify())), 1)
        other = self.other_server(MemoryBackend(SIZE))
        with capturedLogs() as events:
            (ask,) = self.hear(other.announcements())
            self.hear(other.serve(ask))
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.critical]), 1)
        self.assertEqual(self.answer(identify()), [])
        self.assertEqual(self.service.state_of(self.service.targets[0])[0], "duplicate")

    def test_second_path(self) -> None:
        """
        Another server serving the same disk (equal identities) is a second
        path: an info line, the address served after the wait, its MAC in
        ``paths``.
        """
        ours = _SharedDisk(SIZE, b"shared disk 7")
        verifyObject(IDiskIdentity, ours)
        self.serve(Target(1, 2, ours), duplicate_wait=self.wait)
        with capturedLogs() as events:
            self.converse(self.other_server(_SharedDisk(SIZE, b"shared disk 7")))
        lines = [formatEvent(e) for e in events if "second path" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.critical], [])
        self.pump(self.wait + 0.1)
        self.assertEqual(len(self.answer(identify())), 1)
        target = self.service.targets[0]
        self.assertEqual(self.service.state_of(target), ("serving", None, (OTHER_MAC,)))

    def test_other_identity_is_duplicate(self) -> None:
        """Both disks with identities, but different ones: a duplicate."""
        self.serve(Target(1, 2, _SharedDisk(SIZE, b"disk A")), duplicate_wait=self.wait)
        self.converse(self.other_server(_SharedDisk(SIZE, b"disk B")))
        self.pump(self.wait + 0.1)
        self.assertEqual(self.answer(identify()), [])
        self.assertEqual(self.service.state_of(self.service.targets[0])[0], "duplicate")

    def test_remove_and_add_retries(self) -> None:
        """A refused address removed and added again is asked about afresh."""
        self.serve(memory_target(1, 2), duplicate_wait=self.wait)
        self.converse(self.other_server(MemoryBackend(SIZE)))
        self.service.remove_target(1, 2)
        added = memory_target(1, 2)
        self.service.add_target(added)
        self.assertEqual(self.service.state_of(added), ("probing", None, ()))
        self.pump(self.wait + 0.1)
        self.assertEqual(len(self.answer(identify())), 1)


# -- what the server did ----------------------------------------------------------


class SnapshotTests(ServiceHarness, SynchronousTestCase):
    """``AoEService.snapshot``: the figures of every target and interface."""

    def test_figures(self) -> None:
        """After a known set of frames the snapshot holds exactly their counts."""
        self.reactor.advance(1000)
        self.serve(memory_target(1, 2, spec="memory:32K"))
        response = ethernet_frame(config_request(tag=9, verflags=0x18), src=OTHER_MAC)
        replies = self.answer(
            read(lba=0, tag=1),
            read(lba=1, tag=2),
            read(lba=1, tag=2),  # the same tag again: a retransmission
            write(lba=3, tag=3),
            identify(tag=4),
            DISCOVERY,
            ethernet_frame(mask_request(MACMaskCommand.READ, shelf=1, slot=2, tag=5)),
            ethernet_frame(reserve_request(ReserveReleaseCommand.READ, shelf=1, slot=2, tag=6)),
            read(1, 9, tag=10),  # nobody's address
            response,  # another server's reply
        )
        self.assertEqual(len(replies), 8)
        self.reactor.pump([1.0] * 5)
        snapshot = self.service.snapshot()
        self.assertEqual(snapshot["time"], 1005.0)
        (target,) = snapshot["targets"]
        self.assertEqual(
            set(target),
            {"target", "backend", "requests", "bytes", "errors", "in_flight", "retransmits",
             "service_seconds", "initiators"},
        )
        self.assertEqual((target["target"], target["backend"]), ("e1.2", "memory:32K"))
        self.assertEqual(set(target["requests"]), set(REQUEST_KINDS))
        self.assertEqual(
            target["requests"],
            {"read": 3, "write": 1, "identify": 1, "flush": 0, "other_ata": 0, "config": 1,
             "mask": 1, "reserve": 1},
        )
        self.assertEqual(target["bytes"], {"read": 3 * SECTOR_SIZE, "write": SECTOR_SIZE})
        self.assertEqual(target["errors"], {"ata": 0})
        self.assertEqual((target["in_flight"], target["retransmits"]), (0, 1))
        histogram = target["service_seconds"]
        self.assertEqual(histogram["count"], 4)
        self.assertEqual(histogram["buckets"][-1], ["+Inf", 4])
        self.assertEqual(
            target["initiators"],
            [{"mac": format_mac(INITIATOR_MAC), "frames": 8, "last_seen": 1001.0}],
        )
        (interface,) = snapshot["interfaces"]
        self.assertEqual(
            interface,
            {"interface": "eth0", "mac": format_mac(TARGET_MAC), "mtu": 1500,
             "received": 10, "sent": 1 + 8, "ignored": 2, "dropped": 0,
             "malformed": 0, "stale": 0},
        )
        self.assertEqual(
            snapshot["initiators"],
            [{"mac": format_mac(INITIATOR_MAC), "targets": ["e1.2"], "frames": 8,
              "last_seen": 1001.0}],
        )

    def test_ata_error_counted(self) -> None:
        """A read past the end of the disk is an ATA error in the snapshot."""
        self.serve(memory_target(1, 2))
        (reply,) = self.answer(read(lba=SIZE // SECTOR_SIZE))
        self.assertTrue(ata_of(reply).cmd_status & ATACmdStatus.ERR_STATUS)
        self.assertEqual(self.service.snapshot()["targets"][0]["errors"], {"ata": 1})

    def test_aoe_errors_counted(self) -> None:
        """
        Every AoE error reply a target sends is counted by its code: a request
        with AoE version 2 (``aoe_unsupported_version``) and one with an
        unknown command (``aoe_bad_command``) are answered with errors, so
        they appear in ``errors``.
        """
        self.serve(memory_target(1, 2))
        version = ethernet_frame(config_request(shelf=1, slot=2, tag=1, verflags=0x20))
        command = ethernet_frame(config_request(shelf=1, slot=2, tag=2, aoe_command=9))
        replies = self.answer(version, command)
        self.assertEqual([decode_error(r) for r in replies], [5, 1])
        errors = self.service.snapshot()["targets"][0]["errors"]
        self.assertEqual(
            errors, {"ata": 0, "aoe_bad_command": 1, "aoe_unsupported_version": 1}
        )

    def test_removed_target_leaves_snapshot(self) -> None:
        """A removed target is no longer in the snapshot; an added one is, from zero."""
        self.serve(memory_target(1, 1), memory_target(1, 2))
        self.answer(read(1, 2))
        self.service.remove_target(1, 2)
        self.service.add_target(memory_target(1, 3))
        names = [t["target"] for t in self.service.snapshot()["targets"]]
        self.assertEqual(names, ["e1.1", "e1.3"])


def decode_error(frame: bytes) -> int:
    """The AoE error code of an error reply (read from the header: it may not decode)."""
    payload = EthernetFrame.from_bytes(frame).payload
    assert payload[0] & 0x04, "not an error reply"
    return payload[1]


class _FullDisk(MemoryBackend):
    """A memory disk on a full filesystem: every write fails with ``ENOSPC``."""

    def write(self, offset: int, data: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class SweepTests(ServiceHarness, SynchronousTestCase):
    """``AoEService.sweep``: a failing disk is visible in the log, without a flood."""

    spec = "file:/srv/aoe/full.img"

    def failing_writes(self, count: int, start: int) -> None:
        """Send ``count`` writes to the full disk; check each is answered ``ABRT``."""
        replies = self.answer(*(write(1, 0, tag=start + i) for i in range(count)))
        self.assertEqual(len(replies), count)
        for reply in replies:
            self.assertEqual(ata_of(reply).err_feature, ATAError.ABRT)

    def test_first_failure_then_summaries(self) -> None:
        """
        Many failures of one cause give one error line naming the target, its
        backend and the OS's words; going on failing gives one summary line
        per 10 seconds, never more.
        """
        self.serve(Target(1, 0, _FullDisk(SIZE), spec=self.spec))
        with capturedLogs() as events:
            self.failing_writes(20, 0)
            self.reactor.advance(1)
            firsts = [e for e in events if "the disk failed" in e["log_format"]]
            self.assertEqual(len(firsts), 1)
            line = formatEvent(firsts[0])
            self.assertEqual(firsts[0]["log_level"], LogLevel.error)
            self.assertIn(f"e1.0 = {self.spec}", line)
            self.assertIn("No space left on device", line)
            self.assertIn("ENOSPC", line)
            for second in range(10):
                self.failing_writes(5, 100 + 10 * second)
                self.reactor.advance(1)
            summaries = [e for e in events if "disk failures in the last" in e["log_format"]]
            self.assertEqual(len(summaries), 1)
            self.assertEqual(summaries[0]["log_level"], LogLevel.error)
            self.assertIn(f"e1.0 = {self.spec}", formatEvent(summaries[0]))
            self.assertIn("ENOSPC", formatEvent(summaries[0]))
            for second in range(10):
                self.failing_writes(5, 300 + 10 * second)
                self.reactor.advance(1)
        summaries = [e for e in events if "disk failures in the last" in e["log_format"]]
        self.assertEqual(len(summaries), 2)
        self.assertEqual(len([e for e in events if "the disk failed" in e["log_format"]]), 1)
        errors = self.service.snapshot()["targets"][0]["errors"]
        self.assertEqual(errors["backend_ENOSPC"], 120)
        self.assertEqual(errors["ata"], 120)

    def test_quiet_disk_logs_nothing(self) -> None:
        """A disk that does not fail logs nothing from the sweep."""
        self.serve(memory_target(1, 0))
        with capturedLogs() as events:
            self.answer(write(1, 0))
            self.reactor.advance(30)
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.error], [])
