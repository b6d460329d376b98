# -*- test-case-name: tests.test_server -*-
"""
The Twisted side of an AoE target: the protocol on a raw port, and the service that runs it.

``AoEProtocol`` sits on an ``AoEPort`` and hands every frame to the sans-IO
``Dispatcher``, writing back what it answers.  It adds what only the Twisted
layer can: start-up announcements, rate-limited logging of malformed input,
the sector count that the interface's MTU allows and, with ``sync=True``
(``--sync``), group commit: the port tells it when it has drained the socket
(``drainFinished``), and the writes of that drain are made durable with one
``fdatasync`` per written disk before any of them is acknowledged.

``AoEService`` is what ``twistd aoe`` runs: it opens the port in
``privilegedStartService`` (an ``AF_PACKET`` socket needs ``CAP_NET_RAW``, and
``twistd --uid`` drops it right after), and closes the port and then the
targets' backends when it stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attrs import evolve
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger

from aoe_twisted.dispatch import Dispatcher
from aoe_twisted.interfaces import IBlockBackend
from aoe_twisted.port import AoEPort, CannotOpenInterface, max_sectors_for_mtu
from aoe_twisted.target import Target
from aoe_twisted.wire import (
    SECTOR_SIZE,
    ATACmdStatus,
    ATAError,
    Command,
    EthernetFrame,
    Header,
    WireError,
    format_mac,
)

__all__ = ["MALFORMED_LOG_INTERVAL", "AoEProtocol", "AoEService"]

_log = Logger()

MALFORMED_LOG_INTERVAL = 10.0
"""
Seconds between log lines about malformed frames.

The first malformed frame is logged at once; the ones after it within this
interval are counted and summarised in one line when it ends, so a peer that
floods garbage costs one log line per interval, not one per frame.
"""

#: The smallest MTU whose frames hold one sector: 10-byte AoE header, 12-byte ATA argument, 512.
_MIN_USEFUL_MTU = 22 + SECTOR_SIZE

# Where group commit looks in a frame (Ethernet header 14 bytes, then AoE):
#: the AoE flags (high nibble version, low nibble flags; E is 0x04),
_FLAGS_AT = 14
_ERROR_FLAG = 0x04
#: the shelf (2 bytes) and slot (1 byte),
_MAJOR_AT = 16
_MINOR_AT = 18
#: the AoE command,
_COMMAND_AT = 19
#: and, in an ATA request, the command register (in a reply the status register).
_CMD_STATUS_AT = 27
_ATA = int(Command.ISSUE_ATA_COMMAND)
_WRITES = frozenset({int(ATACmdStatus.WRITE_28BIT), int(ATACmdStatus.WRITE_48BIT)})
_ERR = int(ATACmdStatus.ERR_STATUS)
_ERR_DRDY = _ERR | int(ATACmdStatus.READY_STATUS)
_ABRT = int(ATAError.ABRT)


def _sync_backend(backend: IBlockBackend) -> None:
    """
    Make every completed write to ``backend`` durable, as cheaply as it can.

    ``sync_data`` (``fdatasync`` for the built-in file and block backends) if
    the backend has one; otherwise ``flush``, which ``IBlockBackend`` defines
    as "make every completed write durable", so a third-party backend gets
    ``--sync`` right without knowing about it.
    """
    sync = getattr(backend, "sync_data", None)
    if sync is None:
        backend.flush()
    else:
        sync()


def _abort_write_reply(frame: bytes) -> bytes:
    """
    Turn the success reply to a write into ATA ``ERR|DRDY``, error ``ABRT``.

    What a write whose ``fdatasync`` failed answers: the initiator must not
    take it as done.  Only the status and error registers change.
    """
    ethernet = EthernetFrame.from_bytes(frame)
    header = Header.from_bytes(ethernet.payload)
    arg = evolve(header.arg, cmd_status=_ERR_DRDY, err_feature=_ABRT)
    payload = evolve(header, arg=arg).to_bytes()
    return evolve(ethernet, payload=payload).to_bytes(pad=True)


class AoEProtocol(AbstractDatagramProtocol):
    """
    Serve ``targets`` on the port this protocol is connected to.

    When connected (``startProtocol``) it reads the port's MAC and MTU, sets
    each target's ``max_sectors`` to what fits the MTU (capped by
    ``max_sectors`` if given), builds its ``dispatcher`` and sends each
    target's announcement: an unsolicited config reply to the broadcast
    address (AoEr11 3.2), so initiators already running find it at once.

    With ``sync`` a write is acknowledged only once it is durable, by group
    commit.  The reply to a successful write is held, and so is every reply
    after it in the same drain of the socket, so replies still leave in the
    order their requests arrived (a read never answers with data whose write
    is not yet acknowledged).  Replies before the drain's first write go out
    at once.  When the port has drained the socket it calls
    ``drainFinished``: each disk written in the drain is synced once
    (``sync_data``, else ``flush``), then the held replies are sent.  A write
    whose disk failed to sync is answered ``ERR|DRDY``/``ABRT`` instead:
    never acknowledged.  ``syncs``, ``synced_writes`` and ``sync_failures``
    count what happened, and ``stopProtocol`` logs them.
    """

    noisy = False
    announces = True
    """Whether ``startProtocol`` announces the targets (only one of several workers does)."""

    def __init__(
        self,
        targets: Sequence[Target],
        max_sectors: int | None = None,
        clock: IReactorTime | None = None,
        malformed_interval: float = MALFORMED_LOG_INTERVAL,
        sync: bool = False,
    ) -> None:
        """
        @param targets: the targets to serve, at distinct shelf.slot addresses.
        @param max_sectors: an upper bound on the sectors per ATA command,
            below what the MTU allows (``None``: the MTU decides alone).
        @param clock: what times the malformed-frame summaries (the global
            reactor by default), and the fallback that ends a drain if the
            transport never calls ``drainFinished``.
        @param malformed_interval: seconds between malformed-frame log lines.
        @param sync: acknowledge writes only once durable (group commit).
        """
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.targets = list(targets)
        self.max_sectors = max_sectors
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.malformed_interval = malformed_interval
        self.dispatcher: Dispatcher | None = None
        self.interface = "?"
        self._malformed_seen = 0
        self._quiet_until = float("-inf")
        self._suppressed = 0
        self._suppressed_reason = ""
        self._summary: IDelayedCall | None = None
        self.sync = sync
        self.syncs = 0
        self.synced_writes = 0
        self.sync_failures = 0
        self._by_address = {(t.shelf, t.slot): t for t in self.targets}
        # Group commit state for the current drain: the replies held back (in
        # order), which of them acknowledge writes (index -> target), and the
        # targets whose disks must be synced before they go out.
        self._held: list[bytes] = []
        self._held_writes: dict[int, Target] = {}
        self._dirty: dict[int, Target] = {}
        self._drain_fallback: IDelayedCall | None = None

    def startProtocol(self) -> None:
        """Size the targets for the port's MTU, build the dispatcher and announce every target."""
        assert self.transport is not None
        host: Any = self.transport.getHost()
        self.interface = host.interface
        sectors = max_sectors_for_mtu(host.mtu)
        if self.max_sectors is not None:
            sectors = min(sectors, self.max_sectors)
        if host.mtu < _MIN_USEFUL_MTU:
            _log.warn(
                "MTU {mtu} of {interface} is too small for one {sector}-byte sector per frame",
                mtu=host.mtu,
                interface=host.interface,
                sector=SECTOR_SIZE,
            )
        for target in self.targets:
            target.max_sectors = sectors
        self.dispatcher = Dispatcher(host.mac, self.targets)
        for target in self.targets:
            _log.info(
                "serving e{shelf}.{slot} ({size} bytes, {mode}) on {interface} "
                "({mac}, MTU {mtu}, {sectors} sectors per frame)",
                shelf=target.shelf,
                slot=target.slot,
                size=target.backend.size,
                mode="ro" if target.backend.read_only else "rw",
                interface=host.interface,
                mac=format_mac(host.mac),
                mtu=host.mtu,
                sectors=sectors,
            )
        if self.sync:
            _log.info(
                "writes are acknowledged once durable (--sync): one sync per disk per "
                "drain of the socket (group commit)"
            )
        if self.announces:
            self.announce()

    def announce(self) -> None:
        """Send every target's unsolicited config reply (the start-up announcement)."""
        assert self.transport is not None and self.dispatcher is not None
        for frame in self.dispatcher.announcements():
            self.transport.write(frame)  # type: ignore[call-arg]

    def datagramReceived(self, datagram: bytes, addr: Any = None) -> None:
        """Answer one received Ethernet frame: the dispatcher decides, the port sends."""
        dispatcher = self.dispatcher
        if dispatcher is None:
            return
        replies = dispatcher.frame_received(datagram)
        malformed = dispatcher.counters["malformed"]
        if malformed != self._malformed_seen:
            self._note_malformed(malformed - self._malformed_seen, dispatcher.last_malformed)
            self._malformed_seen = malformed
        if not replies:
            return
        if self.sync and (self._hold_writes(datagram, replies) or self._held):
            self._held.extend(replies)
            return
        write = self.transport.write  # type: ignore[union-attr]
        for reply in replies:
            write(reply)  # type: ignore[call-arg]

    def frameReceivedInto(self, frame: memoryview, reply: memoryview | None) -> int:
        """
        Answer ``frame`` (a view of a receive ring slot) into ``reply``; return its length.

        The port's zero-copy entry: a plain read or write is answered by the
        fast path straight into ``reply`` (a view of a transmit ring slot,
        ``None`` when none is free) and the port sends it.  Anything else,
        and under ``sync`` every write and every frame while replies are
        held, goes to ``datagramReceived`` with a copy of the frame (what
        ``sync`` holds must outlive the slot) and 0 is returned.  Neither
        view is kept after the call.
        """
        dispatcher = self.dispatcher
        if dispatcher is None:
            return 0
        if reply is not None and not (
            self.sync
            and (self._held or (len(frame) > _CMD_STATUS_AT and frame[_CMD_STATUS_AT] in _WRITES))
        ):
            length = dispatcher.frame_received_into(frame, reply)
            if length:
                return length
        self.datagramReceived(bytes(frame))
        return 0

    def _hold_writes(self, datagram: bytes, replies: list[bytes]) -> bool:
        """
        Note the successful write replies among ``replies``; return whether there are any.

        ``datagram`` is the request: an Issue ATA Command whose command
        register is WRITE SECTORS (EXT).  A reply is a success if its AoE E
        flag is clear and its ATA status has no ERR; its shelf.slot names the
        target, whose disk the drain must sync.  The dispatcher has decoded
        both frames already, so fixed offsets are safe here.
        """
        if (
            len(datagram) <= _CMD_STATUS_AT
            or datagram[_COMMAND_AT] != _ATA
            or datagram[_CMD_STATUS_AT] not in _WRITES
        ):
            return False
        base = len(self._held)
        held = False
        for index, reply in enumerate(replies):
            if reply[_FLAGS_AT] & _ERROR_FLAG or reply[_CMD_STATUS_AT] & _ERR:
                continue
            address = (int.from_bytes(reply[_MAJOR_AT:_MINOR_AT], "big"), reply[_MINOR_AT])
            target = self._by_address.get(address)
            if target is None:
                continue
            self._held_writes[base + index] = target
            self._dirty[id(target.backend)] = target
            held = True
        if not held:
            return False
        if self._drain_fallback is None:
            # The port calls drainFinished; this covers a transport that does not.
            self._drain_fallback = self.clock.callLater(0, self.drainFinished)
        return True

    def drainFinished(self) -> None:
        """
        End a drain of the socket: sync every disk written, then send the held replies.

        The port calls this after each ``doRead``.  Without ``sync``, or when
        the drain held nothing, it does nothing.  The sync blocks the reactor,
        as every backend call does; frames that arrive meanwhile wait in the
        socket and form the next group.
        """
        if self._drain_fallback is not None:
            if self._drain_fallback.active():
                self._drain_fallback.cancel()
            self._drain_fallback = None
        if not self._held:
            return
        held, self._held = self._held, []
        writes, self._held_writes = self._held_writes, {}
        dirty, self._dirty = self._dirty, {}
        failed: set[int] = set()
        for key, target in dirty.items():
            try:
                _sync_backend(target.backend)
            except OSError as e:
                failed.add(key)
                _log.error(
                    "cannot make writes to e{shelf}.{slot} durable ({error}): "
                    "answering them with ATA errors",
                    shelf=target.shelf,
                    slot=target.slot,
                    error=e.strerror or str(e),
                )
        self.syncs += len(dirty)
        if failed:
            for index, target in writes.items():
                if id(target.backend) in failed:
                    self.sync_failures += 1
                    try:
                        held[index] = _abort_write_reply(held[index])
                    except WireError:
                        # Cannot happen for a reply we built; never acknowledge it anyway.
                        held[index] = b""
            self.synced_writes += len(writes) - sum(
                1 for target in writes.values() if id(target.backend) in failed
            )
        else:
            self.synced_writes += len(writes)
        if self.transport is None:
            return
        write = self.transport.write
        for reply in held:
            if reply:
                write(reply)  # type: ignore[call-arg]

    def _note_malformed(self, count: int, reason: str) -> None:
        """Log a malformed frame now, or count it for the summary at the end of the interval."""
        now = self.clock.seconds()
        if now >= self._quiet_until and self._summary is None:
            _log.warn(
                "malformed AoE frame on {interface}: {reason} "
                "(more are summarised every {interval} s)",
                interface=self.interface,
                reason=reason,
                interval=self.malformed_interval,
            )
            self._quiet_until = now + self.malformed_interval
            count -= 1
            if count == 0:
                return
        self._suppressed += count
        self._suppressed_reason = reason
        if self._summary is None:
            self._summary = self.clock.callLater(
                max(0.0, self._quiet_until - now), self._summarise
            )

    def _summarise(self) -> None:
        """Log how many malformed frames went unlogged, then stay quiet for one more interval."""
        self._summary = None
        if not self._suppressed:
            return
        _log.warn(
            "{count} more malformed AoE frames on {interface} in {interval} s; the last: {reason}",
            count=self._suppressed,
            interface=self.interface,
            interval=self.malformed_interval,
            reason=self._suppressed_reason,
        )
        self._suppressed = 0
        self._quiet_until = self.clock.seconds() + self.malformed_interval

    def stopProtocol(self) -> None:
        """Send what is still held, log what is still unsummarised and what was counted."""
        self.drainFinished()
        if self._summary is not None:
            self._summary.cancel()
            self._summarise()
        if self.dispatcher is not None:
            counters = self.dispatcher.counters
            _log.info(
                "stopped serving on {interface}: {received} frames received, "
                "{answered} answered, {malformed} malformed",
                interface=self.interface,
                received=counters["received"],
                answered=counters["answered"],
                malformed=counters["malformed"],
            )
        if self.sync:
            _log.info(
                "group commit on {interface}: {writes} writes acknowledged after {syncs} syncs "
                "({per} writes per sync), {failed} refused because their sync failed",
                interface=self.interface,
                writes=self.synced_writes,
                syncs=self.syncs,
                per=f"{self.synced_writes / self.syncs:.1f}" if self.syncs else "0",
                failed=self.sync_failures,
            )


class AoEService(service.Service):
    """
    Serve ``targets`` on ``interface`` from when the service starts until it stops.

    The port opens in ``privilegedStartService`` (before ``twistd`` drops
    privileges); a missing interface or privilege raises ``CannotOpenInterface``,
    whose ``str`` is one line naming the cause.  ``stopService`` closes the
    port, then flushes and closes every target's backend: the service owns them.
    """

    name = "aoe"

    def __init__(
        self,
        interface: str,
        targets: Sequence[Target],
        netns: str | None = None,
        reactor: Any = None,
        max_sectors: int | None = None,
        system: Any = None,
        exit_on_error: bool = False,
        sync: bool = False,
        socket_fd: int | None = None,
        announce: bool = True,
    ) -> None:
        """
        @param interface: the Ethernet interface to serve on.
        @param targets: the targets to serve there, at distinct shelf.slot addresses.
        @param netns: the network namespace (``ip netns``) holding ``interface``.
        @param reactor: the reactor to run on (the global one by default).
        @param max_sectors: cap the sectors per ATA command below what the MTU allows.
        @param system: the port's ``_IPacketSystem`` (``MemoryPacketSystem`` in tests).
        @param exit_on_error: if the port cannot open, raise ``SystemExit`` with
            the one-line message (``"twistd aoe: cannot open interface ..."``)
            instead of ``CannotOpenInterface``: ``twistd`` prints a traceback
            for an exception from ``privilegedStartService`` but just the
            message, with exit status 1, for ``SystemExit``.
        @param sync: acknowledge writes only once durable (``--sync``, group
            commit; see ``AoEProtocol``).
        @param socket_fd: serve on this already open and bound packet socket
            (a ``--workers`` worker's share of the interface) instead of
            opening one.
        @param announce: send the targets' start-up announcements (the
            first worker does; the others stay quiet).
        """
        self.interface = interface
        self.targets = list(targets)
        self.netns = netns
        self.reactor = reactor
        self.max_sectors = max_sectors
        self.system = system
        self.exit_on_error = exit_on_error
        self.sync = sync
        self.socket_fd = socket_fd
        self.announce = announce
        self.protocol: AoEProtocol | None = None
        self.port: AoEPort | None = None
        self._backends_closed = False

    def _listen(self) -> AoEPort:
        """Open the port and connect a fresh protocol to it."""
        protocol = AoEProtocol(self.targets, self.max_sectors, clock=self.reactor, sync=self.sync)
        protocol.announces = self.announce
        # Room for four initiators each keeping every target's buffer count in flight:
        # the buffer count advertised is then what the server sustains (the port's
        # receive ring has at least this many slots).
        in_flight = 4 * sum(target.buffer_count for target in self.targets)
        port = AoEPort(
            self.interface,
            protocol,
            reactor=self.reactor,
            system=self.system,
            netns=self.netns,
            receive_frames=max(64, in_flight),
            socket_fd=self.socket_fd,
        )
        try:
            port.startListening()
        except CannotOpenInterface as e:
            if self.exit_on_error:
                raise SystemExit(f"twistd aoe: {e}") from None
            raise
        self.protocol = protocol
        return port

    def privilegedStartService(self) -> None:
        """Open the raw socket while the process still has ``CAP_NET_RAW``."""
        self.port = self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        """Start serving (opening the port now if ``privilegedStartService`` did not)."""
        if self.port is None:
            self.port = self._listen()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        """Close the port; when it is closed, flush and close every backend."""
        super().stopService()
        port, self.port = self.port, None
        d: defer.Deferred[None] = (
            port.stopListening() if port is not None else defer.succeed(None)
        )
        d.addCallback(lambda _: self._close_backends())
        return d

    def _close_backends(self) -> None:
        """Flush then close each target's backend (once), logging (not raising) failures."""
        if self._backends_closed:
            return
        self._backends_closed = True
        for target in self.targets:
            backend = target.backend
            try:
                if not backend.read_only:
                    backend.flush()
            except OSError:
                _log.failure(
                    "cannot flush the disk of e{shelf}.{slot}", shelf=target.shelf, slot=target.slot
                )
            try:
                backend.close()
            except OSError:
                _log.failure(
                    "cannot close the disk of e{shelf}.{slot}", shelf=target.shelf, slot=target.slot
                )
