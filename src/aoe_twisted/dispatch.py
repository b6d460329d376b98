# -*- test-case-name: tests.test_dispatch -*-
"""
One interface's frames in, to the targets behind it, and their reply frames out.

``Dispatcher.frame_received`` is the whole sans-IO core for one Ethernet
interface: it decodes the frame, lets every target answer and encodes the
replies, counting what happened so the Twisted layer can report it.
"""

from __future__ import annotations

from collections import Counter

from attrs import define, field, setters

from aoe_twisted.fastpath import fast_reply, fast_reply_into
from aoe_twisted.target import Target
from aoe_twisted.wire import (
    BROADCAST_MAC,
    ETHERTYPE,
    EthernetFrame,
    FrameTooShort,
    Header,
    ProtocolError,
    WireError,
    format_mac,
)

__all__ = ["Dispatcher"]


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


# Validators run at construction only: no __setattr__ hook, so the per-frame
# ``fast += 1`` costs an attribute store and not a call through attrs.
@define(on_setattr=setters.NO_OP)
class Dispatcher:
    """
    The targets exported on one interface whose MAC address is ``mac``.

    ``counters`` counts frames by fate: ``received`` (every frame),
    ``not_aoe``, ``malformed`` (``last_malformed`` says why, for a rate-limited
    log line), ``response`` (other targets' replies, never answered),
    ``unaddressed`` (for no target here), ``silent`` (addressed, but masked or
    a config test that did not match), ``answered`` (frames that got a reply),
    ``replies`` (reply frames produced) and ``unencodable`` (replies that
    could not be encoded, a bug).

    With ``fast_path`` (the default) plain ATA reads and writes are answered
    by ``aoe_twisted.fastpath.fast_reply`` straight from the frame's bytes,
    with the same reply bytes and counters as the general path; ``fast``
    counts them (outside ``counters``, which stays the same either way).
    """

    mac: bytes = field(validator=_check_mac)
    targets: list[Target] = field(factory=list, validator=_check_targets)
    counters: Counter[str] = field(factory=Counter)
    last_malformed: str = ""
    fast_path: bool = True
    fast: int = 0

    def frame_received(self, frame: bytes) -> list[bytes]:
        """Return the reply frames (each padded to 60 bytes) to one received Ethernet frame."""
        counters = self.counters
        counters["received"] += 1
        if self.fast_path:
            reply = fast_reply(frame, self.mac, self.targets)
            if reply is not None:
                self.fast += 1
                counters["answered"] += 1
                counters["replies"] += 1
                return [reply]
        try:
            ethernet = EthernetFrame.from_bytes(frame)
        except FrameTooShort as e:
            self._malformed(str(e))
            return []
        if ethernet.ethertype != ETHERTYPE:
            counters["not_aoe"] += 1
            return []
        src = ethernet.src
        if src[0] & 1:
            self._malformed(f"multicast source address {format_mac(src)}")
            return []
        try:
            header = Header.from_bytes(ethernet.payload)
        except ProtocolError as e:
            self._malformed(f"from {format_mac(src)}: {e}")
            headers = [reply for target in self.targets for reply in target.reject(src, e)]
            return self._frames(src, headers)
        except WireError as e:
            self._malformed(f"from {format_mac(src)}: {e}")
            return []
        if header.flag_response:
            counters["response"] += 1
            return []
        headers = []
        for target in self.targets:
            headers.extend(target.handle(src, header))
        if not headers:
            major = header.major
            minor = header.minor
            if any(target.addresses(major, minor) for target in self.targets):
                counters["silent"] += 1
            else:
                counters["unaddressed"] += 1
            return []
        return self._frames(src, headers)

    def frame_received_into(self, frame: bytes | memoryview, reply: memoryview) -> int:
        """
        Answer ``frame`` into ``reply`` by the fast path; return the reply's length, or 0.

        The zero-copy entry (``fastpath.fast_reply_into``): with the same
        counters as ``frame_received`` when it answers, and nothing counted or
        done when it returns 0, so the caller then hands the frame (as
        ``bytes``) to ``frame_received``.  Nothing refers to ``frame`` or
        ``reply`` afterwards.
        """
        if not self.fast_path:
            return 0
        length = fast_reply_into(frame, reply, self.mac, self.targets)
        if length:
            counters = self.counters
            counters["received"] += 1
            counters["answered"] += 1
            counters["replies"] += 1
            self.fast += 1
        return length

    def announcements(self) -> list[bytes]:
        """
        Return every target's start-up announcement frame.

        Each goes to the broadcast address or, while the target's mask list is
        not empty, to each MAC on that list (as vblade does).
        """
        frames = []
        for target in self.targets:
            payload = target.announcement().to_bytes()
            for dst in target.acl.mask_list or (BROADCAST_MAC,):
                frames.append(EthernetFrame(dst, self.mac, ETHERTYPE, payload).to_bytes(pad=True))
        return frames

    def _frames(self, dst: bytes, headers: list[Header]) -> list[bytes]:
        """Encode reply ``headers`` into padded frames from us to ``dst``, counting them."""
        counters = self.counters
        frames = []
        for header in headers:
            try:
                payload = header.to_bytes()
            except WireError:
                counters["unencodable"] += 1
                continue
            frames.append(EthernetFrame(dst, self.mac, ETHERTYPE, payload).to_bytes(pad=True))
        if frames:
            counters["answered"] += 1
            counters["replies"] += len(frames)
        return frames

    def _malformed(self, reason: str) -> None:
        """Count a frame that is not a valid AoE request and remember why."""
        self.counters["malformed"] += 1
        self.last_malformed = reason
