# -*- test-case-name: tests.test_duplicates -*-
"""
Duplicate addresses on a segment: another server answering for a shelf.slot we serve.

Two servers exporting the same shelf.slot on one Ethernet segment are not an
error AoE itself can see: an initiator takes both for paths to one disk and
its reads alternate between two different disks.  ``DuplicateWatch`` finds
them before (and while) an address is served:

1. ``watch(address, page, now)`` gives the probe: a broadcast Query Config
   Information (config read) for that shelf.slot, from our MAC.
2. Every AoE response the interface hears goes to ``frame_received``.  A
   response for a watched address from a MAC that is not ours (a reply to
   our probe, an announcement, a reply to another host's request) shows
   another server there: the first time per (address, MAC) it is asked for
   IDENTIFY DEVICE, unicast, with a tag of ours.
3. Its IDENTIFY page is compared with ours (``identify.same_disk``): the
   same disk (same serial and world-wide name) is a ``SecondPath`` (two
   gateways of one shared disk, AoE multipath); anything else is a
   ``Duplicate``: a different disk, a disk without a world-wide name (whose
   sameness cannot be shown), an error reply, or no reply within
   ``identify_timeout`` (``expire``).
4. ``settled(address, now)`` says when the caller may start serving: once
   ``wait`` seconds have passed since ``watch`` and no IDENTIFY is
   outstanding.  A ``Duplicate`` (then or later: the other server may come
   up after us and announce) means: do not serve that address.

Each (address, MAC) is judged once: a MAC judged a second path is not asked
again, so a server that later swaps its disk behind the same MAC and address
is not noticed until the address is watched anew (``forget`` then
``watch``).  ``retransmit`` repeats the probe and unanswered IDENTIFY
requests, so one lost frame neither hides a duplicate nor turns a second
path into one.

Pure and deterministic: no I/O, no clock; the caller passes ``now`` (any
monotonic seconds) and sends the frames returned.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from attrs import define, field, frozen

from aoe_twisted.core.identify import IDENTIFY_SIZE, page_identity, same_disk
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ETHERNET_HEADER_SIZE,
    ETHERTYPE,
    VERSION,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    EthernetFrame,
    Header,
    WireError,
    format_mac,
)

__all__ = ["MAX_ASKING", "MAX_JUDGED", "Duplicate", "DuplicateWatch", "SecondPath", "Verdict"]

Address = tuple[int, int]

#: The fields of a frame's first 19 bytes that decide whether it matters:
#: Ethernet source and type, AoE version-and-flags, major and minor.
_PREFIX = struct.Struct("!6x6sHBxHB")
_FLAG_RESPONSE = 0x08
_ATA = int(Command.ISSUE_ATA_COMMAND)
_CONFIG = int(Command.QUERY_CONFIG_INFORMATION)
_ERR = int(ATACmdStatus.ERR_STATUS)
#: IDENTIFY carries 0xA0 in LBA byte 3 (the device register), as the Linux driver sends it.
_IDENTIFY_LBA = 0xA0 << 24
#: Tags are ``tag_base`` plus a 24-bit counter.
_COUNTER_MASK = 0xFFFFFF
#: At most this many IDENTIFY requests outstanding per address: a host spoofing
#: responses from many MACs cannot make us send without bound.
MAX_ASKING = 16
#: At most this many MACs judged per address; later ones are not asked.
MAX_JUDGED = 256
#: A serial shown in a reason is cut to this many characters.
_SERIAL_SHOWN = 20


def _name(address: Address) -> str:
    """Return ``address`` as an AoE target name, ``e1.0``."""
    return f"e{address[0]}.{address[1]}"


@frozen
class Duplicate:
    """
    Another server (``theirs``) answers for ``address``, which we serve from ``ours``.

    ``reason`` says why it is not a second path to our disk: ``"a different
    disk (serial X vs Y)"``, ``"its disk's identity could not be read
    (...)"``, ...  The address must not be served.
    """

    address: Address
    ours: bytes
    theirs: bytes
    reason: str

    def describe(self) -> str:
        """Return the critical log line: the address and both MACs, and why."""
        return (
            f"{_name(self.address)}: {format_mac(self.theirs)} also answers for this address,"
            f" {self.reason}; not serving it from {format_mac(self.ours)}"
        )


@frozen
class SecondPath:
    """Another server (``theirs``) serves the same disk at ``address``: a second path to it."""

    address: Address
    theirs: bytes

    def describe(self) -> str:
        """Return the log line: the address and the other gateway's MAC."""
        theirs = format_mac(self.theirs)
        return f"{_name(self.address)}: {theirs} serves the same disk (a second path)"


Verdict = Duplicate | SecondPath
"""What ``DuplicateWatch`` concludes about one other MAC answering for an address."""


@define
class _Ask:
    """An IDENTIFY request we sent: to ``mac`` for ``address`` with ``tag``."""

    address: Address
    mac: bytes
    tag: bytes
    frame: bytes
    asked: float
    sent: float


@define
class _Watched:
    """What we know about one address we serve or are about to serve."""

    page: bytes | None
    since: float
    probe: bytes
    probes_sent: int = 1
    judged: dict[bytes, Verdict] = field(factory=dict)
    asking: dict[bytes, _Ask] = field(factory=dict)


def _check_mac(mac: object) -> bytes:
    """Return ``mac`` as bytes if it is a 6-byte unicast MAC, else raise ``ValueError``."""
    if not isinstance(mac, bytes | bytearray) or len(mac) != 6 or mac[0] & 1:
        raise ValueError(f"not a unicast MAC address: {mac!r}")
    return bytes(mac)


def _printable(text: str) -> str:
    """Return a serial from the wire fit for a log line: printable ASCII, cut, never empty."""
    shown = "".join(c if " " <= c <= "~" else "?" for c in text[:_SERIAL_SHOWN])
    return shown or "(none)"


def _compare(
    address: Address, ours: bytes, theirs_mac: bytes, page: bytes, other: bytes
) -> Verdict:
    """Judge the other server's IDENTIFY ``other`` against our ``page`` (both 512 bytes)."""
    if same_disk(page, other):
        return SecondPath(address, theirs_mac)
    our_serial, our_wwn = page_identity(page)
    their_serial, their_wwn = page_identity(other)
    serials = f"serial {_printable(our_serial)} vs {_printable(their_serial)}"
    if our_wwn is None and their_wwn is None:
        reason = f"a disk not known to be ours ({serials}; neither disk has a world-wide name)"
    elif our_wwn is None:
        reason = f"a disk not known to be ours ({serials}; our disk has no world-wide name)"
    elif their_wwn is None:
        reason = f"a disk not known to be ours ({serials}; theirs has no world-wide name)"
    elif our_wwn != their_wwn:
        reason = f"a different disk ({serials}, world-wide name {our_wwn:016x} vs {their_wwn:016x})"
    else:
        reason = f"a different disk ({serials})"
    return Duplicate(address, ours, theirs_mac, reason)


class DuplicateWatch:
    """
    The addresses one interface (MAC ``mac``) serves, checked against other servers'.

    ``tag_base`` marks the tags of our probes and IDENTIFY requests (its low
    24 bits must be zero; they count); the default keeps bit 31 clear, like
    the Linux initiator, whose tags we never see since replies are unicast
    to their asker.  ``own_macs`` are this server's other interfaces: if they
    share the segment their answers are ours, not another server's (it may
    be replaced later, as interfaces come and go).

    ``wait``: seconds after ``watch`` before ``settled``; ``probes``: config
    queries sent for an address in all, the first by ``watch`` and the rest
    by ``retransmit`` over the first half of ``wait``; ``identify_timeout``:
    seconds an IDENTIFY may stay unanswered before ``expire`` calls it a
    duplicate; ``identify_resend``: seconds between ``retransmit``'s copies
    of an unanswered IDENTIFY (same tag).

    @raise ValueError: for a MAC that is not 6-byte unicast, a ``tag_base``
        with its low 24 bits set, or a negative or zero time.
    """

    def __init__(
        self,
        mac: bytes,
        tag_base: int = 0x7A000000,
        *,
        own_macs: Iterable[bytes] = (),
        wait: float = 1.0,
        probes: int = 2,
        identify_timeout: float = 1.0,
        identify_resend: float = 0.25,
    ) -> None:
        self.mac = _check_mac(mac)
        if not 0 <= tag_base <= 0xFFFFFFFF or tag_base & _COUNTER_MASK:
            raise ValueError(f"tag base {tag_base:#x} must be 32 bits with the low 24 clear")
        if wait < 0 or probes < 1 or identify_timeout <= 0 or identify_resend <= 0:
            raise ValueError("wait must be >= 0, probes >= 1 and the IDENTIFY times > 0")
        self.tag_base = tag_base
        self.own_macs = frozenset(_check_mac(m) for m in own_macs)
        self.wait = wait
        self.probes = probes
        self.identify_timeout = identify_timeout
        self.identify_resend = identify_resend
        self._watched: dict[Address, _Watched] = {}
        self._outstanding: dict[bytes, _Ask] = {}
        self._counter = 0

    # -- the caller's calls ---------------------------------------------

    def watch(self, address: Address, identify_page: bytes | None, now: float) -> list[bytes]:
        """
        Start watching ``address`` (shelf, slot), served with IDENTIFY ``identify_page``.

        Returns the probe frame to send: a broadcast config read for that
        shelf.slot from our MAC.  Watching an address again starts afresh:
        what was known about it and its outstanding IDENTIFY requests are
        dropped.  Without a page (our disk's identity is unknown) every other
        server answering is a duplicate, judged without asking it.

        @raise ValueError: for a wildcard or out-of-range address, or a page
            that is not 512 bytes.
        """
        shelf, slot = address
        if not (0 <= shelf < BROADCAST_MAJOR and 0 <= slot < BROADCAST_MINOR):
            raise ValueError(f"cannot watch address {shelf}.{slot}")
        if identify_page is not None and len(identify_page) != IDENTIFY_SIZE:
            raise ValueError(f"an IDENTIFY page is {IDENTIFY_SIZE} bytes, not {len(identify_page)}")
        address = (shelf, slot)
        self.forget(address)
        arg = ConfigArg(0, 0, 0, 0, ConfigCommand.READ, 0, b"")
        header = Header(VERSION, False, False, 0, shelf, slot, _CONFIG, self._new_tag(), arg)
        probe = EthernetFrame(BROADCAST_MAC, self.mac, ETHERTYPE, header.to_bytes()).to_bytes(
            pad=True
        )
        page = None if identify_page is None else bytes(identify_page)
        self._watched[address] = _Watched(page, now, probe)
        return [probe]

    def forget(self, address: Address) -> None:
        """Stop watching ``address``; its outstanding IDENTIFY requests are dropped."""
        watched = self._watched.pop(address, None)
        if watched is not None:
            for ask in watched.asking.values():
                self._outstanding.pop(ask.tag, None)

    def frame_received(
        self, frame: bytes | bytearray | memoryview, now: float
    ) -> tuple[list[bytes], list[Verdict]]:
        """
        Learn from one received frame; return the frames to send and any verdicts.

        Only AoE responses from a MAC not ours for a watched address count;
        everything else (requests, other addresses, our own frames, frames
        from a multicast source, frames that do not decode) is ignored and
        costs one ``struct`` unpack.  Never raises.

        A response from a MAC not yet judged or asked gives the IDENTIFY
        request to send it; the reply to one of our IDENTIFY requests (the
        same address, MAC and tag) gives its verdict.
        """
        if len(frame) < _PREFIX.size:
            return [], []
        src, ethertype, verflags, major, minor = _PREFIX.unpack_from(frame)
        if ethertype != ETHERTYPE or not verflags & _FLAG_RESPONSE:
            return [], []
        watched = self._watched.get((major, minor))
        if watched is None or src == self.mac or src in self.own_macs or src[0] & 1:
            return [], []
        try:
            header = Header.from_bytes(memoryview(frame)[ETHERNET_HEADER_SIZE:])
        except WireError:
            return [], []
        address = (major, minor)
        if header.command == _ATA:
            ask = self._outstanding.get(header.tag)
            if ask is not None and ask.address == address and ask.mac == src:
                return [], [self._answered(watched, ask, header)]
        if src in watched.judged or src in watched.asking:
            return [], []
        if len(watched.judged) + len(watched.asking) >= MAX_JUDGED:
            return [], []
        if watched.page is None:
            verdict = Duplicate(address, self.mac, src, "our own disk's identity is unknown")
            watched.judged[src] = verdict
            return [], [verdict]
        if len(watched.asking) >= MAX_ASKING:
            return [], []
        tag = self._new_tag()
        arg = ATAArg(sector_count=1, cmd_status=ATACmdStatus.IDENTIFY, lba=_IDENTIFY_LBA)
        request = Header(VERSION, False, False, 0, major, minor, _ATA, tag, arg)
        identify = EthernetFrame(src, self.mac, ETHERTYPE, request.to_bytes()).to_bytes(pad=True)
        ask = _Ask(address, src, tag, identify, now, now)
        watched.asking[src] = ask
        self._outstanding[tag] = ask
        return [identify], []

    def retransmit(self, now: float) -> list[bytes]:
        """
        Return the frames due again at ``now``: probes and unanswered IDENTIFY requests.

        Each address gets ``probes`` config queries in all, evenly over the
        first half of ``wait``; an IDENTIFY unanswered for
        ``identify_resend`` seconds is sent again (same tag) until it expires.
        Optional: without it, one probe and one IDENTIFY are sent.
        """
        frames = []
        for watched in self._watched.values():
            if watched.probes_sent < self.probes:
                due = watched.since + self.wait * watched.probes_sent / (2 * (self.probes - 1))
                if now >= due:
                    watched.probes_sent += 1
                    frames.append(watched.probe)
        for ask in self._outstanding.values():
            if now - ask.sent >= self.identify_resend and now - ask.asked <= self.identify_timeout:
                ask.sent = now
                frames.append(ask.frame)
        return frames

    def expire(self, now: float) -> list[Duplicate]:
        """Return as duplicates the servers asked for IDENTIFY over ``identify_timeout`` ago."""
        late = [
            ask for ask in self._outstanding.values() if now - ask.asked > self.identify_timeout
        ]
        verdicts = []
        for ask in late:
            del self._outstanding[ask.tag]
            watched = self._watched[ask.address]
            del watched.asking[ask.mac]
            verdict = Duplicate(
                ask.address,
                self.mac,
                ask.mac,
                "its disk's identity could not be read"
                f" (no answer to IDENTIFY in {self.identify_timeout:g} s)",
            )
            watched.judged[ask.mac] = verdict
            verdicts.append(verdict)
        return verdicts

    # -- what is known --------------------------------------------------

    def settled(self, address: Address, now: float) -> bool:
        """
        Return whether ``address`` has been watched ``wait`` seconds with no IDENTIFY outstanding.

        Then the caller may serve it, unless a ``Duplicate`` was found
        (``duplicates``).  ``False`` for an address not watched.
        """
        watched = self._watched.get(address)
        return watched is not None and now - watched.since >= self.wait and not watched.asking

    def paths(self, address: Address) -> tuple[bytes, ...]:
        """Return the MACs of the other servers serving the same disk at ``address``."""
        return self._verdicts(address, SecondPath)

    def duplicates(self, address: Address) -> tuple[bytes, ...]:
        """Return the MACs of the other servers judged duplicates at ``address``."""
        return self._verdicts(address, Duplicate)

    def watching(self) -> tuple[Address, ...]:
        """Return the addresses watched, in the order ``watch`` was called."""
        return tuple(self._watched)

    # -- internals ------------------------------------------------------

    def _verdicts(self, address: Address, kind: type[Verdict]) -> tuple[bytes, ...]:
        """Return the MACs at ``address`` whose verdict is a ``kind``, in the order judged."""
        watched = self._watched.get(address)
        if watched is None:
            return ()
        return tuple(mac for mac, verdict in watched.judged.items() if isinstance(verdict, kind))

    def _new_tag(self) -> bytes:
        """Return a tag of ours that no outstanding IDENTIFY uses."""
        while True:
            tag = (self.tag_base | self._counter).to_bytes(4, "big")
            self._counter = (self._counter + 1) & _COUNTER_MASK
            if tag not in self._outstanding:
                return tag

    def _answered(self, watched: _Watched, ask: _Ask, reply: Header) -> Verdict:
        """Judge the other server from ``reply``, its answer to our IDENTIFY ``ask``."""
        del self._outstanding[ask.tag]
        del watched.asking[ask.mac]
        arg = reply.arg
        problem = None
        if reply.flag_error:
            problem = f"AoE error {reply.error}"
        elif not isinstance(arg, ATAArg):
            problem = "not an ATA reply"
        elif arg.cmd_status & _ERR:
            problem = f"ATA status {arg.cmd_status:#04x}, error {arg.err_feature:#04x}"
        elif len(arg.data) < IDENTIFY_SIZE:
            problem = f"an IDENTIFY page of {len(arg.data)} bytes"
        verdict: Verdict
        if problem is None and isinstance(arg, ATAArg) and watched.page is not None:
            page = arg.data[:IDENTIFY_SIZE]
            verdict = _compare(ask.address, self.mac, ask.mac, watched.page, page)
        else:
            reason = f"its disk's identity could not be read ({problem})"
            verdict = Duplicate(ask.address, self.mac, ask.mac, reason)
        watched.judged[ask.mac] = verdict
        return verdict
