# -*- test-case-name: tests.test_access -*-
"""
Access control that holds, whoever sends the frames.

``tests.test_target`` checks each rule on one request; here the rules are
checked as properties over arbitrary requests and many source MACs, through
the whole frame path (``Dispatcher``), with the state in a ``FileACLStore``
as ``--state-dir`` keeps it, and end to end over a veth pair (root only):

- with a non-empty MAC mask list a host not on it gets nothing at all;
- with a reserve list a host not on it cannot write and cannot re-reserve;
- a read-only target refuses every write with ABRT and its disk never changes;
- a target never answers for a shelf.slot it does not own.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

from attrs import evolve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    ATAError,
    Command,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    Error,
    EthernetFrame,
    Header,
    MACMaskCommand,
    ReserveReleaseArg,
    ReserveReleaseCommand,
)
from aoe_twisted.interfaces import IBlockBackend
from aoe_twisted.statefile import FileACLStore
from aoe_twisted.testing import INITIATOR_MAC, TARGET_MAC, ata_arg, ethernet_frame
from tests import strategies
from tests.test_e2e import FORGED, SILENCE, EndToEndCase, pattern

#: The host on the mask and reserve lists in the property tests.
MEMBER = INITIATOR_MAC
SECTORS = 64
_ERR_DRDY = int(ATACmdStatus.ERR_STATUS) | int(ATACmdStatus.READY_STATUS)
_WRITES = {int(ATACmdStatus.WRITE_28BIT), int(ATACmdStatus.WRITE_48BIT)}

#: Unicast source MACs (the dispatcher drops multicast sources before any rule).
unicast_macs = strategies.macs.map(lambda mac: bytes([mac[0] & 0xFE]) + mac[1:])


@implementer(IBlockBackend)
class GuardedBackend(MemoryBackend):
    """A memory disk that fails the test if ``write`` is called while it is read-only."""

    def write(self, offset: int, data: bytes) -> None:
        assert not self.read_only, "the core wrote to a read-only backend"
        super().write(offset, data)


def _digest(backend: IBlockBackend) -> str:
    return hashlib.sha256(backend.read(0, backend.size)).hexdigest()


def _state(target: Target) -> tuple[bytes, tuple[bytes, ...], tuple[bytes, ...]]:
    """A copy of ``target``'s state: config string, mask list, reserve list."""
    acl = target.acl
    return (acl.config_string, acl.mask_list, acl.reserve_list)


def _aimed(header: Header, major: int, minor: int) -> Header:
    """``header`` as a request (no response flag) to ``major``.``minor``."""
    return evolve(header, flag_response=False, major=major, minor=minor)


class PropertyTests(SynchronousTestCase):
    """The four rules over arbitrary requests from arbitrary hosts, frames in and out."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.examples = itertools.count()

    def target(self, shelf: int, slot: int, persistent: bool = True, **state: Any) -> Target:
        """
        A target on a patterned disk whose state lives in a fresh state file.

        With ``persistent=False`` the state is in a ``MemoryACLStore``: quicker
        (no fsync per example) where the test is not about the state.
        """
        backend = GuardedBackend(SECTORS * SECTOR_SIZE)
        backend.write(0, pattern(backend.size, shelf * 256 + slot))
        if not persistent:
            backend.read_only = bool(state.get("read_only"))
            return Target(shelf, slot, backend, acl=MemoryACLStore())
        state_dir = self.dir / str(next(self.examples))
        state_dir.mkdir()
        store = FileACLStore.open(state_dir, shelf, slot)
        store.seed(state.get("config", b""), state.get("mask", ()))
        if state.get("reserve"):
            store.set_reserve_list(state["reserve"])
        if state.get("read_only"):
            backend.read_only = True
        return Target(shelf, slot, backend, acl=store)

    @settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.function_scoped_fixture])
    @given(
        header=strategies.headers,
        src=unicast_macs,
        wildcard=st.sampled_from([(0, 1), (BROADCAST_MAJOR, BROADCAST_MINOR),
                                  (BROADCAST_MAJOR, 1), (0, BROADCAST_MINOR)]),
    )
    def test_masked_host_gets_nothing(
        self, header: Header, src: bytes, wildcard: tuple[int, int]
    ) -> None:
        """A host off a non-empty mask list gets no frame back, and changes nothing."""
        if src == MEMBER:
            return
        target = self.target(0, 1, config=b"cfg", mask=(MEMBER,), reserve=(MEMBER,))
        before = (_digest(target.backend), target.acl.config_string, target.acl.mask_list,
                  target.acl.reserve_list, target.acl.path.read_bytes())
        dispatcher = Dispatcher(TARGET_MAC, [target])
        frame = ethernet_frame(_aimed(header, *wildcard).to_bytes(), src)
        self.assertEqual(dispatcher.serve(frame), [])
        after = (_digest(target.backend), target.acl.config_string, target.acl.mask_list,
                 target.acl.reserve_list, target.acl.path.read_bytes())
        self.assertEqual(after, before)

    @settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.function_scoped_fixture])
    @given(header=strategies.headers, src=unicast_macs)
    def test_reserved_target(self, header: Header, src: bytes) -> None:
        """
        A host off the reserve list never changes the disk or the reserve
        list; its writes and reserve sets are refused with error 6.
        """
        if src == MEMBER:
            return
        target = self.target(0, 1, reserve=(MEMBER,))
        before = (_digest(target.backend), target.acl.reserve_list)
        request = _aimed(header, 0, 1)
        frame = ethernet_frame(request.to_bytes(), src)
        replies = Dispatcher(TARGET_MAC, [target]).serve(frame)
        arg = request.arg
        if request.command == Command.RESERVE_RELEASE and isinstance(arg, ReserveReleaseArg):
            if arg.command == ReserveReleaseCommand.FORCE_SET:
                return  # Force set is the documented way to break a reservation.
            if arg.command == ReserveReleaseCommand.SET:
                self.assertEqual(len(replies), 1)
                reply = Header.from_bytes(EthernetFrame.from_bytes(replies[0]).payload)
                self.assertEqual((reply.flag_error, reply.error),
                                 (True, Error.TARGET_IS_RESERVED))
        if isinstance(arg, ATAArg) and arg.cmd_status != ATACmdStatus.IDENTIFY and (
            arg.flag_write or arg.cmd_status in _WRITES
        ):
            self.assertEqual(len(replies), 1)
            reply = Header.from_bytes(EthernetFrame.from_bytes(replies[0]).payload)
            self.assertEqual((reply.flag_error, reply.error), (True, Error.TARGET_IS_RESERVED))
        self.assertEqual((_digest(target.backend), target.acl.reserve_list), before)
        self.assertEqual(FileACLStore.open(target.acl.path.parent, 0, 1).reserve_list, (MEMBER,))

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.function_scoped_fixture])
    @given(header=strategies.ata_headers, src=unicast_macs)
    def test_read_only_refuses_every_write(self, header: Header, src: bytes) -> None:
        """
        Every WRITE SECTORS (EXT) to a read-only target is answered ERR|DRDY
        with ABRT, and no ATA request at all changes a byte of it (the W flag
        on a command that writes nothing, such as FLUSH, is not a write).
        """
        target = self.target(0, 1, persistent=False, read_only=True)
        before = _digest(target.backend)
        request = _aimed(header, 0, 1)
        frame = ethernet_frame(request.to_bytes(), src)
        replies = Dispatcher(TARGET_MAC, [target]).serve(frame)
        self.assertEqual(_digest(target.backend), before)
        if request.arg.cmd_status in _WRITES:
            self.assertEqual(len(replies), 1)
            reply = Header.from_bytes(EthernetFrame.from_bytes(replies[0]).payload).arg
            self.assertEqual((reply.cmd_status, reply.err_feature), (_ERR_DRDY, ATAError.ABRT))

    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.function_scoped_fixture])
    @given(
        header=strategies.headers,
        src=unicast_macs,
        major=strategies.uint16,
        minor=strategies.uint8,
    )
    def test_never_answers_for_others(
        self, header: Header, src: bytes, major: int, minor: int
    ) -> None:
        """A request to an address no target owns gets no frame back, and changes nothing."""
        owned = {(3, 1), (3, 2), (4, 1)}
        if any(
            major in (shelf, BROADCAST_MAJOR) and minor in (slot, BROADCAST_MINOR)
            for shelf, slot in owned
        ):
            return
        targets = [self.target(s, n, persistent=False) for s, n in sorted(owned)]
        before = [(_digest(t.backend), _state(t)) for t in targets]
        dispatcher = Dispatcher(TARGET_MAC, targets)
        frame = ethernet_frame(_aimed(header, major, minor).to_bytes(), src)
        self.assertEqual(dispatcher.serve(frame), [])
        self.assertEqual([(_digest(t.backend), _state(t)) for t in targets], before)


# -- end to end ----------------------------------------------------------------

Gen = Any
#: Hosts that are not on any list: several forged, locally administered MACs.
STRANGERS = [bytes.fromhex(h) for h in ("02f0f0f0f002", "02f0f0f0f003", "0a0000000001",
                                         "525400123456", "02f0f0f0f0ff")]


class EndToEndAccessTests(EndToEndCase):
    """The same rules over real frames from several source MACs (root only)."""

    @defer.inlineCallbacks
    def test_mask_list_many_hosts(self) -> Gen:
        """With a mask list of us and FORGED, five other hosts get nothing for any command."""
        store = MemoryACLStore()
        backend = MemoryBackend(SECTORS * SECTOR_SIZE)
        target = Target(0, 1, backend, acl=store)
        self.serve([target])
        peer, server = self.peer, self.server
        add = DirectiveCommand.ADD
        reply = self.one((yield peer.mask(server, 0, 1, MACMaskCommand.EDIT,
                                          [Directive(add, peer.mac), Directive(add, FORGED)])))
        self.assertEqual(len(reply.arg.directives), 2)
        before = _digest(backend)
        for stranger in STRANGERS:
            asked = [
                peer.read(server, 0, 1, 0, src=stranger, timeout=SILENCE),
                peer.write(server, 0, 1, 0, pattern(SECTOR_SIZE, 1), src=stranger,
                           timeout=SILENCE),
                peer.ata(server, 0, 1, ata_arg(ATACmdStatus.IDENTIFY), src=stranger,
                         timeout=SILENCE),
                peer.mask(server, 0, 1, MACMaskCommand.READ, src=stranger, timeout=SILENCE),
                peer.mask(server, 0, 1, MACMaskCommand.EDIT,
                          [Directive(add, stranger)], src=stranger, timeout=SILENCE),
                peer.reserve(server, 0, 1, ReserveReleaseCommand.FORCE_SET, [stranger],
                             src=stranger, timeout=SILENCE),
            ]
            results = yield defer.gatherResults(asked)
            self.assertEqual(results, [[]] * len(asked), stranger.hex())
        self.assertEqual(_digest(backend), before)
        self.assertEqual(store.mask_list, (peer.mac, FORGED))
        self.assertEqual(store.reserve_list, ())
        self.ata_ok((yield peer.read(server, 0, 1, 0, src=FORGED)))
        self.ata_ok((yield peer.read(server, 0, 1, 0)))

    @defer.inlineCallbacks
    def test_reserve_list_many_hosts(self) -> Gen:
        """Reserved by us and FORGED: other hosts cannot write or re-reserve; members can."""
        backend = MemoryBackend(SECTORS * SECTOR_SIZE)
        target = Target(0, 1, backend)
        self.serve([target])
        peer, server = self.peer, self.server
        self.one((yield peer.reserve(server, 0, 1, ReserveReleaseCommand.SET,
                                     [peer.mac, FORGED])))
        before = _digest(backend)
        for stranger in STRANGERS:
            refused = self.one((yield peer.write(server, 0, 1, 2, pattern(SECTOR_SIZE, 2),
                                                 src=stranger)))
            self.assertEqual((refused.header.flag_error, refused.header.error),
                             (True, Error.TARGET_IS_RESERVED))
            refused = self.one((yield peer.reserve(server, 0, 1, ReserveReleaseCommand.SET,
                                                   [stranger], src=stranger)))
            self.assertEqual(refused.header.error, Error.TARGET_IS_RESERVED)
            self.assertEqual(refused.arg.macs, (peer.mac, FORGED))
        self.assertEqual(_digest(backend), before)
        self.assertEqual(target.acl.reserve_list, (peer.mac, FORGED))
        data = pattern(SECTOR_SIZE, 3)
        self.ata_ok((yield peer.write(server, 0, 1, 2, data, src=FORGED)))
        self.ata_ok((yield peer.read(server, 0, 1, 2)), data)

    @defer.inlineCallbacks
    def test_read_only_file(self) -> Gen:
        """A read-only file target refuses 28- and 48-bit writes with ABRT; its file stays."""
        path = self.mktemp()
        original = pattern(SECTORS * SECTOR_SIZE, 4)
        with open(path, "wb") as f:
            f.write(original)
        backend = FileBackend.open(path, read_only=True)
        service = self.serve([Target(0, 1, backend)])
        peer, server = self.peer, self.server
        sector = pattern(SECTOR_SIZE, 5)
        for src in (None, FORGED, *STRANGERS[:2]):
            self.ata_failed((yield peer.write(server, 0, 1, 1, sector, src=src)), ATAError.ABRT)
            arg = ata_arg(ATACmdStatus.WRITE_28BIT, lba=1, data=sector)
            self.ata_failed((yield peer.ata(server, 0, 1, arg, src=src)), ATAError.ABRT)
        self.ata_ok((yield peer.read(server, 0, 1, 1)), original[SECTOR_SIZE : 2 * SECTOR_SIZE])
        yield service.stopService()
        with open(path, "rb") as f:
            self.assertEqual(f.read(), original)

    @defer.inlineCallbacks
    def test_other_addresses_unanswered(self) -> Gen:
        """Unicast requests to shelf.slot pairs the server does not own get no reply at all."""
        self.serve([Target(3, 1, MemoryBackend(SECTORS * SECTOR_SIZE)),
                    Target(3, 2, MemoryBackend(SECTORS * SECTOR_SIZE))])
        peer, server = self.peer, self.server
        for shelf, slot in ((3, 3), (0, 1), (4, 1), (BROADCAST_MAJOR, 3), (2, BROADCAST_MINOR),
                            (0, 0), (1, 3)):
            results = yield defer.gatherResults([
                peer.read(server, shelf, slot, 0, timeout=SILENCE),
                peer.config(server, shelf, slot, ConfigCommand.READ, timeout=SILENCE),
                peer.reserve(server, shelf, slot, ReserveReleaseCommand.READ, timeout=SILENCE),
            ])
            self.assertEqual(results, [[], [], []], f"{shelf}.{slot}")
        # The kernel filter keeps the 15 unicast requests for other addresses out of
        # the socket altogether; the 6 for a wildcard address reach the server.
        self.assertEqual(self.service.protocol.dispatcher.counters["unaddressed"], 6)
        replies = yield peer.discover()
        self.assertEqual(sorted((r.header.major, r.header.minor) for r in replies),
                         [(3, 1), (3, 2)])
