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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from aoe_twisted.core.decision import Decision
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.operations import perform
from aoe_twisted.core.target import Pending, Target
from aoe_twisted.core.wire import SECTOR_SIZE, format_mac
from aoe_twisted.interfaces import IBlockBackend, IDataSyncBackend
from aoe_twisted.net.link import LinkEvent, LinkMonitor
from aoe_twisted.net.packetsystem import CannotOpenInterface
from aoe_twisted.net.port import (
    AoEPort,
    ILinkAwareProtocol,
    IZeroCopyFrameSink,
    max_sectors_for_mtu,
)
from aoe_twisted.net.ring import receive_ring_frames

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


def _durability_call(backend: IBlockBackend) -> Callable[[], None]:
    """
    Return what makes every completed write to ``backend`` durable, as cheaply as it can.

    ``sync_data`` (``fdatasync`` for the built-in file and block backends)
    if it provides ``IDataSyncBackend``; otherwise ``flush``, which
    ``IBlockBackend`` defines as "make every completed write durable", so a
    third-party backend gets ``--sync`` right without knowing about it.
    """
    if IDataSyncBackend.providedBy(backend):
        return backend.sync_data  # type: ignore[attr-defined, no-any-return]
    return backend.flush  # type: ignore[no-any-return]


@implementer(IZeroCopyFrameSink, ILinkAwareProtocol)
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
        self._quiet_until = float("-inf")
        self._suppressed = 0
        self._suppressed_reason = ""
        self._summary: IDelayedCall | None = None
        self._faults_quiet_until = float("-inf")
        self._faults_unlogged = 0
        self.sync = sync
        self.syncs = 0
        self.synced_writes = 0
        self.sync_failures = 0
        # Group commit state for the current drain: the replies held back (in
        # order), which of them acknowledge writes (index -> their decision),
        # and the targets whose disks must be synced before they go out.
        self._held: list[bytes] = []
        self._held_writes: dict[int, Decision] = {}
        self._dirty: dict[int, Target] = {}
        self._drain_fallback: IDelayedCall | None = None
        #: How each target's disk is made durable (by ``id`` of the target), learnt once.
        self._durability: dict[int, Callable[[], None]] = {}

    def startProtocol(self) -> None:
        """Size the targets for the port's MTU, build the dispatcher and announce every target."""
        self._configure()
        if self.sync:
            _log.info(
                "writes are acknowledged once durable (--sync): one sync per disk per "
                "drain of the socket (group commit)"
            )

    def linkChanged(self) -> None:
        """
        The port is bound again, or its MAC or MTU changed: serve as the interface is now.

        Replies held for group commit go out first (their disks are synced);
        then the dispatcher is built anew for the MAC and sector count, and
        the targets are announced from the new address.
        """
        self.drainFinished()
        self._configure()

    def _configure(self) -> None:
        """Build the dispatcher for the port's MAC and MTU, log what is served, announce."""
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
        # Each interface serves the targets with its own sector count: copies
        # sharing the disk and the state, so several interfaces can differ.
        served = [target.for_interface(sectors) for target in self.targets]
        self.dispatcher = Dispatcher(host.mac, served, hold_writes=self.sync)
        self._durability = {id(t): _durability_call(t.backend) for t in served}
        for target in served:
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
                sectors=target.max_sectors,
            )
        if self.announces:
            self.announce()

    def announce(self) -> None:
        """Send every target's unsolicited config reply (the start-up announcement)."""
        assert self.transport is not None and self.dispatcher is not None
        for frame in self.dispatcher.announcements():
            self.transport.write(frame)  # type: ignore[call-arg]

    def datagramReceived(self, datagram: bytes, addr: Any = None) -> None:
        """Answer one received Ethernet frame: the dispatcher decides, this carries it out."""
        dispatcher = self.dispatcher
        if dispatcher is not None:
            self._act(dispatcher.frame_received(datagram))

    def frameReceivedInto(self, frame: memoryview, reply: memoryview | None) -> int:
        """
        Answer ``frame`` (a view of a receive ring slot) into ``reply``; return its length.

        The port's zero-copy entry: a plain read or write is answered by the
        fast path straight into ``reply`` (a view of a transmit ring slot,
        ``None`` when none is free) and the port sends it.  Anything else
        goes to the general path (which copies what it keeps), and 0 is
        returned.

        Under ``sync`` a reply may have to wait for group commit, so it
        cannot go into a slot that is sent at once: the fast path answers
        writes (and, while replies are held, reads too) as ``bytes`` through
        ``frame_received``, still reading and writing the ring slot in
        place.  A write is then looked at twice (once by the in-place path,
        which declines it): one header unpack, so that reads keep their
        zero-copy path.  Neither view is kept after the call.
        """
        dispatcher = self.dispatcher
        if dispatcher is None:
            return 0
        if reply is None or self._held:
            self._act(dispatcher.frame_received(frame))
            return 0
        length = dispatcher.frame_received_into(frame, reply)
        if not length:
            if self.sync:
                self._act(dispatcher.frame_received(frame))
            else:
                self._act(dispatcher.general(frame))
        return length

    def _act(self, decision: Decision) -> None:
        """Carry out ``decision``: log what it says, send its replies, do its disk operations."""
        if decision.malformed is not None:
            self._note_malformed(decision.malformed)
        if decision.fault is not None:
            self._note_fault(decision.fault)
        if decision.replies:
            self._deliver(decision)
        for pending in decision.pending:
            self._carry_out(pending)

    def _carry_out(self, pending: Pending) -> None:
        """
        Do ``pending``'s disk operation now, synchronously, and act on its completion.

        Every ``IBlockBackend`` is synchronous, so this is a direct call in
        the reactor thread; the completion goes through the dispatcher, as
        one that arrived later would.
        """
        dispatcher = self.dispatcher
        assert dispatcher is not None
        try:
            result = perform(pending.io, pending.target.backend)
        except OSError as e:
            decision = dispatcher.complete(pending, None, e)
        else:
            decision = dispatcher.complete(pending, result)
        if decision.replies:
            self._deliver(decision)

    def _deliver(self, decision: Decision) -> None:
        """
        Send ``decision``'s replies, or hold them for group commit.

        Under ``sync`` a reply acknowledging a write is held until its disk
        is synced, and so is every reply after it in the same drain.
        """
        if self.sync and (decision.written is not None or self._held):
            written = decision.written
            if written is not None:
                self._held_writes[len(self._held)] = decision
                self._dirty[id(written)] = written
                if self._drain_fallback is None:
                    # The port calls drainFinished; this covers a transport that does not.
                    self._drain_fallback = self.clock.callLater(0, self.drainFinished)
            self._held.extend(decision.replies)
            return
        write = self.transport.write  # type: ignore[union-attr]
        for reply in decision.replies:
            write(reply)  # type: ignore[call-arg]

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
                self._durability[key]()
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
        for index, decision in writes.items():
            if id(decision.written) in failed:
                self.sync_failures += 1
                # Built by the core with the reply: never acknowledged.
                held[index] = decision.refusal
            else:
                self.synced_writes += 1
        if self.transport is None:
            return
        write = self.transport.write
        for reply in held:
            if reply:
                write(reply)  # type: ignore[call-arg]

    def _note_fault(self, fault: str) -> None:
        """
        Log a target's failure (an ACL store that cannot be written) at error level.

        At most one line per ``malformed_interval``; the next line says how
        many went unlogged in between, so a peer repeating a request that
        fails cannot flood the log.
        """
        now = self.clock.seconds()
        if now < self._faults_quiet_until:
            self._faults_unlogged += 1
            return
        _log.error(
            "{fault} ({unlogged} more failures since the last line)",
            fault=fault,
            unlogged=self._faults_unlogged,
        )
        self._faults_unlogged = 0
        self._faults_quiet_until = now + self.malformed_interval

    def _note_malformed(self, reason: str) -> None:
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
            return
        self._suppressed += 1
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
                received=counters.received,
                answered=counters.answered,
                malformed=counters.malformed,
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
    Serve ``targets`` on one or several interfaces, from when the service starts until it stops.

    Each interface has its own port and protocol: it answers from its own
    MAC with a sector count from its own MTU, and a request is answered on
    the interface it arrived on; the targets (disks and ACL state) are the
    same on all.  The ports open in ``privilegedStartService`` (before
    ``twistd`` drops privileges).  A missing privilege, or a missing
    interface when it is the only one, raises ``CannotOpenInterface``, whose
    ``str`` is one line naming the cause; with several interfaces, one that
    does not exist yet is waited for (a warning), and only none at all is
    an error.

    Links that come and go are followed through the kernel's link
    notifications (``aoe_twisted.net.link.LinkMonitor``): an interface that
    goes down stops nothing else and serves again when it is up; one that
    is removed and created again (a VLAN, a bond, a USB NIC) is bound
    again, its MAC and MTU read again; each transition is one log line.
    ``stopService`` closes the ports, then flushes and closes every
    target's backend: the service owns them.
    """

    name = "aoe"

    def __init__(
        self,
        interfaces: str | Sequence[str],
        targets: Sequence[Target],
        netns: str | None = None,
        reactor: Any = None,
        max_sectors: int | None = None,
        system: Any = None,
        exit_on_error: bool = False,
        sync: bool = False,
        socket_fds: Mapping[str, int] | None = None,
        announce: bool = True,
        follow_links: bool | None = None,
        ring_frames: int | None = None,
    ) -> None:
        """
        @param interfaces: the Ethernet interface(s) to serve on.
        @param targets: the targets to serve there, at distinct shelf.slot addresses.
        @param netns: the network namespace (``ip netns``) holding the interfaces.
        @param reactor: the reactor to run on (the global one by default).
        @param max_sectors: cap the sectors per ATA command below what the MTU allows.
        @param system: the ports' ``IPacketSystem`` (``MemoryPacketSystem`` in tests).
        @param exit_on_error: if a port cannot open, raise ``SystemExit`` with
            the one-line message (``"twistd aoe: cannot open interface ..."``)
            instead of ``CannotOpenInterface``: ``twistd`` prints a traceback
            for an exception from ``privilegedStartService`` but just the
            message, with exit status 1, for ``SystemExit``.
        @param sync: acknowledge writes only once durable (``--sync``, group
            commit; see ``AoEProtocol``).
        @param socket_fds: serve each interface on this already open and
            bound packet socket (a ``--workers`` worker's share of it, by
            interface name) instead of opening one; every interface needs one.
        @param announce: send the targets' start-up announcements (the
            first worker does; the others stay quiet).
        @param follow_links: follow the kernel's link notifications; by
            default when the ports use the real system (not a test fake) and
            open their own sockets (not ``socket_fds``).  Without it a port
            still survives its link going down and up (it keeps its socket).
        @param ring_frames: the cap on each port's receive ring, in frames
            (``--ring-frames``; ``DEFAULT_RING_FRAMES`` if ``None``): see
            ``aoe_twisted.net.ring.receive_ring_frames`` for the arithmetic.
        """
        self.interfaces = [interfaces] if isinstance(interfaces, str) else list(interfaces)
        if not self.interfaces:
            raise ValueError("no interface to serve on")
        if len(set(self.interfaces)) != len(self.interfaces):
            raise ValueError(f"an interface is named twice in {self.interfaces}")
        if socket_fds is not None and set(socket_fds) != set(self.interfaces):
            raise ValueError(f"socket_fds must name every interface of {self.interfaces}")
        self.targets = list(targets)
        self.netns = netns
        self.reactor = reactor
        self.max_sectors = max_sectors
        self.system = system
        self.exit_on_error = exit_on_error
        self.sync = sync
        self.socket_fds = dict(socket_fds) if socket_fds is not None else None
        self.announce = announce
        if follow_links is None:
            # A --workers socket was opened by the parent, maybe in another
            # namespace than this process's: its link is the parent's to follow.
            follow_links = system is None and socket_fds is None
        self.follow_links = follow_links
        self.ring_frames = ring_frames
        self.ports: dict[str, AoEPort] = {}
        self.protocols: dict[str, AoEProtocol] = {}
        self.monitor: LinkMonitor | None = None
        self._links: dict[str, LinkEvent] = {}
        self._backends_closed = False

    @property
    def port(self) -> AoEPort | None:
        """The first interface's port (the only one, when there is one interface)."""
        return self.ports.get(self.interfaces[0])

    @property
    def protocol(self) -> AoEProtocol | None:
        """The first interface's protocol (the only one, when there is one interface)."""
        return self.protocols.get(self.interfaces[0])

    def _fail(self, error: CannotOpenInterface | str) -> None:
        """Close what is open and stop start-up with one line."""
        for port in self.ports.values():
            port.connectionLost(None)
        self.ports.clear()
        self.protocols.clear()
        if self.exit_on_error:
            raise SystemExit(f"twistd aoe: {error}") from None
        if isinstance(error, CannotOpenInterface):
            raise error
        raise RuntimeError(error)

    def _listen(self, interface: str, wait: bool) -> AoEPort:
        """Open ``interface``'s port and connect a fresh protocol to it."""
        protocol = AoEProtocol(self.targets, self.max_sectors, clock=self.reactor, sync=self.sync)
        protocol.announces = self.announce
        # Room for four initiators' full windows on every target, up to the cap (and
        # never less than one full window of the largest buffer count advertised).
        in_flight = receive_ring_frames(
            (target.buffer_count for target in self.targets), self.ring_frames
        )
        port = AoEPort(
            interface,
            protocol,
            reactor=self.reactor,
            system=self.system,
            netns=self.netns,
            receive_frames=in_flight,
            socket_fd=None if self.socket_fds is None else self.socket_fds[interface],
            wait_for_interface=wait,
        )
        port.startListening()
        self.protocols[interface] = protocol
        return port

    def _open(self) -> None:
        """Open every interface's port and start following the links."""
        wait = len(self.interfaces) > 1 and self.socket_fds is None
        for interface in self.interfaces:
            try:
                self.ports[interface] = self._listen(interface, wait)
            except CannotOpenInterface as e:
                self._fail(e)
        if not any(port.bound for port in self.ports.values()):
            names = ", ".join(self.interfaces)
            self._fail(f"cannot open interfaces {names}: none of them exists")
        if self.follow_links:
            self.monitor = LinkMonitor.follow(
                self._link_event,
                self.netns,
                self.reactor,
                unless="an interface that is removed and created again will not be served "
                "again until a restart",
            )

    def _link_event(self, event: LinkEvent) -> None:
        """
        Follow one interface's change: log the transition, bind again when it is back.

        The kernel's first answer (the state dump at start) is logged only
        if the interface is not usable; after that, one line per change.
        """
        port = self.ports.get(event.name)
        if port is None:
            return
        previous = self._links.get(event.name)
        self._links[event.name] = event
        if previous == event:
            return
        if previous is not None or not event.usable:
            _log.info(
                "link {interface}: {state}", interface=event.name, state=event.describe()
            )
        if not event.usable:
            return
        moved = previous is not None and (not previous.present or previous.index != event.index)
        changed = event.mtu != port.mtu or (len(event.mac) == 6 and event.mac != port.mac)
        if not port.bound or moved or changed:
            port.rebind()
        elif previous is not None and not previous.usable:
            protocol = self.protocols.get(event.name)
            if protocol is not None and protocol.announces and protocol.dispatcher is not None:
                protocol.announce()

    def privilegedStartService(self) -> None:
        """Open the raw sockets while the process still has ``CAP_NET_RAW``."""
        self._open()
        super().privilegedStartService()

    def startService(self) -> None:
        """Start serving (opening the ports now if ``privilegedStartService`` did not)."""
        if not self.ports:
            self._open()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        """Close the ports; when they are closed, flush and close every backend."""
        super().stopService()
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.stop()
        ports = list(self.ports.values())
        self.ports.clear()
        d: defer.Deferred[Any] = defer.gatherResults(
            [port.stopListening() for port in ports], consumeErrors=True
        )
        d.addCallback(lambda _: self._close_backends())
        return d  # type: ignore[return-value]

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
