# -*- test-case-name: tests.test_dispatch -*-
"""
One interface's frames in, to the targets behind it, and decisions out.

``Dispatcher.frame_received`` is the whole sans-IO core for one Ethernet
interface: it decodes the frame, lets every target answer and returns a
``Decision``: the reply frames to send, the disk operations still to carry
out (each completes, through ``Dispatcher.complete``, into one more
decision), the target a reply acknowledges a write to, and why a frame was
dropped as malformed.  The Twisted layer acts on decisions; it never looks
inside a frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter
from typing import Any

from attrs import define, field, setters

from aoe_twisted.core.ata import aborted
from aoe_twisted.core.decision import NOTHING, Decision
from aoe_twisted.core.fastpath import FastPending, fast_pending, fast_reply, fast_reply_into
from aoe_twisted.core.operations import IOKind, perform
from aoe_twisted.core.target import Pending, StoreFailure, Target
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ETHERTYPE,
    VERSION,
    ATAArg,
    Command,
    EthernetFrame,
    FrameTooShort,
    Header,
    ProtocolError,
    WireError,
    format_mac,
    join_frame,
    split_frame,
)

__all__ = ["Dispatcher", "FrameCounters"]


@define(slots=True)
class FrameCounters:
    """
    Frames counted by fate, as plain ints (an increment is one attribute store).

    ``received`` (every frame), ``not_aoe``, ``malformed``, ``response``
    (other targets' replies, never answered), ``unaddressed`` (for no target
    here), ``silent`` (addressed, but masked or a config test that did not
    match), ``answered`` (frames that got a reply), ``replies`` (reply
    frames produced), ``unencodable`` (replies that could not be encoded, a
    bug), ``faults`` (failures of a target's ACL store).  ``fast`` counts the
    frames the fast path answered, which are also in ``received``,
    ``answered`` and ``replies``, and the plain requests to asynchronous
    disks it accepted (``fastpath.fast_pending``), also in ``received`` and
    ``answered`` (and in ``replies`` once answered).  ``counters["received"]`` reads one by name.
    """

    received: int = 0
    not_aoe: int = 0
    malformed: int = 0
    response: int = 0
    unaddressed: int = 0
    silent: int = 0
    answered: int = 0
    replies: int = 0
    unencodable: int = 0
    faults: int = 0
    fast: int = 0

    def __getitem__(self, name: str) -> int:
        """Return the counter ``name``; ``KeyError`` for a name that is not one."""
        if name not in _COUNTER_NAMES:
            raise KeyError(name)
        value: int = getattr(self, name)
        return value

    def as_dict(self) -> dict[str, int]:
        """Return every counter by name."""
        return {name: getattr(self, name) for name in _COUNTER_NAMES}


_COUNTER_NAMES = tuple(f.name for f in FrameCounters.__attrs_attrs__)  # type: ignore[attr-defined]


def _check_mac(instance: object, attribute: object, value: object) -> None:
    """Accept a 6-byte unicast MAC: replies are sent from it."""
    if not isinstance(value, bytes) or len(value) != 6:
        raise ValueError(f"mac must be 6 bytes, not {value!r}")
    if value[0] & 1:
        raise ValueError(f"mac must be a unicast address, not {format_mac(value)}")


def _check_targets(instance: object, attribute: object, value: list[Target]) -> None:
    """Refuse two targets at the same shelf.slot: an initiator could not tell them apart."""
    seen: set[tuple[int, int]] = set()
    for target in value:
        address = (target.shelf, target.slot)
        if address in seen:
            raise ValueError(f"two targets at e{target.shelf}.{target.slot}")
        seen.add(address)


# Validators run at construction only: no __setattr__ hook, so per-frame
# attribute stores cost an attribute store and not a call through attrs.
@define(on_setattr=setters.NO_OP)
class Dispatcher:
    """
    The targets exported on one interface whose MAC address is ``mac``.

    ``counters`` (a ``FrameCounters``) counts frames by fate.

    With ``fast_path`` (the default) plain ATA reads and writes are answered
    by ``aoe_twisted.core.fastpath`` straight from the frame's bytes, with the
    same reply bytes and counters as the general path; on an asynchronous
    disk (``async_index``) they are accepted the same way and their
    operations started (``fastpath.fast_pending``).  With ``hold_writes``
    (``--sync``: writes are acknowledged only once durable) every decision
    acknowledging a write carries its ``refusal``, and
    ``frame_received_into`` leaves writes to ``frame_received`` (a reply
    that waits cannot be written into a slot that is sent at once).
    """

    mac: bytes = field(validator=_check_mac)
    targets: list[Target] = field(factory=list, validator=_check_targets)
    counters: FrameCounters = field(factory=FrameCounters)
    fast_path: bool = True
    hold_writes: bool = False
    pass_responses: bool = False
    index: dict[tuple[int, int], Target] = field(init=False)
    fast_index: dict[tuple[int, int], Target] = field(init=False)
    async_index: dict[tuple[int, int], Target] = field(init=False)
    removed: dict[tuple[int, int], Target] = field(init=False, factory=dict)
    generation: int = field(init=False, default=0)
    """Bumped by every change of the targets served (``add``, ``remove``, ``replace``)."""

    def __attrs_post_init__(self) -> None:
        """Index the targets by address: finding one costs one lookup, however many there are."""
        self.index = {(target.shelf, target.slot): target for target in self.targets}
        # The fast path answers synchronous disks at once (fast_index) and starts
        # an asynchronous one's operations (async_index).
        self.fast_index = {k: t for k, t in self.index.items() if not t.asynchronous}
        self.async_index = {k: t for k, t in self.index.items() if t.asynchronous}

    # -- the targets, changed while serving ----------------------------------

    def add(self, target: Target) -> None:
        """
        Serve ``target`` from the next frame on.

        ``ValueError`` if another target already has its address.  A
        removed target's address that is served again stops being answered
        as removed.
        """
        key = (target.shelf, target.slot)
        if key in self.index:
            raise ValueError(f"two targets at e{target.shelf}.{target.slot}")
        self.removed.pop(key, None)
        self.generation += 1
        self.targets.append(target)
        self.index[key] = target
        if target.asynchronous:
            self.async_index[key] = target
        else:
            self.fast_index[key] = target

    def remove(self, shelf: int, slot: int, answer_removed: bool = False) -> Target | None:
        """
        Stop serving the target at ``shelf``.``slot``; return it (``None`` if none is served).

        With ``answer_removed``, ATA requests for the address are answered
        from then on with ``ERR|DRDY``/``ABRT`` (until ``forget_removed``)
        rather than not at all: an initiator whose disk went away gets an
        I/O error at once, instead of retrying for minutes (the Linux
        initiator retries an unanswered request until ``aoe_deadsecs``).
        Config queries get no answer, so the address is not discovered again.
        """
        target = self.index.pop((shelf, slot), None)
        if target is None:
            return None
        self.fast_index.pop((shelf, slot), None)
        self.async_index.pop((shelf, slot), None)
        self.generation += 1
        self.targets.remove(target)
        if answer_removed:
            self.removed[(shelf, slot)] = target
        return target

    def replace(self, target: Target) -> Target:
        """Serve ``target`` in place of the one at its address (which is returned) from now on."""
        key = (target.shelf, target.slot)
        old = self.index[key]
        self.generation += 1
        self.targets[self.targets.index(old)] = target
        self.index[key] = target
        if target.asynchronous:
            self.fast_index.pop(key, None)
            self.async_index[key] = target
        else:
            self.async_index.pop(key, None)
            self.fast_index[key] = target
        return old

    def forget_removed(self, shelf: int, slot: int) -> None:
        """Stop answering for a removed target's address: it is silent from now on."""
        self.removed.pop((shelf, slot), None)

    def frame_received(self, frame: bytes | memoryview) -> Decision:
        """
        Decide about one received Ethernet frame.

        ``frame`` may be a ``memoryview`` (of a receive ring slot) that is
        reused once this returns: the fast path reads it in place, and
        anything else is copied before the general path decodes it.
        """
        if self.fast_path and self.fast_index:
            decision = fast_reply(frame, self.mac, self.fast_index, self.hold_writes)
            if decision is not None:
                counters = self.counters
                counters.received += 1
                counters.answered += 1
                counters.replies += 1
                counters.fast += 1
                return decision
        return self.general(frame)

    def frame_received_into(self, frame: bytes | memoryview, reply: memoryview) -> int:
        """
        Answer ``frame`` into ``reply`` by the fast path; return the reply's length, or 0.

        The zero-copy entry (``fastpath.fast_reply_into``), counted as
        ``frame_received`` counts when it answers.  0 means nothing was done
        or counted: the caller then hands the frame to ``general`` (not to
        ``frame_received``, which would try the fast path again).  Nothing
        refers to ``frame`` or ``reply`` afterwards.
        """
        if not self.fast_path or not self.fast_index:
            # (No synchronous disk: nothing to answer in place, and an
            # asynchronous disk's request is not unpacked twice.)
            return 0
        length = fast_reply_into(frame, reply, self.mac, self.fast_index, not self.hold_writes)
        if length:
            counters = self.counters
            counters.received += 1
            counters.answered += 1
            counters.replies += 1
            counters.fast += 1
        return length

    def general(self, frame: bytes | memoryview) -> Decision:
        """
        Decide about ``frame``, a frame the fast path did not answer at once.

        A plain read or write to an asynchronous disk is accepted by the
        fast path's ``fast_pending`` (when ``fast_path`` is on), its one
        operation left to carry out; everything else goes to the general
        path: the codec and the targets.
        """
        counters = self.counters
        if self.async_index and self.fast_path:
            accepted = fast_pending(frame, self.mac, self.async_index)
            if accepted is not None:
                counters.received += 1
                counters.answered += 1
                counters.fast += 1
                return Decision(pending=(accepted,))
        counters.received += 1
        if not isinstance(frame, bytes):
            # What the targets keep (a write's data) must outlive a ring slot.
            frame = bytes(frame)
        try:
            _dst, src, ethertype, payload = split_frame(frame)
        except FrameTooShort as e:
            return self._malformed(str(e))
        if ethertype != ETHERTYPE:
            counters.not_aoe += 1
            return NOTHING
        if src[0] & 1:
            return self._malformed(f"multicast source address {format_mac(src)}")
        try:
            header = Header.from_bytes(payload)
        except ProtocolError as e:
            headers = [reply for target in self.targets for reply in target.reject(src, e)]
            decision = self._decision(src, headers, [])
            counters.malformed += 1
            decision.malformed = f"from {format_mac(src)}: {e}"
            return decision
        except WireError as e:
            return self._malformed(f"from {format_mac(src)}: {e}")
        if header.flag_response:
            counters.response += 1
            if self.pass_responses:
                return Decision(heard=frame)
            return NOTHING
        headers: list[Header] = []
        pending: list[Pending] = []
        faults: list[str] = []
        major = header.major
        minor = header.minor
        if major == BROADCAST_MAJOR or minor == BROADCAST_MINOR:
            candidates: Sequence[Target] = [t for t in self.targets if t.addresses(major, minor)]
        else:
            target = self.index.get((major, minor))
            if target is None:
                if self.removed and (major, minor) in self.removed:
                    return self._gone(src, header)
                candidates = ()
            else:
                candidates = (target,)
        for target in candidates:
            for answer in target.decide(src, header):
                if isinstance(answer, Header):
                    headers.append(answer)
                elif isinstance(answer, Pending):
                    pending.append(answer)
                else:
                    headers.append(answer.reply)
                    faults.append(_describe(answer))
        if not headers and not pending:
            if candidates:
                counters.silent += 1
            else:
                counters.unaddressed += 1
            return NOTHING
        decision = self._decision(src, headers, pending)
        if faults:
            counters.faults += len(faults)
            decision.fault = "; ".join(faults)
        return decision

    def complete(
        self,
        pending: Pending | FastPending,
        result: bytes | None,
        error: OSError | None = None,
        elapsed: float = 0.0,
    ) -> Decision:
        """
        Decide the reply to ``pending`` once its disk operation gave ``result`` (or ``error``).

        May be called at any time after the frame's decision, in any order
        with other operations: nothing in the dispatcher waits for it.  A
        successful write's decision names its target in ``written`` and,
        with ``hold_writes``, carries its ``refusal``.  ``elapsed`` is the
        operation's service time in seconds, for the target's ``stats``.
        """
        if type(pending) is FastPending:
            decision = Decision((pending.finish(result, error, elapsed, self.mac),))
            self.counters.replies += 1
            if error is None and pending.writes:
                decision.written = pending.target
                if self.hold_writes or pending.target.sync:
                    decision.refusal = pending.refusal(self.mac)
            return decision
        frames = self._frames(pending.initiator, [pending.finish(result, error, elapsed)])
        if not frames:
            return NOTHING
        decision = Decision(tuple(frames))
        if error is None and pending.io.kind is IOKind.WRITE:
            decision.written = pending.target
            if self.hold_writes or pending.target.sync:
                decision.refusal = self.refusal(pending)
        return decision

    def serve(self, frame: bytes | memoryview) -> list[bytes]:
        """
        Decide about ``frame``, carry out its disk operations at once, return every reply.

        ``settle(frame_received(frame))``: the whole answer, synchronously
        and without group commit, for synchronous callers such as the fuzz
        harness, the benchmarks and the tests.  The server acts on decisions
        itself.
        """
        return self.settle(self.frame_received(frame))

    def settle(self, decision: Decision) -> list[bytes]:
        """Carry out ``decision``'s disk operations now (``perform``); return its replies."""
        replies = list(decision.replies)
        for pending in decision.pending:
            if pending.target.asynchronous:
                raise TypeError(
                    f"{pending.target.name}: an asynchronous disk's operations complete "
                    "later; settle() serves synchronous disks only"
                )
            started = perf_counter()
            try:
                result = perform(pending.io, pending.target.backend)
            except OSError as e:
                elapsed = perf_counter() - started
                replies.extend(self.complete(pending, None, e, elapsed).replies)
            else:
                elapsed = perf_counter() - started
                replies.extend(self.complete(pending, result, elapsed=elapsed).replies)
        return replies

    def refusal(self, pending: Pending | FastPending) -> bytes:
        """Return the ``ERR|DRDY``/``ABRT`` reply refusing ``pending``'s write (frame)."""
        if type(pending) is FastPending:
            return pending.refusal(self.mac)
        refused = pending.reply(None, OSError("not durable"))
        frames = self._frames(pending.initiator, [refused], count=False)
        return frames[0] if frames else b""

    def announcements(self, targets: Sequence[Target] | None = None) -> list[bytes]:
        """
        Return every target's start-up announcement frame (or ``targets``' only).

        Each goes to the broadcast address or, while the target's mask list is
        not empty, to each MAC on that list (as vblade does).
        """
        frames = []
        for target in self.targets if targets is None else targets:
            payload = target.announcement().to_bytes()
            for dst in target.acl.mask_list or (BROADCAST_MAC,):
                frames.append(EthernetFrame(dst, self.mac, ETHERTYPE, payload).to_bytes(pad=True))
        return frames

    def _gone(self, src: bytes, request: Header) -> Decision:
        """Answer an ATA request for a removed target ``ERR|DRDY``/``ABRT``; nothing else."""
        arg = request.arg
        if request.command != Command.ISSUE_ATA_COMMAND or not isinstance(arg, ATAArg):
            self.counters.silent += 1
            return NOTHING
        reply = Header(
            VERSION, True, False, 0, request.major, request.minor, request.command, request.tag,
            aborted(arg),
        )
        return self._decision(src, [reply], [])

    def _decision(self, dst: bytes, headers: list[Header], pending: list[Pending]) -> Decision:
        """Return the decision sending ``headers`` to ``dst`` once encoded, after ``pending``."""
        frames = self._frames(dst, headers) if headers else []
        if frames or pending:
            # Answered now, or once its operations complete: counted once either way.
            self.counters.answered += 1
        return Decision(tuple(frames), pending=tuple(pending))

    def _frames(self, dst: bytes, headers: list[Header], count: bool = True) -> list[bytes]:
        """Encode reply ``headers`` into padded frames from us to ``dst``, counting ``replies``."""
        counters = self.counters
        frames = []
        mac = self.mac
        for header in headers:
            try:
                frames.append(join_frame(dst, mac, ETHERTYPE, header.to_bytes(), True))
            except WireError:
                counters.unencodable += 1
        if count:
            counters.replies += len(frames)
        return frames

    def _malformed(self, reason: str) -> Decision:
        """Count a frame that is not a valid AoE request and say why."""
        self.counters.malformed += 1
        return Decision(malformed=reason)


def _describe(failure: StoreFailure) -> str:
    """Say, in one line, which target's store failed and why."""
    target: Any = failure.target
    error = failure.error
    return (
        f"e{target.shelf}.{target.slot}: cannot store its config/mask/reserve state "
        f"({error.strerror or error}); answered DEVICE_UNAVAILABLE"
    )
