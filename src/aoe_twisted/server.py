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

import errno
from collections.abc import Callable, Mapping, Sequence
from time import perf_counter
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aoe_twisted.core.decision import Decision
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.duplicates import Duplicate, DuplicateWatch, SecondPath
from aoe_twisted.core.operations import perform, submit
from aoe_twisted.core.stats import initiators_of, merge_snapshots
from aoe_twisted.core.target import Pending, Target
from aoe_twisted.core.wire import SECTOR_SIZE, format_mac
from aoe_twisted.interfaces import IBlockBackend, IDataSyncBackend
from aoe_twisted.lane import describe as describe_lane
from aoe_twisted.lane.table import build_table
from aoe_twisted.net.link import LinkEvent, LinkMonitor
from aoe_twisted.net.packetsystem import CannotOpenInterface
from aoe_twisted.net.port import (
    AoEPort,
    ILaneFrameSink,
    ILinkAwareProtocol,
    max_sectors_for_mtu,
)
from aoe_twisted.net.ring import STALE_AFTER, receive_ring_frames

__all__ = ["BACKEND_TIMEOUT", "MALFORMED_LOG_INTERVAL", "AoEProtocol", "AoEService"]

_log = Logger()

BACKEND_TIMEOUT = 30.0
"""Seconds an asynchronous disk has to complete an operation (``--backend-timeout``)."""

MALFORMED_LOG_INTERVAL = 10.0
"""
Seconds between log lines about malformed frames.

The first malformed frame is logged at once; the ones after it within this
interval are counted and summarised in one line when it ends, so a peer that
floods garbage costs one log line per interval, not one per frame.
"""

DUPLICATE_RECHECK = 30.0
"""
Seconds after which an address refused as a duplicate is asked about again (up to twice that,
staggered by the interface's MAC).
"""

#: Seconds between two looks at the duplicate watch (asking again, timing out, settling).
_WATCH_TICK = 0.1

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


@implementer(ILaneFrameSink, ILinkAwareProtocol)
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
        duplicate_wait: float | None = None,
        removed_grace: float = 0.0,
        backend_timeout: float = BACKEND_TIMEOUT,
    ) -> None:
        """
        @param targets: the targets to serve, at distinct shelf.slot addresses.
        @param max_sectors: an upper bound on the sectors per ATA command,
            below what the MTU allows (``None``: the MTU decides alone).
        @param clock: what times the malformed-frame summaries (the global
            reactor by default), and the fallback that ends a drain if the
            transport never calls ``drainFinished``.
        @param malformed_interval: seconds between malformed-frame log lines.
        @param sync: acknowledge writes only once durable (group commit), on
            every target (a target's own ``sync`` asks it for that target).
        @param duplicate_wait: ask the segment whether another server answers
            for an address before serving it, and serve it after this many
            seconds if none does (``aoe_twisted.core.duplicates``); from
            then on, keep watching other servers' replies.  ``None``: serve
            at once and watch nothing.
        @param removed_grace: seconds during which a removed target's
            address answers ATA requests with an error rather than nothing
            (see ``remove_target``); 0: silent at once.
        @param backend_timeout: seconds an asynchronous disk has to complete
            an operation before the request is answered with an ATA error.
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
        self.duplicate_wait = duplicate_wait
        self.removed_grace = removed_grace
        self.backend_timeout = backend_timeout
        #: Requests in flight on asynchronous disks, by (target's stats, initiator).
        self._in_flight: dict[tuple[int, bytes], int] = {}
        #: Requests dropped because their initiator was over its window on the target.
        self.over_window = 0
        #: Asynchronous operations under way, by what they do (for whom, what, where),
        #: each with the requests it answers: a retransmission joins the first.
        self._operations: dict[tuple[Any, ...], list[Pending]] = {}
        #: Group commits still waiting for an asynchronous disk's flush, by disk (its key).
        self._commits: dict[int, defer.Deferred[Any]] = {}
        #: The asynchronous operations' deadlines, oldest first: what -> (deadline, Deferred);
        #: one timer (``_deadline_call``) for all of them instead of one per request.
        self._deadlines: dict[tuple[Any, ...], tuple[float, defer.Deferred[Any]]] = {}
        self._expired: set[tuple[Any, ...]] = set()
        self._deadline_call: IDelayedCall | None = None
        #: Replies to asynchronous completions, sent together once the reactor's turn ends.
        self._outbox: list[bytes] = []
        self._outbox_call: IDelayedCall | None = None
        self.watch: DuplicateWatch | None = None
        #: The MACs of this server's other interfaces (not other servers), set by the service.
        self.own_macs: frozenset[bytes] = frozenset()
        #: Targets asked about and not yet served, by address (interface copies).
        self.probing: dict[tuple[int, int], Target] = {}
        #: Addresses another server answers for with another disk: address -> its MAC.
        self.duplicates: dict[tuple[int, int], bytes] = {}
        #: The targets refused as duplicates (asked about again later), by address.
        self._refused: dict[tuple[int, int], Target] = {}
        self._rechecks: dict[tuple[int, int], IDelayedCall] = {}
        self._sectors = 0xFF
        self._host: Any = None
        #: Whether a write the in-place path declines may wait for group commit.
        self._holds_writes = False
        #: The compiled lane's table, and the dispatcher and generation it was built for.
        self._lane_table: Any = None
        self._lane_for: Dispatcher | None = None
        self._lane_generation = -1
        self._targets_changed()
        self._ticker: Any = None
        self._forget_calls: dict[tuple[int, int], IDelayedCall] = {}

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
        self._host = host
        sectors = max_sectors_for_mtu(host.mtu)
        if self.max_sectors is not None:
            sectors = min(sectors, self.max_sectors)
        self._sectors = sectors
        if host.mtu < _MIN_USEFUL_MTU:
            _log.warn(
                "MTU {mtu} of {interface} is too small for one {sector}-byte sector per frame",
                mtu=host.mtu,
                interface=host.interface,
                sector=SECTOR_SIZE,
            )
        self._stop_watching()
        self.probing = {}
        self.duplicates = {}
        self._refused = {}
        self.dispatcher = Dispatcher(host.mac, [], hold_writes=self.sync)
        self._durability = {}
        if self.duplicate_wait is not None:
            self.watch = DuplicateWatch(
                host.mac, own_macs=self.own_macs, wait=self.duplicate_wait
            )
            self.dispatcher.pass_responses = True
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self.clock
            self._ticker.start(_WATCH_TICK, now=False)
        for target in self.targets:
            self._place(target)
        self._filter()

    def _place(self, target: Target) -> None:
        """Serve ``target`` (an interface copy of it): at once, or once the segment has answered."""
        served = target.for_interface(self._sectors)
        key = (target.shelf, target.slot)
        watch = self.watch
        if watch is None:
            self._serve(served)
            return
        self.probing[key] = served
        self._send(watch.watch(key, _page(served), self.clock.seconds()))
        if self.duplicate_wait == 0:
            self._settle()

    def _serve(self, target: Target) -> None:
        """Answer for ``target`` from now on, log it and announce it."""
        assert self.dispatcher is not None
        host = self._host
        self.dispatcher.add(target)
        self._durability[id(target)] = _durability_call(target.backend)
        _log.info(
            "serving {target} ({size} bytes, {mode}{sync}) on {interface} "
            "({mac}, MTU {mtu}, {sectors} sectors per frame)",
            target=target.name,
            size=target.backend.size,
            mode="ro" if target.backend.read_only else "rw",
            sync=", sync" if target.sync else "",
            interface=host.interface,
            mac=format_mac(host.mac),
            mtu=host.mtu,
            sectors=target.max_sectors,
        )
        if self.announces:
            self._send(self.dispatcher.announcements([target]))

    def _send(self, frames: Sequence[bytes]) -> None:
        """Send ``frames`` now."""
        if self.transport is None:
            return
        for frame in frames:
            self.transport.write(frame)  # type: ignore[call-arg]

    def _filter(self) -> None:
        """Have the port's kernel filter pass the addresses served, asked about or removed."""
        transport = self.transport
        if not isinstance(transport, AoEPort):
            return
        assert self.dispatcher is not None
        addresses = {(t.shelf, t.slot) for t in self.targets}
        addresses.update(self.dispatcher.removed)
        transport.filter_addresses(addresses)

    # -- the targets, changed while serving ----------------------------------

    def _targets_changed(self) -> None:
        """Learn again, once per change of the targets, what the per-frame path tests."""
        self._holds_writes = self.sync or any(t.sync for t in self.targets)

    def add_target(self, target: Target) -> None:
        """Serve ``target`` too (its address must be free here): ask the segment, then serve."""
        self.targets.append(target)
        self._targets_changed()
        if self.dispatcher is None:
            return
        self._filter()
        self._place(target)

    def remove_target(self, shelf: int, slot: int, gone: bool = True) -> Target | None:
        """
        Stop serving the target at ``shelf``.``slot``; return it (``None`` if not served here).

        ``gone`` false: the target is still served on other interfaces (it
        only leaves this one), so its address goes silent here at once.

        Replies held for group commit go out first.  During
        ``removed_grace`` its address answers ATA requests with an ATA
        error: the Linux initiator then fails the I/O at once (so a
        ``umount`` or ``aoe-flush`` of a removed disk finishes) instead of
        retrying an unanswered request for ``aoe_deadsecs`` (180 s by
        default).  After that the address is silent.
        """
        key = (shelf, slot)
        target = next((t for t in self.targets if (t.shelf, t.slot) == key), None)
        if target is None:
            return None
        self.targets.remove(target)
        self._targets_changed()
        self.drainFinished()
        if self.dispatcher is not None:
            grace = gone and self.removed_grace > 0
            served = self.dispatcher.remove(shelf, slot, answer_removed=grace)
            if served is not None:
                self._durability.pop(id(served), None)
            self.probing.pop(key, None)
            self.duplicates.pop(key, None)
            self._refused.pop(key, None)
            recheck = self._rechecks.pop(key, None)
            if recheck is not None and recheck.active():
                recheck.cancel()
            if self.watch is not None:
                self.watch.forget(key)
            if served is not None and grace:
                self._forget_later(key)
            self._filter()
        return target

    def replace_target(self, target: Target) -> None:
        """
        Serve ``target`` in place of the one at its address (changed options, another backend).

        Replies held for group commit go out first (on the old disk); the
        next frame is answered by the new target.  A target being asked
        about, or refused as a duplicate, keeps that state with the new one.
        """
        key = (target.shelf, target.slot)
        for index, old in enumerate(self.targets):
            if (old.shelf, old.slot) == key:
                self.targets[index] = target
                break
        else:
            raise KeyError(f"e{target.shelf}.{target.slot} is not served on {self.interface}")
        self._targets_changed()
        if self.dispatcher is None:
            return
        self.drainFinished()
        served = target.for_interface(self._sectors)
        previous = None
        if key in self.probing:
            previous = self.probing[key]
            self.probing[key] = served
        elif key in self._refused:
            previous = self._refused[key]
            self._refused[key] = served
        elif key in self.dispatcher.index:
            previous = self.dispatcher.replace(served)
            self._durability.pop(id(previous), None)
            self._durability[id(served)] = _durability_call(served.backend)
            _log.info("changed {target} on {interface}", target=served.name,
                      interface=self.interface)
        watch = self.watch
        if watch is not None and previous is not None and key not in self.duplicates:
            page = _page(served)
            if page != _page(previous):
                # Another disk (or slice) now: what other servers serve is judged anew.
                watch.forget(key)
                self._send(watch.watch(key, page, self.clock.seconds()))

    def state_of(self, shelf: int, slot: int) -> tuple[str, bytes | None, tuple[bytes, ...]]:
        """Return ``(state, the other server's MAC or None, second paths)`` of one address here."""
        key = (shelf, slot)
        paths = self.watch.paths(key) if self.watch is not None else ()
        if key in self.duplicates:
            return "duplicate", self.duplicates[key], paths
        if key in self.probing:
            return "probing", None, paths
        if self.dispatcher is not None and key in self.dispatcher.index:
            return "serving", None, paths
        return "down", None, paths

    def answer_removed(self, shelf: int, slot: int, seconds: float) -> None:
        """
        Answer ATA requests for ``shelf``.``slot`` (not served here) as removed, ``seconds`` more.

        For a ``--workers`` worker started after the target was removed in
        the parent: every process answers its share of the frames alike.
        """
        key = (shelf, slot)
        if self.dispatcher is None or key in self.dispatcher.index or seconds <= 0:
            return
        self.dispatcher.removed[key] = None  # type: ignore[assignment]
        self._forget_later(key, seconds)
        self._filter()

    def _forget_later(self, key: tuple[int, int], seconds: float | None = None) -> None:
        """Make a removed address silent once ``removed_grace`` (or ``seconds``) has passed."""
        previous = self._forget_calls.pop(key, None)
        if previous is not None and previous.active():
            previous.cancel()

        def forget() -> None:
            self._forget_calls.pop(key, None)
            if self.dispatcher is not None:
                self.dispatcher.forget_removed(*key)
                self._filter()

        delay = self.removed_grace if seconds is None else seconds
        self._forget_calls[key] = self.clock.callLater(delay, forget)

    # -- other servers on the segment ------------------------------------------

    def _heard(self, frame: bytes) -> None:
        """Give another server's response to the duplicate watch; act on what it concludes."""
        watch = self.watch
        if watch is None:
            return
        frames, verdicts = watch.frame_received(frame, self.clock.seconds())
        self._send(frames)
        for verdict in verdicts:
            self._judged(verdict)

    def _judged(self, verdict: Duplicate | SecondPath) -> None:
        """A duplicate stops being served (critical line); a second path is noted (info line)."""
        key = verdict.address
        if isinstance(verdict, SecondPath):
            _log.info("{line}", line=verdict.describe())
            return
        if key in self.duplicates:
            return
        self.duplicates[key] = verdict.theirs
        target = self.probing.pop(key, None)
        if self.dispatcher is not None:
            served = self.dispatcher.remove(*key)
            if served is not None:
                target = served
                self._durability.pop(id(served), None)
        name = target.name if target is not None else f"e{key[0]}.{key[1]}"
        if target is not None:
            self._refused[key] = target
            self._recheck_later(key)
        self._filter()
        _log.critical(
            "duplicate address on {interface}: {line} ({target} is not served here while "
            "the other server answers for it; asked again after {interval:.0f}-{twice:.0f} s)",
            interface=self.interface,
            line=verdict.describe(),
            target=name,
            interval=DUPLICATE_RECHECK,
            twice=2 * DUPLICATE_RECHECK,
        )

    def _recheck_later(self, key: tuple[int, int]) -> None:
        """Ask the segment about a refused address again after ``DUPLICATE_RECHECK`` seconds."""
        previous = self._rechecks.pop(key, None)
        if previous is not None and previous.active():
            previous.cancel()
        # Staggered by our MAC, so two servers that refused each other do not ask
        # again at the same moment (and refuse each other again): one gets it back.
        mac = self._host.mac if self._host is not None else bytes(6)
        delay = DUPLICATE_RECHECK * (1 + mac[-1] / 256)
        self._rechecks[key] = self.clock.callLater(delay, self._recheck, key)

    def _recheck(self, key: tuple[int, int]) -> None:
        """
        Ask again about a refused address: served again if nobody else answers for it now.

        The other server may have stopped, or changed address; if it still
        answers, the address is refused again (and one more critical line says so).
        """
        self._rechecks.pop(key, None)
        target = self._refused.pop(key, None)
        watch = self.watch
        if target is None or watch is None or key not in self.duplicates:
            return
        del self.duplicates[key]
        watch.forget(key)
        self.probing[key] = target
        self._send(watch.watch(key, _page(target), self.clock.seconds()))

    def _tick(self) -> None:
        """Ask again what went unanswered, judge what timed out, serve what has settled."""
        watch = self.watch
        if watch is None:
            return
        now = self.clock.seconds()
        self._send(watch.retransmit(now))
        for verdict in watch.expire(now):
            self._judged(verdict)
        self._settle()

    def _settle(self) -> None:
        """Serve every target asked about whose address nobody else answered for in time."""
        watch = self.watch
        if watch is None or not self.probing:
            return
        now = self.clock.seconds()
        for key in list(self.probing):
            if key not in self.duplicates and watch.settled(key, now) and not watch.duplicates(key):
                self._serve(self.probing.pop(key))

    def _stop_watching(self) -> None:
        """Stop the duplicate watch's timer."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None and ticker.running:
            ticker.stop()
        self.watch = None

    def announce(self) -> None:
        """Send every served target's unsolicited config reply (the start-up announcement)."""
        assert self.transport is not None and self.dispatcher is not None
        self._send(self.dispatcher.announcements())

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
            if self._holds_writes:  # a declined write may wait for its sync: not general()
                self._act(dispatcher.frame_received(frame))
            else:
                self._act(dispatcher.general(frame))
        return length

    def laneTable(self) -> Any:
        """
        ``ILaneFrameSink``: the compiled lane's table for the targets served now, or ``None``.

        Built again when the dispatcher or its targets changed; ``None``
        while replies are held for group commit (every frame then goes
        through ``frameReceivedInto``, which holds its reply too).  Under
        ``sync`` the lane holds its writes' replies in their TX slots, and
        ``drainFinished`` syncs those disks too before releasing them.
        """
        if self._held:
            return None
        dispatcher = self.dispatcher
        if dispatcher is None or not dispatcher.fast_path:
            return None
        if dispatcher is not self._lane_for or dispatcher.generation != self._lane_generation:
            self._lane_table = build_table(
                dispatcher.fast_index.values(), hold_writes=dispatcher.hold_writes
            )
            self._lane_for = dispatcher
            self._lane_generation = dispatcher.generation
        return self._lane_table

    def laneAnswered(self, count: int) -> None:
        """``ILaneFrameSink``: count ``count`` frames answered by the lane, as the fast path's."""
        dispatcher = self.dispatcher
        if dispatcher is None:
            return
        counters = dispatcher.counters
        counters.received += count
        counters.answered += count
        counters.replies += count
        counters.fast += count

    def _act(self, decision: Decision) -> None:
        """Carry out ``decision``: log what it says, send its replies, do its disk operations."""
        if decision.heard is not None:
            self._heard(decision.heard)
            return
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
        Do ``pending``'s disk operation, and act on its completion.

        A synchronous disk (``IBlockBackend``) is called directly, in the
        reactor thread; an asynchronous one (``IAsyncBlockBackend``) is
        started and answered when it completes (``_start``).  Either way
        the completion goes through the dispatcher.
        """
        if pending.target.asynchronous:
            self._start(pending)
            return
        dispatcher = self.dispatcher
        assert dispatcher is not None
        started = perf_counter()
        try:
            result = perform(pending.io, pending.target.backend)
        except OSError as e:
            decision = dispatcher.complete(pending, None, e, perf_counter() - started)
        else:
            decision = dispatcher.complete(pending, result, elapsed=perf_counter() - started)
        if decision.replies:
            self._deliver(decision)

    def _start(self, pending: Pending) -> None:
        """
        Start ``pending``'s operation on an asynchronous disk; answer when it completes.

        An initiator that already has its buffer count of requests in flight
        on the target is over the window it was told: the request is dropped
        (counted in ``over_window``; the initiator retransmits it).  An
        operation not complete within ``backend_timeout`` seconds is
        cancelled and answered with an ATA error (cause ``ETIMEDOUT``, which
        the service's sweep logs), so a disk that never answers pins
        nothing.  An exception that is not an ``OSError`` is a bug in the
        backend: logged with its traceback, answered as ``EIO``.

        A request identical to one under way from the same initiator (the
        same command, place and data: a retransmission, which the Linux
        initiator sends under a new tag) starts nothing: it is answered,
        under its own tag, when the first completes.  So a slow disk is not
        given the same work again and again, and the initiator gets the
        answer (or the timeout's ATA error) under the tag it waits for.
        """
        target = pending.target
        key = (id(target.stats), pending.initiator)
        io = pending.io
        # Keyed without the data (no copy or hash of a write's payload per request);
        # the data is compared only when a request to the same place is under way.
        same: tuple[Any, ...] = (key, io.kind, io.offset, io.length)
        waiting = self._operations.get(same)
        if waiting is not None:
            if waiting[0].io.data == io.data:
                # The same request again (an initiator's retransmission under a new
                # tag): answered with the operation already under way, not a second one.
                waiting.append(pending)
                return
            # Another write to the same place while the first is under way (no
            # order holds between requests in flight): an operation of its own.
            same = (*same, id(pending))
        window = self._in_flight.get(key, 0)
        if target.buffer_count and window >= target.buffer_count:
            target.stats.in_flight -= 1
            self.over_window += 1
            return
        self._in_flight[key] = window + 1
        self._operations[same] = [pending]
        started = perf_counter()
        try:
            d = submit(io, target.backend)
        except BaseException:
            d = defer.fail()
        else:
            if not isinstance(d, defer.Deferred):
                d = defer.succeed(d)
        deadlines = self._deadlines

        def done(result: Any) -> None:
            deadlines.pop(same, None)
            self._completed(same, result, None, perf_counter() - started)

        def failed(failure: Failure) -> None:
            deadlines.pop(same, None)
            error = failure.value
            if same in self._expired:
                self._expired.discard(same)
                error = OSError(
                    errno.ETIMEDOUT, f"no answer from the disk in {self.backend_timeout:g} s"
                )
            elif not isinstance(error, OSError):
                _log.failure(
                    "{target}: the disk raised an unexpected error (a bug in its backend); "
                    "answered as an I/O error",
                    failure,
                    target=target.name,
                )
                error = OSError(errno.EIO, f"unexpected error: {failure.getErrorMessage()}")
            self._completed(same, None, error, perf_counter() - started)

        if not d.called:
            deadlines[same] = (self.clock.seconds() + self.backend_timeout, d)
            if self._deadline_call is None:
                self._deadline_call = self.clock.callLater(self.backend_timeout, self._expire)
        d.addCallbacks(done, failed)

    def _expire(self) -> None:
        """
        Cancel every asynchronous operation past its deadline (answered ``ETIMEDOUT``).

        One timer for all of them, set again for the oldest left, rather than
        a ``DelayedCall`` per request: the deadlines are in the order the
        operations started.
        """
        self._deadline_call = None
        now = self.clock.seconds()
        deadlines = self._deadlines
        while deadlines:
            same = next(iter(deadlines))
            deadline, d = deadlines[same]
            if deadline > now:
                break
            del deadlines[same]
            self._expired.add(same)
            d.cancel()  # fires failed(), which answers ETIMEDOUT (and forgets it expired)
        if deadlines:
            deadline = next(iter(deadlines.values()))[0]
            self._deadline_call = self.clock.callLater(max(0.0, deadline - now), self._expire)

    def _completed(
        self,
        same: tuple[Any, ...],
        result: bytes | None,
        error: OSError | None,
        elapsed: float,
    ) -> None:
        """
        An asynchronous operation completed: answer its request (if still serving).

        Every copy of the request that arrived meanwhile (each under its own
        tag) is answered too: an initiator waits for the reply to its latest
        tag, and ignores the others.
        """
        key = same[0]
        left = self._in_flight.get(key, 1) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        for pending in self._operations.pop(same, ()):
            dispatcher = self.dispatcher
            if dispatcher is None:
                pending.finish(result, error, elapsed)
                continue
            decision = dispatcher.complete(pending, result, error, elapsed)
            if decision.replies and self.transport is not None:
                self._deliver(decision, later=True)

    def _deliver(self, decision: Decision, later: bool = False) -> None:
        """
        Send ``decision``'s replies, or hold them for group commit.

        Under ``sync`` a reply acknowledging a write is held until its disk
        is synced, and so is every reply after it in the same drain.

        ``later``: the replies to an asynchronous completion, which arrive
        outside the port's drain (one at a time, from the disk's own events):
        with a port that sends several frames with one system call
        (``batches_writes``: its rings are mapped) they are queued and sent
        together at the end of the reactor's turn (``callLater(0)``), one
        ``send`` for the burst rather than one each.
        """
        written = decision.written
        durable = written is not None and (self.sync or written.sync)
        if self._held or durable:
            if durable:
                self._held_writes[len(self._held)] = decision
                self._dirty[id(written)] = written
                if self._drain_fallback is None:
                    # The port calls drainFinished; this covers a transport that does not.
                    self._drain_fallback = self.clock.callLater(0, self.drainFinished)
            self._held.extend(decision.replies)
            return
        if later and isinstance(self.transport, AoEPort) and self.transport.batches_writes:
            self._outbox.extend(decision.replies)
            if self._outbox_call is None:
                self._outbox_call = self.clock.callLater(0, self._send_outbox)
            return
        write = self.transport.write  # type: ignore[union-attr]
        for reply in decision.replies:
            write(reply)  # type: ignore[call-arg]

    def _send_outbox(self) -> None:
        """Send the replies asynchronous completions queued, with one flush if the port can."""
        self._outbox_call = None
        frames, self._outbox = self._outbox, []
        transport = self.transport
        if transport is None or not frames:
            return
        transport.writeFrames(frames)  # type: ignore[attr-defined]

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
        port = self.transport if isinstance(self.transport, AoEPort) else None
        lane_written = port.lane_held() if port is not None else []
        if not self._held and not lane_written:
            return
        held, self._held = self._held, []
        writes, self._held_writes = self._held_writes, {}
        dirty, self._dirty = self._dirty, {}
        for target in lane_written:
            dirty.setdefault(id(target), target)
        failed: set[int] = set()
        waiting: list[defer.Deferred[Any]] = []
        for key, target in dirty.items():
            try:
                result = self._durability.get(key, target.backend.flush)()
            except OSError as e:
                self._sync_failed(failed, key, target, e)
                continue
            if isinstance(result, defer.Deferred):
                # An asynchronous disk: its replies wait for its flush, not the reactor.
                result.addTimeout(self.backend_timeout, self.clock)
                result.addErrback(self._async_sync_failed, failed, key, target)
                waiting.append(result)
        self.syncs += len(dirty)
        if lane_written:
            # The compiled lane's disks are synchronous: synced above, released now,
            # before any reply held here (theirs came from later requests).
            assert port is not None
            released, refused = port.lane_release(failed)
            self.synced_writes += released - refused
            self.sync_failures += refused
        # Replies leave in the order their requests came: after any earlier group
        # still waiting on one of the same disks (not behind other disks' flushes).
        earlier = {id(c): c for c in map(self._commits.get, dirty) if c is not None}
        if not waiting and not earlier:
            self._release(held, writes, failed)
            return
        commit: defer.Deferred[Any] = defer.gatherResults(
            [*earlier.values(), *waiting], consumeErrors=True
        )

        def release(_: object) -> None:
            for key in dirty:
                if self._commits.get(key) is commit:
                    del self._commits[key]
            self._release(held, writes, failed)

        commit.addBoth(release)
        if not commit.called:
            for key in dirty:
                self._commits[key] = commit

    def _async_sync_failed(
        self, failure: Failure, failed: set[int], key: int, target: Target
    ) -> None:
        """An asynchronous disk's flush failed (or timed out): its writes are refused."""
        error = failure.value
        if isinstance(error, defer.TimeoutError):
            error = OSError(
                errno.ETIMEDOUT, f"no answer from the disk in {self.backend_timeout:g} s"
            )
        elif not isinstance(error, OSError):
            error = OSError(errno.EIO, failure.getErrorMessage())
        self._sync_failed(failed, key, target, error)

    def _sync_failed(self, failed: set[int], key: int, target: Target, error: OSError) -> None:
        """Note a disk whose writes could not be made durable: they get ATA errors."""
        failed.add(key)
        target.stats.failed("flush", error)
        _log.error(
            "cannot make writes to {target} durable ({error}): answering them with ATA errors",
            target=target.name,
            error=error.strerror or str(error),
        )

    def _release(self, held: list[bytes], writes: dict[int, Decision], failed: set[int]) -> None:
        """Send a group's held replies, each refused write's refusal in place of its reply."""
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
        if self._outbox_call is not None:
            self._outbox_call.cancel()
            self._send_outbox()
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None
        self._stop_watching()
        for call in [*self._forget_calls.values(), *self._rechecks.values()]:
            if call.active():
                call.cancel()
        self._forget_calls.clear()
        self._rechecks.clear()
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
        placement: Mapping[tuple[int, int], Sequence[str]] | None = None,
        duplicate_wait: float | None = None,
        removed_grace: float = 0.0,
        backend_timeout: float = BACKEND_TIMEOUT,
        stale_after: int = STALE_AFTER,
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
        @param placement: the interfaces each target is served on, by
            ``(shelf, slot)``; a target not named is served on every one.
        @param duplicate_wait: see ``AoEProtocol``: ask the segment before
            serving an address (``None``: do not; only the first
            ``--workers`` process does).
        @param removed_grace: see ``AoEProtocol.remove_target``.
        @param backend_timeout: see ``AoEProtocol``.
        @param stale_after: drop requests that waited in a port's receive
            ring more than this many seconds (``--stale-after``; 0: never;
            see ``AoEPort``).
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
        self.placement: dict[tuple[int, int], tuple[str, ...]] = {
            key: tuple(names) for key, names in (placement or {}).items()
        }
        self.duplicate_wait = duplicate_wait if announce else None
        self.removed_grace = removed_grace
        self.backend_timeout = backend_timeout
        self.stale_after = stale_after
        self.ports: dict[str, AoEPort] = {}
        self.protocols: dict[str, AoEProtocol] = {}
        self.monitor: LinkMonitor | None = None
        self._links: dict[str, LinkEvent] = {}
        self._backends_closed = False
        self._sweeper: LoopingCall | None = None
        #: Backend failures already logged, by target address and cause: the count then.
        self._failures_logged: dict[tuple[int, int], dict[str, int]] = {}
        self._failures_quiet_until = 0.0

    def open_interfaces(self, interfaces: Sequence[str]) -> None:
        """Open each of ``interfaces`` not served yet (``CannotOpenInterface`` if one cannot)."""
        for interface in interfaces:
            if interface not in self.interfaces:
                self._add_interface(interface)

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

    def interfaces_of(self, target: Target) -> tuple[str, ...]:
        """The interfaces ``target`` is served on: its placement, or every interface."""
        return self.placement.get((target.shelf, target.slot)) or tuple(self.interfaces)

    def _listen(self, interface: str, wait: bool) -> AoEPort:
        """Open ``interface``'s port and connect a fresh protocol to it."""
        protocol = AoEProtocol(
            [t for t in self.targets if interface in self.interfaces_of(t)],
            self.max_sectors,
            clock=self.reactor,
            sync=self.sync,
            duplicate_wait=self.duplicate_wait,
            removed_grace=self.removed_grace,
            backend_timeout=self.backend_timeout,
        )
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
            stale_after=self.stale_after,
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
        self._share_macs()
        if self.follow_links:
            self.monitor = LinkMonitor.follow(
                self._link_event,
                self.netns,
                self.reactor,
                unless="an interface that is removed and created again will not be served "
                "again until a restart",
            )

    def _share_macs(self) -> None:
        """Tell each interface's duplicate watch the MACs of the others: they are us."""
        macs = {port.mac for port in self.ports.values() if port.mac}
        for interface, protocol in self.protocols.items():
            port = self.ports.get(interface)
            own = frozenset(macs - {port.mac if port is not None else None})
            protocol.own_macs = own  # type: ignore[assignment]
            if protocol.watch is not None:
                protocol.watch.own_macs = own

    # -- the targets, changed while serving ----------------------------------

    def target(self, shelf: int, slot: int) -> Target | None:
        """Return the target served at ``shelf``.``slot``, or ``None``."""
        return next((t for t in self.targets if (t.shelf, t.slot) == (shelf, slot)), None)

    def add_target(self, target: Target, interfaces: Sequence[str] = ()) -> None:
        """
        Serve ``target`` from now on, on ``interfaces`` (default: every interface served).

        An interface not served yet is opened (which needs ``CAP_NET_RAW``:
        ``CannotOpenInterface`` if the server has dropped it).  The target
        is asked about on the segment, then served and announced on each.
        ``ValueError`` if its address is taken.
        """
        if self.target(target.shelf, target.slot) is not None:
            raise ValueError(f"e{target.shelf}.{target.slot} is already served")
        for interface in interfaces:
            if interface not in self.interfaces:
                self._add_interface(interface)
        if interfaces:
            self.placement[(target.shelf, target.slot)] = tuple(interfaces)
        self.targets.append(target)
        for interface in self.interfaces_of(target):
            protocol = self.protocols.get(interface)
            if protocol is not None:
                protocol.add_target(target)

    def remove_target(self, shelf: int, slot: int) -> Target | None:
        """
        Stop serving the target at ``shelf``.``slot``, flush and close its disk; return it.

        See ``AoEProtocol.remove_target`` for what initiators see.
        ``None`` if no target is served there.
        """
        target = self.target(shelf, slot)
        if target is None:
            return None
        for interface in self.interfaces_of(target):
            protocol = self.protocols.get(interface)
            if protocol is not None:
                protocol.remove_target(shelf, slot)
        self.targets.remove(target)
        self.placement.pop((shelf, slot), None)
        self._failures_logged.pop((shelf, slot), None)
        _log.info("removed {target}", target=target.name)
        self._close_backend(target)
        return target

    def replace_target(self, target: Target, interfaces: Sequence[str] = ()) -> Target:
        """
        Serve ``target`` in place of the one at its address; return the old one.

        Used when a target's options change.  On interfaces it is still
        served on, the next frame is answered by ``target``; it stops, or
        starts, on interfaces it leaves or joins.  The old target's disk is
        flushed and closed unless ``target`` uses the same backend object.
        """
        key = (target.shelf, target.slot)
        old = self.target(*key)
        if old is None:
            raise KeyError(f"e{target.shelf}.{target.slot} is not served")
        for interface in interfaces:
            if interface not in self.interfaces:
                self._add_interface(interface)
        before = set(self.interfaces_of(old))
        if interfaces:
            self.placement[key] = tuple(interfaces)
        else:
            self.placement.pop(key, None)
        self.targets[self.targets.index(old)] = target
        after = set(self.interfaces_of(target))
        for interface, protocol in self.protocols.items():
            if interface in before and interface in after:
                protocol.replace_target(target)
            elif interface in before:
                protocol.remove_target(*key, gone=False)
            elif interface in after:
                protocol.add_target(target)
        if old.backend is not target.backend:
            self._close_backend(old)
        return old

    def retune(
        self, removed_grace: float, backend_timeout: float, duplicate_wait: float | None = None
    ) -> None:
        """Apply a reload's ``removed_grace``, ``backend_timeout`` and ``duplicate_wait``."""
        self.removed_grace = removed_grace
        self.backend_timeout = backend_timeout
        for protocol in self.protocols.values():
            protocol.removed_grace = removed_grace
            protocol.backend_timeout = backend_timeout
            if duplicate_wait is not None and protocol.watch is not None:
                protocol.duplicate_wait = duplicate_wait
                protocol.watch.wait = duplicate_wait

    def answer_removed(self, shelf: int, slot: int, seconds: float) -> None:
        """See ``AoEProtocol.answer_removed``: on every interface."""
        for protocol in self.protocols.values():
            protocol.answer_removed(shelf, slot, seconds)

    def _add_interface(self, interface: str) -> None:
        """Start serving on one more interface (for a target placed there)."""
        self.interfaces.append(interface)
        if self.socket_fds is not None or not self.running:
            return
        try:
            self.ports[interface] = self._listen(interface, wait=True)
        except CannotOpenInterface:
            self.interfaces.remove(interface)
            raise
        self._share_macs()

    def state_of(self, target: Target) -> tuple[str, bytes | None, tuple[bytes, ...]]:
        """
        Return what the interfaces say of ``target``: state, other server's MAC, second paths.

        The state is ``"duplicate"`` if any interface refused it,
        ``"probing"`` while one still asks the segment, ``"serving"`` once
        one serves it, else ``"down"`` (its interfaces are not up).
        """
        states = []
        other = None
        paths: set[bytes] = set()
        for interface in self.interfaces_of(target):
            protocol = self.protocols.get(interface)
            if protocol is None:
                continue
            state, theirs, known = protocol.state_of(target.shelf, target.slot)
            states.append(state)
            other = other or theirs
            paths.update(known)
        for state in ("duplicate", "probing", "serving"):
            if state in states:
                return state, other, tuple(sorted(paths))
        return "down", other, tuple(sorted(paths))

    # -- what the server did ---------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """
        Return the figures of every target and interface, in the snapshot format.

        The format ``aoe_twisted.core.stats`` documents, which the control
        socket, ``aoe-twisted ctl`` and the Prometheus endpoint read.
        """
        now = self.reactor_now()
        targets = [t.stats.snapshot(t.address, t.spec, now) for t in self.targets]
        interfaces = []
        for interface in self.interfaces:
            port = self.ports.get(interface)
            protocol = self.protocols.get(interface)
            counters = protocol.dispatcher.counters if protocol and protocol.dispatcher else None
            interfaces.append(
                {
                    "interface": interface,
                    "mac": format_mac(port.mac) if port is not None and port.mac else "",
                    "mtu": (port.mtu or 0) if port is not None else 0,
                    "received": port.frames_received if port is not None else 0,
                    "sent": port.frames_sent if port is not None else 0,
                    "ignored": _ignored(port, counters),
                    "dropped": port.frames_dropped if port is not None else 0,
                    "malformed": counters.malformed if counters is not None else 0,
                    "stale": port.frames_stale if port is not None else 0,
                }
            )
        return {
            "time": now,
            "targets": targets,
            "interfaces": interfaces,
            "initiators": initiators_of(targets),
        }

    def merged_snapshot(self) -> dict[str, Any]:
        """The figures of every process serving: this one's (``WorkersService`` sums several)."""
        return merge_snapshots([self.snapshot()])

    def reactor_now(self) -> float:
        """The wall clock, as the service's reactor tells it (a test's clock in tests)."""
        reactor: Any = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        return float(reactor.seconds())

    def sweep(self) -> None:
        """
        Once a second: note which initiators were seen, and log the disks' new failures.

        The first failure of each cause on a target is logged at once, at
        error level, with the operating system's words; after that, at most
        one line per ``MALFORMED_LOG_INTERVAL`` says how many more of each
        cause there were.  The per-frame paths only count.
        """
        now = self.reactor_now()
        summary = now >= self._failures_quiet_until
        more = []
        for target in self.targets:
            target.stats.sweep(now)
            errors = target.stats.backend_errors
            if not errors:
                continue
            logged = self._failures_logged.setdefault((target.shelf, target.slot), {})
            for cause, count in errors.items():
                before = logged.get(cause)
                if before is None:
                    _log.error(
                        "{target}: the disk failed: {what} ({cause}); answered with an ATA "
                        "error, the initiator sees an I/O error (more are counted in "
                        "ctl stats and summarised every {interval:.0f} s)",
                        target=target.name,
                        what=target.stats.failures.get(cause, cause),
                        cause=cause,
                        interval=MALFORMED_LOG_INTERVAL,
                    )
                    logged[cause] = count
                    # The count of the ones after it comes a whole interval later.
                    self._failures_quiet_until = max(
                        self._failures_quiet_until, now + MALFORMED_LOG_INTERVAL
                    )
                elif count > before and summary:
                    more.append(f"{target.name}: {count - before} more {cause}")
                    logged[cause] = count
        if more:
            _log.error(
                "disk failures in the last {interval:.0f} s: {failures}",
                interval=MALFORMED_LOG_INTERVAL,
                failures="; ".join(more),
            )
            self._failures_quiet_until = now + MALFORMED_LOG_INTERVAL

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
        _log.info(describe_lane())
        super().startService()
        self._sweeper = LoopingCall(self.sweep)
        if self.reactor is not None:
            self._sweeper.clock = self.reactor
        self._sweeper.start(1.0, now=False)

    def stopService(self) -> defer.Deferred[None]:
        """Close the ports; when they are closed, flush and close every backend."""
        super().stopService()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.running:
            sweeper.stop()
            # Failures noted since the last sweep are logged, not lost.
            self.sweep()
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

    def _close_backends(self) -> defer.Deferred[Any] | None:
        """Flush then close each target's backend (once), logging (not raising) failures."""
        if self._backends_closed:
            return None
        self._backends_closed = True
        closing = [self._close_backend(target) for target in self.targets]
        waiting = [d for d in closing if d is not None]
        if not waiting:
            return None
        return defer.gatherResults(waiting, consumeErrors=True).addCallback(lambda _: None)

    def _close_backend(self, target: Target) -> defer.Deferred[Any] | None:
        """
        Flush then close ``target``'s backend, logging (not raising) failures.

        An asynchronous disk's flush and close are waited for: the returned
        ``Deferred`` fires once it is closed (``None`` for a synchronous one).
        """
        backend = target.backend
        if target.asynchronous:
            clock: Any = self.reactor
            if clock is None:
                from twisted.internet import reactor as clock

            def bounded(result: Any) -> Any:
                # A disk that never answers must not hang the stop (or a reload).
                if isinstance(result, defer.Deferred):
                    result.addTimeout(self.backend_timeout, clock)
                return result

            d: defer.Deferred[Any] = defer.succeed(None)
            if not backend.read_only:
                d.addCallback(lambda _: bounded(backend.flush()))
                d.addErrback(
                    lambda f: _log.failure(
                        "cannot flush the disk of {target}", f, target=target.name
                    )
                )
            d.addCallback(lambda _: bounded(backend.close()))
            d.addErrback(
                lambda f: _log.failure("cannot close the disk of {target}", f, target=target.name)
            )
            return d
        try:
            if not backend.read_only:
                backend.flush()
        except OSError:
            _log.failure("cannot flush the disk of {target}", target=target.name)
        try:
            backend.close()
        except OSError:
            _log.failure("cannot close the disk of {target}", target=target.name)
        return None


def _page(target: Target) -> bytes | None:
    """The IDENTIFY page ``target`` answers with: what the duplicate watch compares."""
    return target.identifier.identify() if target.identifier is not None else None


def _ignored(port: AoEPort | None, counters: Any) -> int:
    """Frames an interface received and did not answer: not AoE, not ours, others' replies."""
    ignored = port.frames_ignored if port is not None else 0
    if counters is not None:
        ignored += counters.not_aoe + counters.response + counters.unaddressed + counters.silent
    return int(ignored)
