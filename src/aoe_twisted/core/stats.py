# -*- test-case-name: tests.test_stats -*-
"""
What each target did, counted where it happens: requests, bytes, errors, service time, initiators.

A ``TargetStats`` belongs to one target and is shared by every interface's
copy of it (``Target.for_interface``), so the figures are the disk's, not an
interface's.  Counting is plain attribute increments on a slots object: the
fast path counts a read in a few stores, and ``tests.test_fastpath`` checks
that it counts exactly as the general path does.

Nothing here reads a clock on its own: the callers time the backend calls
they make (``time.perf_counter``) and pass the elapsed seconds, and the
Twisted layer calls ``sweep`` once a second with the wall clock, which is how
an initiator's "last seen" is known without a clock read per frame: an
initiator whose frame count moved since the last sweep was seen at that
sweep (accurate to the sweep interval).

With the compiled data lane (``aoe_twisted.lane``) a target's stats also
hold a ``tally``: the counters the lane adds to in C, and the initiators
and tags it has seen, which the Python paths count through as well (so a
retransmission is recognised whichever path saw the first copy).
``absorb`` adds what the lane counted to the attributes here; ``sweep``
(and so ``snapshot``) absorbs first, so every figure read through them
counts both paths.

``snapshot`` returns the figures in the one format the control socket,
``aoe-twisted ctl`` and the Prometheus endpoint read (documented in
docs/operations.md), and ``merge_snapshots`` sums the snapshots of several
``--workers`` processes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping
from typing import Any

from aoe_twisted import lane as _lane

__all__ = [
    "AOE_ERROR_NAMES",
    "INTERFACE_FIGURES",
    "REQUEST_KINDS",
    "SERVICE_BUCKETS",
    "Peer",
    "TargetStats",
    "failure_cause",
    "merge_snapshots",
]

#: The frames an interface's entry in a snapshot counts (``AoEService.snapshot``):
#: received, replies sent, ignored (not AoE, others' replies, not for a target
#: here, or stale), dropped by the kernel (the receive ring was full), malformed,
#: and stale (waited too long in the receive ring: ``AoEPort.stale_after``; also
#: in ignored).
INTERFACE_FIGURES = ("received", "sent", "ignored", "dropped", "malformed", "stale")

SERVICE_BUCKETS = tuple((1 << k) / 1_000_000 for k in range(21))
"""
Upper bounds (seconds) of the service-time histogram's buckets: 1 µs, 2 µs, 4 µs ... 1.05 s.

Powers of two, so that finding a time's bucket is ``int.bit_length`` of
its microseconds rather than a search; a last bucket is ``+Inf``.
"""
_LAST_BUCKET = len(SERVICE_BUCKETS)

REQUEST_KINDS = (
    "read", "write", "identify", "flush", "other_ata", "config", "mask", "reserve",
)
"""The kinds of request counted per target (``aoe_target_requests_total{kind}``)."""

AOE_ERROR_NAMES = {
    1: "aoe_bad_command",
    2: "aoe_bad_argument",
    3: "aoe_device_unavailable",
    4: "aoe_config_string_present",
    5: "aoe_unsupported_version",
    6: "aoe_target_reserved",
}
"""The ``errors`` key counting each AoE error code a target answered (AoEr11 2.4)."""

RECENT_TAGS = 1024
"""
How many of an initiator's latest tags a target remembers, at least, to recognise retransmissions.

Two generations of a set: a tag is looked for in both, added to the newer,
and when the newer holds ``RECENT_TAGS`` it becomes the older.  Far more
than a window (64 for the Linux initiator), and cheaper per frame than an
exact ring.
"""

def failure_cause(error: BaseException | None) -> str:
    """
    Name a backend failure's cause for the counters and the log: ``ENOSPC``, ``EIO``...

    An ``OSError`` without an errno is ``"os_error"``; ``None`` (a read
    that returned fewer bytes than asked) is ``"short_read"``.
    """
    if error is None:
        return "short_read"
    number = getattr(error, "errno", None)
    if isinstance(number, int):
        return errno.errorcode.get(number, f"errno_{number}")
    return "os_error"


class Peer:
    """
    One initiator as one target sees it: frames, when last seen, its latest tags.

    ``tags`` and ``older`` hold at least its last ``RECENT_TAGS`` tags: a
    request whose tag is among them is counted as a retransmission.
    """

    __slots__ = ("frames", "last_seen", "older", "swept", "tags")

    def __init__(self, now: float = 0.0) -> None:
        self.frames = 0
        self.last_seen = now
        self.swept = 0
        self.tags: set[bytes] = set()
        self.older: set[bytes] = set()


class TargetStats:
    """
    One target's counters (see the module docstring); every attribute is a plain int.

    The request kinds are attributes named as in ``REQUEST_KINDS``;
    ``read_bytes``/``write_bytes``; ``ata_errors`` (replies with the ATA
    ``ERR`` status), ``aoe_errors`` (AoE error code -> replies),
    ``backend_errors`` (cause -> failures of the disk, see
    ``failure_cause``); ``in_flight`` (disk operations decided but not
    completed); ``retransmits``; ``buckets`` and ``seconds`` (the
    service-time histogram, per bucket of ``SERVICE_BUCKETS`` and ``+Inf``,
    not cumulative); ``peers`` (initiator MAC -> ``Peer``).
    """

    __slots__ = (
        "aoe_errors",
        "ata_errors",
        "backend_errors",
        "buckets",
        "config",
        "failures",
        "flush",
        "identify",
        "in_flight",
        "mask",
        "other_ata",
        "peers",
        "read",
        "read_bytes",
        "reserve",
        "retransmits",
        "seconds",
        "tally",
        "write",
        "write_bytes",
    )

    def __init__(self) -> None:
        self.read = self.write = self.identify = self.flush = self.other_ata = 0
        self.config = self.mask = self.reserve = 0
        self.read_bytes = self.write_bytes = 0
        self.ata_errors = 0
        self.aoe_errors: dict[int, int] = {}
        self.backend_errors: dict[str, int] = {}
        self.failures: dict[str, str] = {}
        self.in_flight = 0
        self.retransmits = 0
        self.buckets = [0] * (len(SERVICE_BUCKETS) + 1)
        self.seconds = 0.0
        self.peers: dict[bytes, Peer] = {}
        native = _lane.native
        #: The compiled lane's counters and initiators for this target (``None``: no lane).
        self.tally: Any = None if native is None else native.Tally()

    def seen(self, src: bytes, tag: bytes) -> None:
        """Count a request from ``src`` with ``tag``: a frame, and whether it was sent before."""
        tally = self.tally
        if tally is not None:
            # The lane's book of initiators and tags, shared with it.
            if tally.seen(src, tag):
                self.retransmits += 1
            return
        peer = self.peers.get(src)
        if peer is None:
            peer = self.peers[src] = Peer()
        peer.frames += 1
        tags = peer.tags
        if tag in tags or tag in peer.older:
            self.retransmits += 1
            return
        tags.add(tag)
        if len(tags) >= RECENT_TAGS:
            peer.older = tags
            peer.tags = set()

    def served(self, elapsed: float) -> None:
        """Count one request's service time, ``elapsed`` seconds, in the histogram."""
        bucket = int(elapsed * 1_000_000).bit_length()
        self.buckets[bucket if bucket < _LAST_BUCKET else _LAST_BUCKET] += 1
        self.seconds += elapsed

    def failed(self, operation: str, error: BaseException | None) -> None:
        """
        Count a failure of the disk during ``operation`` (``"read"``, ``"write"``, ``"flush"``).

        ``failures`` keeps the latest description of each cause, with the
        operating system's words (``"write: No space left on device"``),
        for the server's log: it logs the first of each cause and then
        counts, reading these from its once-a-second sweep rather than
        from the per-frame path.
        """
        cause = failure_cause(error)
        self.backend_errors[cause] = self.backend_errors.get(cause, 0) + 1
        if error is None:
            words = "fewer bytes than asked"
        else:
            words = getattr(error, "strerror", None) or str(error) or type(error).__name__
        self.failures[cause] = f"{operation}: {words}"

    def aoe_error(self, code: int) -> None:
        """Count one AoE error reply with ``code``."""
        self.aoe_errors[code] = self.aoe_errors.get(code, 0) + 1

    def absorb(self) -> None:
        """
        Add what the compiled lane counted since the last call to these counters.

        Its backend failures are noted as ``failed`` notes them (with the
        operating system's words for the errno); its initiators' frame
        counts replace the ``peers``' (the lane's book is the one both
        paths count in).  Nothing to do without the lane.
        """
        tally = self.tally
        if tally is None:
            return
        (read, write, read_bytes, write_bytes, ata_errors, retransmits, seconds, buckets,
         failures) = tally.take()
        self.read += read
        self.write += write
        self.read_bytes += read_bytes
        self.write_bytes += write_bytes
        self.ata_errors += ata_errors
        self.retransmits += retransmits
        self.seconds += seconds
        mine = self.buckets
        for index, count in enumerate(buckets):
            mine[index] += count
        for operation, number in failures:
            self.failed(operation, OSError(number, os.strerror(number)))
        peers = self.peers
        for mac, frames in tally.peers():
            peer = peers.get(mac)
            if peer is None:
                peer = peers[mac] = Peer()
            peer.frames = frames

    def sweep(self, now: float) -> None:
        """Note ``now`` as the last-seen time of each initiator that sent frames since the last."""
        self.absorb()
        for peer in self.peers.values():
            if peer.frames != peer.swept:
                peer.swept = peer.frames
                peer.last_seen = now

    def requests(self) -> dict[str, int]:
        """Return the requests by kind."""
        return {kind: getattr(self, kind) for kind in REQUEST_KINDS}

    def errors(self) -> dict[str, int]:
        """Return the errors by kind: ``ata``, then the nonzero ``aoe_*`` and ``backend_*``."""
        errors = {"ata": self.ata_errors}
        for code, count in sorted(self.aoe_errors.items()):
            errors[AOE_ERROR_NAMES.get(code, f"aoe_{code}")] = count
        for cause, count in sorted(self.backend_errors.items()):
            errors[f"backend_{cause}"] = count
        return errors

    def histogram(self) -> dict[str, Any]:
        """Return the service-time histogram, cumulative as Prometheus has it."""
        total = 0
        buckets: list[list[Any]] = []
        for bound, count in zip((*SERVICE_BUCKETS, "+Inf"), self.buckets, strict=True):
            total += count
            buckets.append([bound, total])
        return {"buckets": buckets, "sum": self.seconds, "count": total}

    def snapshot(self, name: str, backend: str, now: float) -> dict[str, Any]:
        """Return this target's figures in the snapshot format (after a ``sweep`` at ``now``)."""
        self.sweep(now)
        return {
            "target": name,
            "backend": backend,
            "requests": self.requests(),
            "bytes": {"read": self.read_bytes, "write": self.write_bytes},
            "errors": self.errors(),
            "in_flight": self.in_flight,
            "retransmits": self.retransmits,
            "service_seconds": self.histogram(),
            "initiators": [
                {"mac": _mac(mac), "frames": peer.frames, "last_seen": peer.last_seen}
                for mac, peer in sorted(self.peers.items())
            ],
        }


def _mac(mac: bytes) -> str:
    """Format a MAC address as the snapshot does."""
    return ":".join(f"{b:02x}" for b in mac)


def initiators_of(targets: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the per-initiator view of the targets' snapshots: targets used, frames, last seen."""
    seen: dict[str, dict[str, Any]] = {}
    for target in targets:
        for peer in target["initiators"]:
            entry = seen.setdefault(
                peer["mac"], {"mac": peer["mac"], "targets": [], "frames": 0, "last_seen": 0.0}
            )
            entry["targets"].append(target["target"])
            entry["frames"] += peer["frames"]
            entry["last_seen"] = max(entry["last_seen"], peer["last_seen"])
    return [seen[mac] for mac in sorted(seen)]


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """
    Sum several processes' snapshots (``--workers``) into one.

    Counters, histograms and in-flight figures add up; an initiator's frames
    add up and its last-seen time is the latest; an interface's MAC and MTU
    are the first snapshot's.  The result's ``time`` is the latest.
    """
    snapshots = list(snapshots)
    targets: dict[str, dict[str, Any]] = {}
    interfaces: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for target in snap.get("targets", ()):
            mine = targets.get(target["target"])
            if mine is None:
                targets[target["target"]] = _copy(target)
                continue
            _add_target(mine, target)
        for interface in snap.get("interfaces", ()):
            mine = interfaces.get(interface["interface"])
            if mine is None:
                interfaces[interface["interface"]] = dict(interface)
                continue
            for key, value in interface.items():
                if key not in ("interface", "mac", "mtu") and isinstance(value, int):
                    mine[key] = mine.get(key, 0) + value
    merged_targets = list(targets.values())
    return {
        "time": max((s.get("time", 0.0) for s in snapshots), default=0.0),
        "targets": merged_targets,
        "interfaces": list(interfaces.values()),
        "initiators": initiators_of(merged_targets),
    }


def _copy(target: Mapping[str, Any]) -> dict[str, Any]:
    """Copy a target's snapshot deeply enough to add others into it."""
    histogram = target["service_seconds"]
    return {
        **target,
        "requests": dict(target["requests"]),
        "bytes": dict(target["bytes"]),
        "errors": dict(target["errors"]),
        "service_seconds": {
            "buckets": [list(b) for b in histogram["buckets"]],
            "sum": histogram["sum"],
            "count": histogram["count"],
        },
        "initiators": [dict(p) for p in target["initiators"]],
    }


def _add_target(mine: dict[str, Any], other: Mapping[str, Any]) -> None:
    """Add ``other``'s figures (the same target in another process) into ``mine``."""
    for group in ("requests", "bytes", "errors"):
        for key, value in other[group].items():
            mine[group][key] = mine[group].get(key, 0) + value
    mine["in_flight"] += other["in_flight"]
    mine["retransmits"] += other["retransmits"]
    histogram = mine["service_seconds"]
    for bucket, (_bound, count) in zip(
        histogram["buckets"], other["service_seconds"]["buckets"], strict=True
    ):
        bucket[1] += count
    histogram["sum"] += other["service_seconds"]["sum"]
    histogram["count"] += other["service_seconds"]["count"]
    peers = {p["mac"]: p for p in mine["initiators"]}
    for peer in other["initiators"]:
        known = peers.get(peer["mac"])
        if known is None:
            peers[peer["mac"]] = dict(peer)
        else:
            known["frames"] += peer["frames"]
            known["last_seen"] = max(known["last_seen"], peer["last_seen"])
    mine["initiators"] = [peers[mac] for mac in sorted(peers)]
