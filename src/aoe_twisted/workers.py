# -*- test-case-name: tests.test_workers -*-
"""
``--workers N``: N processes serving one interface, for machines with several cores.

One Python process answers frames on one core.  ``WorkersService`` opens N
packet sockets on the interface while it still has ``CAP_NET_RAW``, joins
them to one ``PACKET_FANOUT`` group (``aoe_twisted.net.fanout``: all frames of
one initiator for one target go to the same socket, in order) and serves the
first itself; after ``twistd`` has dropped its privileges it starts N-1
worker processes (``python -m aoe_twisted.workers``), each handed one socket
by descriptor.  Workers need no privilege of their own.

What the workers share, so that they are one target to an initiator:

- the disks: one that provides ``IDescriptorBackend`` (``file:``,
  ``block:``) is passed by descriptor and rebuilt in each worker with its
  class's ``adopt``; one that provides ``IProcessShareableBackend``
  (``memory:``) is first moved where every process reaches it with
  ``share()`` (a ``SharedMemoryBackend``, passed by descriptor); any other
  backend is opened again in each worker from its ``SCHEME:SPEC``;
- the config string, mask list and reserve list: in shared memory
  (``aoe_twisted.sharedacl``), persisted to ``--state-dir`` when given.

A worker's log events come to the parent as JSON on its standard output and
are logged there under ``aoe worker N``.  A worker that dies is restarted
with its socket (after 1 s, doubling up to 30 s while it keeps dying soon
after starting); one that loses its parent (its standard input closes) stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol, task
from twisted.logger import (
    Logger,
    eventFromJSON,
    globalLogBeginner,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.reflect import fullyQualifiedName, namedAny

from aoe_twisted.core.stats import merge_snapshots
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import ETHERTYPE
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import IDescriptorBackend, IProcessShareableBackend, IStatePersister
from aoe_twisted.net.bpf import address_filter, attach_filter, detach_filter, is_catch_all
from aoe_twisted.net.fanout import MAX_WORKERS, FanoutError, join_fanout
from aoe_twisted.net.link import LinkEvent, LinkMonitor
from aoe_twisted.net.packetsystem import CannotOpenInterface, open_packet_socket
from aoe_twisted.net.ring import STALE_AFTER
from aoe_twisted.server import BACKEND_TIMEOUT, AoEService
from aoe_twisted.sharedacl import SharedState

__all__ = ["MAX_WORKERS", "WorkersService", "main", "share_targets"]

_log = Logger()


_RESTART_DELAY = 1.0
_MAX_RESTART_DELAY = 30.0
#: A worker that dies sooner than this after starting has its restart delay doubled.
_STABLE_AFTER = 10.0
#: Regions of shared state made beyond the targets at start-up, for targets added later.
SPARE_TARGETS = 1024
#: Seconds between two looks at which addresses the parent serves, for the kernel filter.
_REFILTER_INTERVAL = 0.1
#: Seconds between two stats reports of a worker to the parent.
_REPORT_INTERVAL = 1.0
#: How long a worker has to stop after its standard input closes, before SIGKILL.
_STOP_TIMEOUT = 10.0


def share_targets(targets: Sequence[Target]) -> SharedState:
    """
    Make ``targets`` servable by several processes; return the shared state to pass on.

    Each target's ACL store becomes a ``SharedACLStore`` holding what the
    old store held (persisting through it if it provides ``IStatePersister``,
    as a ``FileACLStore`` does), and a backend that provides
    ``IProcessShareableBackend`` (a ``MemoryBackend``) is replaced by what its
    ``share()`` returns: the same disk where the workers reach it.
    """
    state = SharedState.create(len(targets) + SPARE_TARGETS)
    for index, target in enumerate(targets):
        old = target.acl
        persist = old.replace_state if IStatePersister.providedBy(old) else None
        store = state.store(index, persist)
        store.publish(old.config_string, old.mask_list, old.reserve_list)
        target.acl = store
        if IProcessShareableBackend.providedBy(target.backend):
            target.backend = target.backend.share()
    return state


def _describe_backend(backend: Any, spec: str, direct: bool) -> dict[str, Any]:
    """
    Say how a worker gets ``backend``: its descriptor and handoff, or its spec to open again.

    An ``IDescriptorBackend`` is described by its class (for ``adopt``), its
    descriptor (``fd``, which ``_spawn`` passes on) and its ``handoff()``.
    """
    if IDescriptorBackend.providedBy(backend):
        return {
            "class": fullyQualifiedName(type(backend)),
            "fd": backend.fileno(),
            "handoff": backend.handoff(),
        }
    return {"spec": spec, "read_only": bool(backend.read_only), "direct": direct}


class _WorkerProcess(protocol.ProcessProtocol):
    """One worker as the parent sees it: relays its log, reports its end."""

    def __init__(self, owner: WorkersService, index: int) -> None:
        self.owner = owner
        self.index = index
        self.system = f"aoe worker {index}"
        self.ended: defer.Deferred[None] = defer.Deferred()
        #: Fires once the worker serves (it says so after starting its service).
        self.ready: defer.Deferred[None] = defer.Deferred()
        #: The parent's end of the worker's AMP channel (changes while serving).
        self.channel: _Channel | None = None
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        """Re-emit each complete JSON log event of the worker in this process's log."""
        self._out += data
        *records, rest = self._out.split(b"\x1e")
        if rest.endswith(b"\n"):
            # Each event is "\x1e{json}\n": the last one is whole once its newline is here.
            records.append(rest)
            rest = b""
        self._out = rest
        for record in records:
            record = record.strip()
            if not record:
                continue
            try:
                event = eventFromJSON(record.decode("utf-8"))
            except ValueError:
                line = record.decode(errors="replace")
                _log.warn("{system}: {line}", system=self.system, line=line)
                continue
            if event.get("aoe_ready") is True:
                if not self.ready.called:
                    self.ready.callback(None)
                continue
            stats = event.get("aoe_stats")
            if isinstance(stats, dict):
                # Not a log line: the worker's figures, for ctl stats and /metrics.
                self.owner.worker_stats[self.index] = stats
                continue
            event["log_system"] = self.system
            globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:
        """Log what the worker wrote to standard error (a crash before logging started)."""
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                text = line.decode(errors="replace")
                _log.error("{system}: {line}", system=self.system, line=text)

    def processEnded(self, reason: Failure) -> None:
        """Tell the service; fire ``ended``."""
        self.owner._worker_ended(self, reason)
        self.ended.callback(None)


# -- the channel from the parent to each worker ---------------------------------
#
# Each worker gets one end of a UNIX socket pair at start (its descriptor in
# its config, "channel_fd"), on which the parent speaks AMP: a target added,
# changed or removed while serving reaches every running worker at once, a
# disk's descriptor passed along (``amp.Descriptor``: SCM_RIGHTS), and the
# change is answered only once the worker applied it.  No worker is
# restarted for a change, so no frame waiting in its ring is lost.


class _AddTarget(amp.Command):
    """Serve one more target: its description (as in ``worker_config``) and disk descriptor."""

    arguments = [
        (b"target", amp.Unicode()),
        (b"fd", amp.Descriptor(optional=True)),
    ]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = {BackendSpecError: b"BACKEND", OSError: b"OS", ValueError: b"VALUE"}


class _ReplaceTarget(_AddTarget):
    """Serve this target in place of the one at its address."""


class _RemoveTarget(amp.Command):
    """Stop serving a target; answer its address as removed for ``grace`` seconds."""

    arguments = [(b"shelf", amp.Integer()), (b"slot", amp.Integer()), (b"grace", amp.Float())]
    response: list[tuple[bytes, amp.Argument]] = []


class _Retune(amp.Command):
    """Take a reload's removed_grace and backend_timeout."""

    arguments = [(b"removed_grace", amp.Float()), (b"backend_timeout", amp.Float())]
    response: list[tuple[bytes, amp.Argument]] = []


class _Channel(amp.AMP):
    """AMP between the parent and a worker, without a log line for its start and end."""

    def makeConnection(self, transport: Any) -> None:
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class _WorkerChannel(_Channel):
    """The worker's end: applies the parent's changes to its ``AoEService``."""

    def __init__(self, aoe: AoEService, shared: SharedState, config: dict[str, Any]) -> None:
        super().__init__()
        self.aoe = aoe
        self.shared = shared
        self.config = config

    def _target(self, text: str, fd: int | None) -> tuple[Target, tuple[str, ...]]:
        description = json.loads(text)
        if fd is not None:
            description["backend"] = dict(description["backend"], fd=fd)
        target = _worker_target(description, self.shared, self.config)
        return target, tuple(description.get("interfaces") or ())

    @_AddTarget.responder
    def add(self, target: str, fd: int | None = None) -> dict[str, Any]:
        built, interfaces = self._target(target, fd)
        self.aoe.add_target(built, interfaces)
        return {}

    @_ReplaceTarget.responder
    def replace(self, target: str, fd: int | None = None) -> dict[str, Any]:
        built, interfaces = self._target(target, fd)
        self.aoe.replace_target(built, interfaces)
        return {}

    @_RemoveTarget.responder
    def remove(self, shelf: int, slot: int, grace: float) -> dict[str, Any]:
        self.aoe.remove_target(shelf, slot)
        self.aoe.answer_removed(shelf, slot, grace)
        return {}

    @_Retune.responder
    def retune(self, removed_grace: float, backend_timeout: float) -> dict[str, Any]:
        self.aoe.retune(removed_grace, backend_timeout)
        return {}


class WorkersService(service.MultiService):
    """
    Serve ``targets`` on ``interfaces`` from ``workers`` processes sharing them by fanout.

    Built by ``twistd aoe --workers N`` (N > 1).  Each interface gets N
    sockets in a ``PACKET_FANOUT`` group of its own, one per process, so
    every process serves every interface.  ``specs`` are the targets'
    ``SCHEME:SPEC`` strings (for backends a worker opens again),
    ``state`` what ``share_targets`` returned for them.  The other
    parameters are ``AoEService``'s.

    The sockets survive their links going down and up.  A socket in a
    fanout group cannot be bound again, and opening new ones needs the
    privilege the server dropped: if an interface is removed and created
    again, the parent says so in a critical line and stops, so that its
    supervisor (systemd's ``Restart=``) starts it afresh rather than
    leaving a process that looks alive and serves nothing there.
    """

    name = "aoe"

    def __init__(
        self,
        interfaces: str | Sequence[str],
        targets: Sequence[Target],
        specs: Sequence[str],
        state: SharedState,
        workers: int,
        netns: str | None = None,
        reactor: Any = None,
        max_sectors: int | None = None,
        sync: bool = False,
        direct: bool = False,
        state_dir: str | None = None,
        exit_on_error: bool = False,
        ring_frames: int | None = None,
        placement: Mapping[tuple[int, int], Sequence[str]] | None = None,
        duplicate_wait: float | None = None,
        removed_grace: float = 0.0,
        backend_timeout: float = BACKEND_TIMEOUT,
        stale_after: int = STALE_AFTER,
    ) -> None:
        super().__init__()
        if not 2 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 2..{MAX_WORKERS}, not {workers}")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.interfaces = [interfaces] if isinstance(interfaces, str) else list(interfaces)
        self.targets = list(targets)
        self.specs = list(specs)
        self.state = state
        self.workers = workers
        self.netns = netns
        self.reactor = reactor
        self.max_sectors = max_sectors
        self.sync = sync
        self.direct = direct
        self.state_dir = state_dir
        self.exit_on_error = exit_on_error
        self.ring_frames = ring_frames
        self.placement: dict[tuple[int, int], tuple[str, ...]] = {
            key: tuple(names) for key, names in (placement or {}).items()
        }
        self.duplicate_wait = duplicate_wait
        self._removed_grace = removed_grace
        self.backend_timeout = backend_timeout
        self.stale_after = stale_after
        #: Removed targets' addresses answered as removed until (wall clock), for new workers.
        self._removed: dict[tuple[int, int], float] = {}
        #: Each worker's latest stats snapshot, by worker number (sent once a second).
        self.worker_stats: dict[int, dict[str, Any]] = {}
        #: ``sockets[interface][worker]``: each interface's fanout group, one socket a worker.
        self.sockets: dict[str, list[socket.socket]] = {}
        self.monitor: LinkMonitor | None = None
        self._indexes: dict[str, int] = {}
        self.processes: dict[int, _WorkerProcess] = {}
        self.restarts = 0
        self._delays = dict.fromkeys(range(1, workers), _RESTART_DELAY)
        self._started_at: dict[int, float] = {}
        self._pending: dict[int, Any] = {}
        self._stopping = False
        self.local: AoEService | None = None
        self._renewing: set[int] = set()
        self._filtered: tuple[set[tuple[int, int]], set[tuple[int, int]]] | None = None
        self._refilter: task.LoopingCall | None = None


    # -- starting -------------------------------------------------------------

    def _fail(self, message: str) -> None:
        """Give up starting: close what is open and exit (or raise) with ``message``."""
        self._close_sockets()
        if self.exit_on_error:
            raise SystemExit(f"twistd aoe: {message}")
        raise RuntimeError(message)

    def _open_sockets(self) -> None:
        """Open, bind and join to a fanout group ``workers`` packet sockets per interface."""
        for interface in self.interfaces:
            group = None
            sockets = self.sockets[interface] = []
            for _ in range(self.workers):
                try:
                    sock = open_packet_socket(interface, ETHERTYPE, self.netns)
                except OSError as e:
                    self._fail(str(CannotOpenInterface(interface, e, self.netns)))
                sockets.append(sock)
                try:
                    group = join_fanout(sock, group)
                except FanoutError as e:
                    self._fail(f"--workers: interface {interface}: {e}")
            _log.info(
                "--workers {workers}: {workers} packet sockets on {interface} share its frames "
                "(PACKET_FANOUT group {group}, by initiator and target)",
                workers=self.workers,
                interface=interface,
                group=group,
            )

    def _filter_sockets(self) -> None:
        """
        Give the fanout sockets their kernel filters: the addresses each may answer.

        A filter belongs to a socket, so the parent sets every one (a
        worker does not filter the socket it is handed).  The parent's own
        socket (the first) passes every address it knows of, including those
        it is still asking the segment about or has refused as duplicates: it
        watches other servers' replies for them (the fanout program sends
        every reply to it).  The workers' sockets pass only the addresses
        the parent serves, so no worker answers for an address before the
        parent knows nobody else does, nor after it found somebody does.
        """
        known = {(t.shelf, t.slot) for t in self.targets}
        known.update(key for key, until in self._removed.items() if until > time.time())
        served = set(known)
        if isinstance(self.local, AoEService):
            for protocol in self.local.protocols.values():
                removed = protocol.dispatcher.removed if protocol.dispatcher else ()
                known.update(removed)
                served.update(removed)
                served.difference_update(protocol.duplicates)
                served.difference_update(protocol.probing)
        if (known, served) == self._filtered:
            return
        self._filtered = (known, served)
        programs = [address_filter(known), address_filter(served)]
        if any(is_catch_all(program) for program in programs):
            _log.warn(
                "--workers: too many addresses for a kernel filter; every AoE frame wakes "
                "the workers"
            )
        for sockets in self.sockets.values():
            for index, sock in enumerate(sockets):
                try:
                    attach_filter(sock.fileno(), programs[0 if index == 0 else 1])
                except OSError as e:
                    _log.warn(
                        "--workers: cannot filter frames in the kernel ({error})",
                        error=e.strerror or str(e),
                    )
                    detach_filter(sock.fileno())

    def _follow_links(self) -> None:
        """Watch the interfaces (before privileges are dropped: it may enter a namespace)."""
        self.monitor = LinkMonitor.follow(
            self._link_event,
            self.netns,
            self.reactor,
            unless="an interface removed and created again will not be noticed",
        )

    def _link_event(self, event: LinkEvent) -> None:
        """Stop, loudly, when a served interface comes back as a new device (see the class)."""
        if event.name not in self.sockets or not event.present:
            return
        known = self._indexes.setdefault(event.name, event.index)
        if event.index == known or self._stopping:
            return
        _log.critical(
            "interface {interface} was removed and created again: --workers cannot bind "
            "its sockets again without the privileges it dropped; stopping so that the "
            "service is restarted",
            interface=event.name,
        )
        self.reactor.stop()

    def privilegedStartService(self) -> None:
        """Open the sockets while the process has ``CAP_NET_RAW``; serve the first ones here."""
        self._open_sockets()
        self._filter_sockets()
        self._follow_links()
        self.local = AoEService(
            self.interfaces,
            self.targets,
            reactor=self.reactor,
            max_sectors=self.max_sectors,
            exit_on_error=self.exit_on_error,
            sync=self.sync,
            ring_frames=self.ring_frames,
            socket_fds={
                interface: os.dup(sockets[0].fileno())
                for interface, sockets in self.sockets.items()
            },
            placement=self.placement,
            duplicate_wait=self.duplicate_wait,
            removed_grace=self._removed_grace,
            backend_timeout=self.backend_timeout,
            stale_after=self.stale_after,
        )
        self.local.setServiceParent(self)
        super().privilegedStartService()

    def startService(self) -> None:
        """Serve here (if not yet) and start the other workers, unprivileged as we now are."""
        if self.local is None:
            self.privilegedStartService()
        super().startService()
        for index in range(1, self.workers):
            self._spawn(index, first=True)
        self._refilter = task.LoopingCall(self._filter_sockets)
        self._refilter.clock = self.reactor
        self._refilter.start(_REFILTER_INTERVAL, now=False)

    def worker_config(self, index: int) -> dict[str, Any]:
        """
        Return what worker ``index`` is told: its socket, the targets and how to get them.

        Each interface's socket is -1 until the service has opened the sockets.
        """
        return {
            "index": index,
            "sockets": {
                interface: (
                    self.sockets[interface][index].fileno() if interface in self.sockets else -1
                )
                for interface in self.interfaces
            },
            "state_fd": self.state.fileno(),
            "state_size": self.state.targets,
            "max_sectors": self.max_sectors,
            "ring_frames": self.ring_frames,
            "removed_grace": self.removed_grace,
            "backend_timeout": self.backend_timeout,
            "stale_after": self.stale_after,
            "removed": [
                [shelf, slot, until]
                for (shelf, slot), until in self._removed.items()
                if until > time.time()
            ],
            "sync": self.sync,
            "state_dir": self.state_dir,
            "targets": [
                self._describe_target(target, spec)
                for target, spec in zip(self.targets, self.specs, strict=True)
            ],
        }

    def _describe_target(self, target: Target, spec: str) -> dict[str, Any]:
        """Say what a worker needs to serve ``target`` (its disk by descriptor or spec)."""
        return {
            "shelf": target.shelf,
            "slot": target.slot,
            "buffer_count": target.buffer_count,
            "max_sectors": target.max_sectors,
            "sync": target.sync,
            "spec": target.spec,
            "state_index": self.state.index_of(target.acl),
            "interfaces": list(self.placement.get((target.shelf, target.slot), ())),
            "backend": _describe_backend(target.backend, spec, self.direct),
        }

    def _spawn(self, index: int, first: bool = False) -> None:
        """
        Start worker ``index`` with its socket, the shared state and the disks' descriptors.

        If it cannot be started at all, give up serving (``first``, at
        start-up: a one-line error) or try again later (a restart).
        """
        self._pending.pop(index, None)
        config = self.worker_config(index)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config["channel_fd"] = theirs.fileno()
        fds = [*config["sockets"].values(), config["state_fd"], theirs.fileno()]
        fds += [t["backend"]["fd"] for t in config["targets"] if "fd" in t["backend"]]
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        child_fds.update({fd: fd for fd in fds})
        process = _WorkerProcess(self, index)
        self._started_at[index] = self.reactor.seconds()
        try:
            self.reactor.spawnProcess(
                process,
                sys.executable,
                [sys.executable, "-m", "aoe_twisted.workers", json.dumps(config)],
                env=dict(os.environ),
                childFDs=child_fds,
            )
        except OSError as e:
            # Most likely the interpreter is out of reach of the user twistd
            # dropped to (under a mode-0700 home directory, say).
            message = (
                f"--workers: cannot start worker {index} with {sys.executable}: "
                f"{e.strerror or e} (the user the server runs as must be able to run it)"
            )
            ours.close()
            if first:
                self._fail(message)
            self._restart_later(index, message)
            return
        finally:
            theirs.close()
        self.processes[index] = process
        channel = _Channel()
        factory = protocol.Factory.forProtocol(lambda: channel)  # type: ignore[arg-type]
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()
        process.channel = channel

    # -- the targets, changed while serving ----------------------------------
    #
    # The parent's share is served by ``local`` (an ``AoEService``), changed in
    # place as a single process is; every running worker is told the change
    # over its channel (``_tell``), and the change is done once all of them
    # have applied it.  A worker started later gets the targets as they are
    # then, in its config.

    def target(self, shelf: int, slot: int) -> Target | None:
        """Return the target served (or being added) at ``shelf``.``slot``, or ``None``."""
        return next((t for t in self.targets if (t.shelf, t.slot) == (shelf, slot)), None)

    def interfaces_of(self, target: Target) -> tuple[str, ...]:
        """The interfaces ``target`` is served on."""
        return self.placement.get((target.shelf, target.slot)) or tuple(self.interfaces)

    def state_of(self, target: Target) -> tuple[str, bytes | None, tuple[bytes, ...]]:
        """What the parent's interfaces say of ``target``; ``"probing"`` while being added."""
        assert self.local is not None
        if self.local.target(target.shelf, target.slot) is None:
            return "probing", None, ()
        return self.local.state_of(target)

    @property
    def removed_grace(self) -> float:
        """See ``AoEService``."""
        return self._removed_grace

    def retune(
        self, removed_grace: float, backend_timeout: float, duplicate_wait: float | None = None
    ) -> defer.Deferred[Any]:
        """Apply a reload's settings here and in every worker."""
        self._removed_grace = removed_grace
        self.backend_timeout = backend_timeout
        if duplicate_wait is not None:
            self.duplicate_wait = duplicate_wait
        if self.local is not None:
            self.local.retune(removed_grace, backend_timeout, duplicate_wait)
        return self._tell(
            _Retune, removed_grace=removed_grace, backend_timeout=backend_timeout
        )

    def snapshot(self) -> dict[str, Any]:
        """This process's figures (see ``merged_snapshot`` for every worker's)."""
        assert self.local is not None
        return self.local.snapshot()

    def merged_snapshot(self) -> dict[str, Any]:
        """The figures of every worker, summed (each worker reports once a second)."""
        return merge_snapshots([self.snapshot(), *self.worker_stats.values()])

    def add_target(self, target: Target, interfaces: Sequence[str] = ()) -> defer.Deferred[Any]:
        """
        Serve ``target`` too, in every worker (see ``AoEService.add_target``).

        The workers serve it first; the parent then asks the segment and
        announces it, so that an initiator answering the announcement at
        once finds it in whichever process its frames go to.  The
        ``Deferred`` fires once every worker serves it.
        """
        assert self.local is not None
        self._check_interfaces(interfaces)
        self._share(target)
        self.targets.append(target)
        self.specs.append(target.spec)
        if interfaces:
            self.placement[(target.shelf, target.slot)] = tuple(interfaces)
        self._filter_sockets()
        local = self.local
        told = self._tell_target(_AddTarget, target)

        def serve(result: object) -> object:
            if not self._stopping and self.target(target.shelf, target.slot) is target:
                local.add_target(target, interfaces)
            return result

        return told.addCallback(serve)

    def remove_target(self, shelf: int, slot: int) -> defer.Deferred[Any] | None:
        """
        Stop serving the target at ``shelf``.``slot`` here and in every worker.

        ``None`` if none is served there; else a ``Deferred`` firing once
        every worker has stopped.
        """
        assert self.local is not None
        target = self.target(shelf, slot)
        if target is None:
            return None
        if self.local.target(shelf, slot) is not None:
            self.local.remove_target(shelf, slot)
        else:
            self.local._close_backend(target)
        index = self.targets.index(target)
        del self.targets[index], self.specs[index]
        self.placement.pop((shelf, slot), None)
        target.acl.released = True  # type: ignore[attr-defined]
        if self._removed_grace > 0:
            self._removed[(shelf, slot)] = time.time() + self._removed_grace
        told = self._tell(_RemoveTarget, shelf=shelf, slot=slot, grace=self._removed_grace)
        told.addCallback(lambda result: (self._filter_sockets(), result)[1])
        return told

    def replace_target(
        self, target: Target, interfaces: Sequence[str] = ()
    ) -> defer.Deferred[Any]:
        """Serve ``target`` in place of the one at its address, here and in every worker."""
        assert self.local is not None
        self._check_interfaces(interfaces)
        if IProcessShareableBackend.providedBy(target.backend):
            target.backend = target.backend.share()
        old = self.target(target.shelf, target.slot)
        if old is None:
            raise KeyError(f"e{target.shelf}.{target.slot} is not served")
        if self.local.target(target.shelf, target.slot) is not None:
            self.local.replace_target(target, interfaces)
        index = self.targets.index(old)
        self.targets[index] = target
        self.specs[index] = target.spec
        if interfaces:
            self.placement[(target.shelf, target.slot)] = tuple(interfaces)
        else:
            self.placement.pop((target.shelf, target.slot), None)
        return self._tell_target(_ReplaceTarget, target)

    def open_interfaces(self, interfaces: Sequence[str]) -> None:
        """Check each of ``interfaces`` is served already (``ValueError`` if not)."""
        self._check_interfaces(interfaces)

    def _check_interfaces(self, interfaces: Sequence[str]) -> None:
        """Refuse an interface not served yet: its sockets need privileges dropped already."""
        missing = [name for name in interfaces if name not in self.interfaces]
        if missing:
            raise ValueError(
                f"with --workers, a new interface ({', '.join(missing)}) needs a restart"
            )

    def _share(self, target: Target) -> None:
        """Give a new target a region of the shared state, and its disk to every process."""
        old = target.acl
        persist = old.replace_state if IStatePersister.providedBy(old) else None
        store = self.state.store(self.state.free_index(), persist)
        store.publish(old.config_string, old.mask_list, old.reserve_list)
        target.acl = store
        if IProcessShareableBackend.providedBy(target.backend):
            target.backend = target.backend.share()

    def _tell_target(self, command: type[amp.Command], target: Target) -> defer.Deferred[Any]:
        """Send every worker ``target``'s description, and its disk's descriptor if it has one."""
        description = self._describe_target(target, target.spec)
        arguments: dict[str, Any] = {"target": json.dumps(description)}
        if "fd" in description["backend"]:
            arguments["fd"] = description["backend"]["fd"]
        return self._tell(command, **arguments)

    def _tell(self, command: type[amp.Command], **arguments: Any) -> defer.Deferred[Any]:
        """
        Send ``command`` to every running worker; fire once all have answered.

        A worker that cannot apply it (its disk does not open there, say) is
        stopped, logged, and started again with the targets as they are: it
        never serves a stale set.
        """
        sent = []
        for index, process in list(self.processes.items()):
            channel = process.channel
            if channel is None or channel.transport is None:
                continue
            d = channel.callRemote(command, **arguments)
            d.addErrback(self._not_applied, index, process, command)
            sent.append(d)
        return defer.gatherResults(sent, consumeErrors=True)

    def _not_applied(
        self, failure: Failure, index: int, process: _WorkerProcess, command: type[amp.Command]
    ) -> None:
        """A worker failed to apply a change: start it again with the current targets."""
        _log.error(
            "aoe worker {index} could not apply {command} ({error}); restarting it",
            index=index,
            command=command.__name__.lstrip("_"),
            error=failure.getErrorMessage(),
        )
        if self.processes.get(index) is process:
            self._renewing.add(index)
            self._stop_worker(process)

    # -- a worker's end -----------------------------------------------------

    def _worker_ended(self, process: _WorkerProcess, reason: Failure) -> None:
        """Restart a worker that ended while we serve, later if it keeps dying young."""
        index = process.index
        if self.processes.get(index) is process:
            del self.processes[index]
        if self._stopping:
            return
        if index in self._renewing:
            # Stopped to take the targets as they are now: back at once, quietly.
            self._renewing.discard(index)
            self.worker_stats.pop(index, None)
            self._spawn(index)
            return
        lived = self.reactor.seconds() - self._started_at.get(index, 0.0)
        if lived >= _STABLE_AFTER:
            self._delays[index] = _RESTART_DELAY
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        how = f"killed by signal {signal}" if signal else f"exited with status {code}"
        self._restart_later(index, f"aoe worker {index} {how} after {lived:.1f} s")

    def _restart_later(self, index: int, why: str) -> None:
        """Log ``why`` and start worker ``index`` again after its delay, then double the delay."""
        delay = self._delays[index]
        _log.error("{why}; restarting it in {delay:.0f} s", why=why, delay=delay)
        self._delays[index] = min(_MAX_RESTART_DELAY, delay * 2)
        self.restarts += 1
        self._pending[index] = self.reactor.callLater(delay, self._spawn, index)

    # -- stopping -----------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        """Stop the workers and the local service; then close the sockets and shared memory."""
        self._stopping = True
        if self._refilter is not None and self._refilter.running:
            self._refilter.stop()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.stop()
        ended = [self._stop_worker(process) for process in list(self.processes.values())]
        d: defer.Deferred[Any] = defer.gatherResults(
            [*ended, defer.maybeDeferred(super().stopService)], consumeErrors=True
        )

        def closed(result: object) -> None:
            self._close_sockets()
            self.state.close()

        d.addBoth(closed)
        return d

    def _stop_worker(self, process: _WorkerProcess) -> defer.Deferred[None]:
        """Close the worker's standard input (it stops); kill it if it has not in time."""
        transport = process.transport
        if transport is None:
            return process.ended
        transport.closeStdin()
        kill = self.reactor.callLater(_STOP_TIMEOUT, _kill, transport)
        process.ended.addBoth(lambda result: kill.cancel() if kill.active() else None)
        return process.ended

    def _close_sockets(self) -> None:
        """Close the packet sockets the parent keeps for restarts."""
        for sockets in self.sockets.values():
            for sock in sockets:
                sock.close()
        self.sockets = {}


def _kill(transport: Any) -> None:
    """SIGKILL a worker that would not stop."""
    with contextlib.suppress(error.ProcessExitedAlready):
        transport.signalProcess("KILL")


# -- the worker process -------------------------------------------------------


class _ParentWatch(protocol.Protocol):
    """The worker's standard input: when the parent closes it (or dies), stop."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.reactor.running:
            self.reactor.stop()


def _open_backend(description: dict[str, Any]) -> Any:
    """
    Return a worker's backend: adopt the descriptor passed, or open the spec again.

    What ``_describe_backend`` said in the parent: a class and a descriptor
    go to the class's ``IDescriptorBackend.adopt``, anything else is a
    ``SCHEME:SPEC`` for ``open_backend``.
    """
    if "fd" in description:
        cls = namedAny(description["class"])
        return cls.adopt(description["fd"], description["handoff"])
    from aoe_twisted.backendspec import open_backend

    return open_backend(
        description["spec"], read_only=description["read_only"], direct=description["direct"]
    )


def _worker_target(
    spec: dict[str, Any], state: SharedState, config: dict[str, Any], number: int = 0
) -> Target:
    """Build one of the worker's targets from its description: backend, shared store, limits."""
    from aoe_twisted.statefile import FileACLStore, state_path

    index = spec.get("state_index", number)
    persist = None
    if config["state_dir"]:
        # Only to write: the state itself comes from shared memory, and the
        # file may be one the server wrote as root before dropping privileges.
        shelf, slot = spec["shelf"], spec["slot"]
        path = state_path(config["state_dir"], shelf, slot)
        persist = FileACLStore(path, shelf, slot).replace_state
    return Target(
        spec["shelf"],
        spec["slot"],
        _open_backend(spec["backend"]),
        acl=state.store(index, persist),
        buffer_count=spec["buffer_count"],
        max_sectors=spec.get("max_sectors", 0xFF),
        spec=spec.get("spec", ""),
        sync=spec.get("sync", False),
    )


def _worker_targets(config: dict[str, Any], state: SharedState) -> list[Target]:
    """Build the worker's targets from ``config``."""
    return [
        _worker_target(spec, state, config, number)
        for number, spec in enumerate(config["targets"])
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Run one worker: ``python -m aoe_twisted.workers CONFIG`` (JSON, from ``WorkersService``)."""
    from twisted.internet import reactor, stdio

    args = sys.argv if argv is None else list(argv)
    config = json.loads(args[1])
    # A reload is the main process's to do; `systemctl kill -s HUP` signals the
    # whole unit, and a worker killed by it would only be restarted.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stdout)], redirectStandardIO=False
    )
    state = SharedState.adopt(config["state_fd"], config.get("state_size", len(config["targets"])))
    try:
        targets = _worker_targets(config, state)
    except (BackendSpecError, OSError) as e:
        # One line in the parent's log (and a restart later), not a traceback.
        _log.critical("cannot open the targets: {error}", error=str(e))
        raise SystemExit(1) from None
    aoe = AoEService(
        list(config["sockets"]),
        targets,
        reactor=reactor,
        max_sectors=config["max_sectors"],
        sync=config["sync"],
        ring_frames=config.get("ring_frames"),
        socket_fds=config["sockets"],
        announce=False,
        removed_grace=config.get("removed_grace", 0.0),
        backend_timeout=config.get("backend_timeout", BACKEND_TIMEOUT),
        stale_after=config.get("stale_after", STALE_AFTER),
        placement={
            (t["shelf"], t["slot"]): tuple(t["interfaces"])
            for t in config["targets"]
            if t.get("interfaces")
        },
    )
    stdio.StandardIO(_ParentWatch(reactor), stdout=os.open(os.devnull, os.O_WRONLY))
    failed: list[BaseException] = []

    def start() -> None:
        try:
            aoe.startService()
        except Exception as e:
            _log.critical("cannot start: {error}", error=str(e))
            failed.append(e)
            reactor.stop()
            return
        for shelf, slot, until in config.get("removed", ()):
            aoe.answer_removed(shelf, slot, until - time.time())
        channel = config.get("channel_fd")
        if channel is not None:
            factory = protocol.Factory.forProtocol(lambda: _WorkerChannel(aoe, state, config))
            reactor.adoptStreamConnection(channel, socket.AF_UNIX, factory)
            os.close(channel)
        # Not a log line: tells the parent this worker serves.
        _log.info("", aoe_ready=True)

    def report() -> None:
        # The figures, to the parent (which sums the workers' for ctl stats and /metrics).
        _log.info("", aoe_stats=aoe.snapshot())

    reporter = task.LoopingCall(report)
    reactor.callWhenRunning(start)
    reactor.callWhenRunning(reporter.start, _REPORT_INTERVAL, now=False)
    reactor.addSystemEventTrigger("before", "shutdown", aoe.stopService)
    reactor.run()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
