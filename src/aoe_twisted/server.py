# -*- test-case-name: tests.test_server -*-
"""
The Twisted side of an AoE target: the protocol on a raw port, and the service that runs it.

``AoEProtocol`` sits on an ``AoEPort`` and hands every frame to the sans-IO
``Dispatcher``, writing back what it answers.  It adds what only the Twisted
layer can: start-up announcements, rate-limited logging of malformed input and
the sector count that the interface's MTU allows.

``AoEService`` is what ``twistd aoe`` runs: it opens the port in
``privilegedStartService`` (an ``AF_PACKET`` socket needs ``CAP_NET_RAW``, and
``twistd --uid`` drops it right after), and closes the port and then the
targets' backends when it stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger

from aoe_twisted.dispatch import Dispatcher
from aoe_twisted.port import AoEPort, CannotOpenInterface, max_sectors_for_mtu
from aoe_twisted.target import Target
from aoe_twisted.wire import SECTOR_SIZE, format_mac

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


class AoEProtocol(AbstractDatagramProtocol):
    """
    Serve ``targets`` on the port this protocol is connected to.

    When connected (``startProtocol``) it reads the port's MAC and MTU, sets
    each target's ``max_sectors`` to what fits the MTU (capped by
    ``max_sectors`` if given), builds its ``dispatcher`` and sends each
    target's announcement: an unsolicited config reply to the broadcast
    address (AoEr11 3.2), so initiators already running find it at once.
    """

    noisy = False

    def __init__(
        self,
        targets: Sequence[Target],
        max_sectors: int | None = None,
        clock: IReactorTime | None = None,
        malformed_interval: float = MALFORMED_LOG_INTERVAL,
    ) -> None:
        """
        @param targets: the targets to serve, at distinct shelf.slot addresses.
        @param max_sectors: an upper bound on the sectors per ATA command,
            below what the MTU allows (``None``: the MTU decides alone).
        @param clock: what times the malformed-frame summaries (the global
            reactor by default).
        @param malformed_interval: seconds between malformed-frame log lines.
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
        if replies:
            write = self.transport.write  # type: ignore[union-attr]
            for reply in replies:
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
        """Log what is still unsummarised and what the dispatcher counted."""
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
        """
        self.interface = interface
        self.targets = list(targets)
        self.netns = netns
        self.reactor = reactor
        self.max_sectors = max_sectors
        self.system = system
        self.exit_on_error = exit_on_error
        self.protocol: AoEProtocol | None = None
        self.port: AoEPort | None = None
        self._backends_closed = False

    def _listen(self) -> AoEPort:
        """Open the port and connect a fresh protocol to it."""
        protocol = AoEProtocol(self.targets, self.max_sectors, clock=self.reactor)
        # Room for every request each target lets an initiator keep in flight, twice.
        in_flight = 2 * sum(target.buffer_count for target in self.targets)
        port = AoEPort(
            self.interface,
            protocol,
            reactor=self.reactor,
            system=self.system,
            netns=self.netns,
            receive_frames=max(64, in_flight),
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
