# -*- test-case-name: tests.test_client -*-
"""
An AoE initiator in user space: find targets, then read and write their sectors.

The Linux kernel's ``aoe`` driver is the initiator that matters in
production; this one exists so that the project can test, demonstrate and
benchmark a target without loading a kernel module, from one Python process.
It behaves like the Linux driver where that matters on the wire
(``docs/design.md``, ``notes/linux-initiator.md``):

- discovery is a broadcast Query Config (shelf 0xffff, slot 0xff), and each
  answering target is then asked for IDENTIFY DEVICE to learn its size;
- reads and writes are split into frames of at most the target's sector
  count (0 in its config reply means 2) and what the interface MTU carries;
- at most ``min(buffer count, max_in_flight)`` requests are in flight per
  target, since a target drops what exceeds its buffer count;
- replies are matched by tag; a request that is not answered in time is sent
  again with a *new* tag after a doubling timeout, so a late reply to an
  earlier copy is recognised as stale and ignored;
- every tag has bit 31 set, which the Linux driver leaves to user space, so
  this client and the kernel can share an interface without confusing each
  other's replies.

Three layers: ``AoEClientProtocol`` owns tags, timers and retransmission
over any transport with ``write(frame)`` (an ``aoe_twisted.net.port.AoEPort``
or a test fake); ``AoEClient`` discovers and opens targets; ``RemoteDisk``
reads and writes one target with a window of requests in flight.  Failures
are exceptions whose ``str()`` is one line naming the target and the
operation: ``AoETimeout``, ``AoEProtocolError`` (an AoE error code),
``ATAError`` (ATA status and error bits, named ABRT/IDNF/UNC),
``TargetNotFound`` and ``BadReply``.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define, evolve, field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from aoe_twisted.core.wire import (
    ATA_ARG_SIZE,
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ETHERTYPE,
    HEADER_SIZE,
    SECTOR_SIZE,
    VERSION,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    Error,
    EthernetFrame,
    Header,
    WireError,
    format_mac,
)
from aoe_twisted.core.wire import ATAError as ATAErrorBit

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = [
    "CLIENT_TAG_BIT",
    "DEFAULT_MAX_IN_FLIGHT",
    "ATAError",
    "AoEClient",
    "AoEClientError",
    "AoEClientProtocol",
    "AoEProtocolError",
    "AoETimeout",
    "BadReply",
    "Identity",
    "RemoteDisk",
    "Reply",
    "RetryPolicy",
    "TargetInfo",
    "TargetNotFound",
    "parse_identify",
    "target_name",
]

_log = Logger()

#: Tag bit 31: set on every tag this client sends.  The Linux initiator leaves
#: it clear and ignores replies that have it, keeping that half for user space.
CLIENT_TAG_BIT = 0x8000_0000
_TAG_COUNTER_MASK = 0x7FFF_FFFF

#: The cap on requests in flight to one target, whatever its buffer count
#: (the Linux driver caps at 64 too).
DEFAULT_MAX_IN_FLIGHT = 64

#: Status bits that fail an ATA command: BSY, DF, DRQ and ERR (Linux ``ktiocomplete``).
_STATUS_FAILED = 0xA9
#: The AoE header and ATA argument ride in the Ethernet payload with the sectors.
_ATA_OVERHEAD = HEADER_SIZE + ATA_ARG_SIZE
#: The most sectors one ATA command can carry: its count register is one byte.
_MAX_SECTORS_PER_COMMAND = 255
#: Without a transport that knows its MTU, assume plain Ethernet.
_DEFAULT_MTU = 1500
#: 28-bit commands put the device register (LBA mode, as Linux sends it) into LBA byte 3.
_LBA28_DEVICE = 0xE0
_LBA28_LIMIT = 1 << 28
_LBA48_LIMIT = 1 << 48
#: IDENTIFY carries 0xA0 in LBA byte 3, as the Linux driver sends it.
_IDENTIFY_LBA = 0xA0 << 24
#: IDENTIFY word 83: bits 15:14 are 01 when the word is valid; bit 13 is FLUSH CACHE EXT.
_WORD83_VALID_MASK = 0xC000
_WORD83_VALID = 0x4000
_WORD83_FLUSH_EXT = 1 << 13


def target_name(shelf: int, slot: int) -> str:
    """Return the name the Linux driver gives the target at ``shelf``.``slot``: ``e1.0``."""
    return f"e{shelf}.{slot}"


# -- errors -------------------------------------------------------------------


class AoEClientError(Exception):
    """
    An operation on a target failed; ``str()`` is one line naming the target and why.

    Every error this module gives a caller is one of these, so a command line
    tool can print it as it is and exit.
    """


class TargetNotFound(AoEClientError):
    """No target answered at an address (after all retries of the config query)."""

    def __init__(self, target: str, where: str = "") -> None:
        self.target = target
        self.where = where
        suffix = f" on {where}" if where else ""
        super().__init__(f"{target}: no such AoE target answered{suffix}")


class AoETimeout(AoEClientError):
    """A request got no reply after its first try and all of its retransmissions."""

    def __init__(self, target: str, what: str, attempts: int, waited: float) -> None:
        self.target = target
        self.what = what
        self.attempts = attempts
        self.waited = waited
        super().__init__(
            f"{target}: timed out: no answer to {what} after {attempts} tries "
            f"in {waited:.1f} s"
        )


_AOE_ERROR_TEXT = {
    Error.UNRECOGNIZED_COMMAND_CODE: "unrecognized command code",
    Error.BAD_ARGUMENT_PARAMETER: "bad argument parameter",
    Error.DEVICE_UNAVAILABLE: "device unavailable",
    Error.CONFIG_STRING_PRESENT: "config string present",
    Error.UNSUPPORTED_VERSION: "unsupported version",
    Error.TARGET_IS_RESERVED: "target is reserved by another host",
}


class AoEProtocolError(AoEClientError):
    """
    The target answered with the AoE error flag (AoEr11 section 2.4).

    ``code`` is the ``Error`` (or the raw number, if it is not one AoEr11
    defines).  This is an AoE-level refusal, not a disk error: the command
    never reached the disk.
    """

    def __init__(self, code: int, target: str = "", what: str = "request") -> None:
        try:
            self.code: Error | int = Error(code)
        except ValueError:
            self.code = code
        self.target = target
        self.what = what
        text = _AOE_ERROR_TEXT.get(self.code, "unknown error")  # type: ignore[call-overload]
        prefix = f"{target}: " if target else ""
        super().__init__(f"{prefix}{what} refused: AoE error {int(code)} ({text})")


_ATA_ERROR_TEXT = (
    (ATAErrorBit.ABRT, "ABRT", "command aborted"),
    (ATAErrorBit.IDNF, "IDNF", "sector not found: address out of range"),
    (ATAErrorBit.UNC, "UNC", "uncorrectable data error"),
)


class ATAError(AoEClientError):
    """
    The disk behind the target failed an ATA command (status has ERR, DF, DRQ or BSY).

    ``status`` and ``error`` are the ATA status and error registers of the
    reply; ``names`` the error bits set (``"ABRT"``, ``"IDNF"``, ``"UNC"``).
    """

    def __init__(self, status: int, error: int, target: str = "", what: str = "command") -> None:
        self.status = status
        self.error = error
        self.target = target
        self.what = what
        self.names = tuple(name for bit, name, _ in _ATA_ERROR_TEXT if error & bit)
        described = ", ".join(
            f"{name} ({text})" for bit, name, text in _ATA_ERROR_TEXT if error & bit
        )
        prefix = f"{target}: " if target else ""
        super().__init__(
            f"{prefix}{what} failed: ATA error {described or 'with no error bit set'} "
            f"[status 0x{status:02x}, error 0x{error:02x}]"
        )


class BadReply(AoEClientError):
    """A reply that matched a request by tag but is not a valid answer to it (e.g. short)."""


# -- what a target says about itself -------------------------------------------


@frozen
class Identity:
    """
    What an ATA IDENTIFY DEVICE page says: capacity, LBA48 support, and the strings.

    ``flush_ext`` says whether the device advertises FLUSH CACHE EXT (0xEA);
    vblade, for one, does not, and aborts it.
    """

    sectors: int
    lba48: bool
    model: str = ""
    serial: str = ""
    firmware: str = ""
    flush_ext: bool = False

    @property
    def size(self) -> int:
        """The capacity in bytes."""
        return self.sectors * SECTOR_SIZE


_IDENTIFY_WORDS = struct.Struct("<256H")


def _ata_string(words: Sequence[int]) -> str:
    """Decode an ATA string field: two characters a word, the first in the high byte."""
    raw = b"".join(word.to_bytes(2, "big") for word in words)
    return raw.decode("ascii", "replace").strip(" \x00")


def parse_identify(page: bytes) -> Identity:
    """
    Decode an IDENTIFY DEVICE page the way the Linux driver does (``ataid_complete``).

    The capacity comes from words 100-103 when word 83 bit 10 advertises
    LBA48, otherwise from words 60-61.  FLUSH CACHE EXT is supported when
    word 83 is valid (bits 15:14 are 01) and has bit 13, as libata's
    ``ata_id_has_flush_ext`` decides.

    @raise BadReply: if ``page`` is shorter than 512 bytes.
    """
    if len(page) < _IDENTIFY_WORDS.size:
        raise BadReply(f"IDENTIFY page of {len(page)} bytes, expected 512")
    words = _IDENTIFY_WORDS.unpack_from(page)
    lba48 = bool(words[83] & (1 << 10))
    if lba48:
        sectors = words[100] | words[101] << 16 | words[102] << 32 | words[103] << 48
    else:
        sectors = words[60] | words[61] << 16
    word83 = words[83]
    flush_ext = (word83 & _WORD83_VALID_MASK) == _WORD83_VALID and bool(
        word83 & _WORD83_FLUSH_EXT
    )
    return Identity(
        sectors,
        lba48,
        model=_ata_string(words[27:47]),
        serial=_ata_string(words[10:20]),
        firmware=_ata_string(words[23:27]),
        flush_ext=flush_ext,
    )


@frozen
class TargetInfo:
    """
    One target that answered a config query, and what its IDENTIFY said.

    ``sector_count`` is the most sectors per ATA command the target accepts,
    with AoEr11's "0 means 2" already applied; ``mac`` is the 6-byte address
    it answered from.  ``size`` (bytes) and the IDENTIFY fields are ``None``
    or empty when IDENTIFY was not asked for or not answered (``lba48`` and
    ``flush_ext`` then assume a modern device).
    """

    shelf: int
    slot: int
    mac: bytes
    buffer_count: int
    sector_count: int
    firmware_version: int
    config_string: bytes
    size: int | None = None
    lba48: bool = True
    model: str = ""
    serial: str = ""
    firmware: str = ""
    flush_ext: bool = True

    @property
    def name(self) -> str:
        """The target's name, ``eSHELF.SLOT``."""
        return target_name(self.shelf, self.slot)

    @classmethod
    def from_config(cls, src: bytes, header: Header) -> TargetInfo:
        """Build the info a config reply ``header`` from MAC ``src`` carries."""
        arg = header.arg
        if not isinstance(arg, ConfigArg):
            raise BadReply(f"{target_name(header.major, header.minor)}: config reply without "
                           "a config argument")
        return cls(
            header.major,
            header.minor,
            src,
            arg.buffer_count,
            arg.sector_count or 2,
            arg.firmware_version,
            arg.string,
        )

    def with_identity(self, identity: Identity) -> TargetInfo:
        """Return this info completed with what IDENTIFY said."""
        return evolve(
            self,
            size=identity.size,
            lba48=identity.lba48,
            model=identity.model,
            serial=identity.serial,
            firmware=identity.firmware,
            flush_ext=identity.flush_ext,
        )


# -- the protocol: tags, timers, retransmission ---------------------------------


@frozen
class RetryPolicy:
    """
    How long to wait for a reply and how often to send a request again.

    The first copy waits ``initial_timeout`` seconds; each retransmission
    waits twice as long as the one before, at most ``max_timeout``; after
    ``retries`` retransmissions without a reply the request fails with
    ``AoETimeout``.  The defaults give up after 0.5+1+2+4+4 = 11.5 s.
    """

    initial_timeout: float = field(default=0.5)
    max_timeout: float = field(default=4.0)
    retries: int = field(default=4)

    @initial_timeout.validator
    def _check_initial(self, attribute: object, value: float) -> None:
        if not value > 0:
            raise ValueError(f"initial_timeout must be positive, not {value!r}")

    @max_timeout.validator
    def _check_max(self, attribute: object, value: float) -> None:
        if value < self.initial_timeout:
            raise ValueError("max_timeout must be at least initial_timeout")

    @retries.validator
    def _check_retries(self, attribute: object, value: int) -> None:
        if value < 0:
            raise ValueError(f"retries must be 0 or more, not {value!r}")

    def timeouts(self) -> list[float]:
        """Return the wait after each copy of a request, first copy first."""
        waits = [self.initial_timeout]
        for _ in range(self.retries):
            waits.append(min(waits[-1] * 2, self.max_timeout))
        return waits


@frozen
class Reply:
    """The answer to a request: the MAC it came from and the decoded message."""

    source: bytes
    header: Header


@define(eq=False)
class _Request:
    """One outstanding request and the state of its retransmission."""

    dst: bytes
    header: Header
    what: str
    target: str
    deferred: Deferred[Reply] = field(init=False)
    attempts: int = 0
    timeout: float = 0.0
    waited: float = 0.0
    tag: int | None = None
    timer: IDelayedCall | None = None


class AoEClientProtocol(AbstractDatagramProtocol):
    """
    The initiator's side of AoE on one interface: tags, matching, timeouts.

    Connect it to a transport that sends one Ethernet frame per ``write`` and
    has ``mac`` (6 bytes) and, optionally, ``mtu``; feed it every received
    frame through ``datagramReceived``.  ``reactor`` provides the timers.

    Counters for tests and reports: ``frames_sent``, ``retransmits``,
    ``stale_replies`` (replies with our tag bit whose request was already
    answered, retransmitted or given up) and ``ignored`` (everything else
    that is not an answer to us).
    """

    noisy = False

    def __init__(
        self,
        reactor: IReactorTime | None = None,
        retry: RetryPolicy | None = None,
        *,
        first_tag: int | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor  # type: ignore[assignment]
        self.reactor: IReactorTime = reactor  # type: ignore[assignment]
        self.retry = retry or RetryPolicy()
        self._counter = random.getrandbits(31) if first_tag is None else first_tag
        self._pending: dict[int, _Request] = {}
        # Broadcast queries gathering every reply to their tag until a deadline.
        self._collectors: dict[int, list[tuple[bytes, Header]]] = {}
        self.frames_sent = 0
        self.retransmits = 0
        self.stale_replies = 0
        self.ignored = 0

    # -- the transport --------------------------------------------------------

    @property
    def mac(self) -> bytes:
        """The MAC address frames are sent from: the transport's."""
        if self.transport is None:
            raise RuntimeError("the AoE client protocol is not connected to a port")
        return bytes(self.transport.mac)  # type: ignore[attr-defined]

    @property
    def mtu(self) -> int:
        """The transport's MTU (1500 if it does not say)."""
        return int(getattr(self.transport, "mtu", None) or _DEFAULT_MTU)

    @property
    def in_flight(self) -> int:
        """How many requests wait for a reply now."""
        return len(self._pending)

    def _new_tag(self) -> int:
        """Return a tag with bit 31 set that no outstanding request or query uses."""
        while True:
            self._counter = (self._counter + 1) & _TAG_COUNTER_MASK
            tag = CLIENT_TAG_BIT | self._counter
            if tag not in self._pending and tag not in self._collectors:
                return tag

    def _send(self, dst: bytes, header: Header) -> None:
        """Send ``header`` to ``dst`` as one Ethernet frame, padded to 60 bytes."""
        frame = EthernetFrame(dst, self.mac, ETHERTYPE, header.to_bytes()).to_bytes(pad=True)
        self.transport.write(frame)  # type: ignore[union-attr]
        self.frames_sent += 1

    # -- requests with one answer ---------------------------------------------

    def request(
        self,
        dst: bytes,
        major: int,
        minor: int,
        command: Command,
        arg: Any,
        *,
        what: str = "request",
        target: str | None = None,
    ) -> Deferred[Reply]:
        """
        Send a request and return a Deferred that fires with its ``Reply``.

        ``dst`` may be the broadcast MAC (to find a target by address).  The
        reply must carry the same command and, unless ``major``/``minor``
        are wildcards, the same address.  Fails with ``AoEProtocolError`` if
        the reply has the error flag and ``AoETimeout`` if the retry policy
        runs out; cancelling the Deferred abandons the request.  ``what``
        and ``target`` name the request in those errors.
        """
        header = Header(VERSION, False, False, 0, major, minor, command, bytes(4), arg)
        request = _Request(dst, header, what, target or target_name(major, minor))
        request.deferred = Deferred(lambda _: self._abandon(request))
        request.timeout = self.retry.initial_timeout
        self._transmit(request)
        return request.deferred

    def _transmit(self, request: _Request) -> None:
        """Send (again) ``request`` under a new tag and start its timer."""
        tag = self._new_tag()
        request.tag = tag
        request.attempts += 1
        self._pending[tag] = request
        request.timer = self.reactor.callLater(request.timeout, self._expire, request)
        try:
            self._send(request.dst, evolve(request.header, tag=tag.to_bytes(4, "big")))
        except OSError as e:
            # The port itself drops a frame the kernel has no room for (the timer
            # then resends it); what it raises will not get better by retrying.
            self._forget(request)
            request.deferred.errback(
                AoEClientError(f"{request.target}: cannot send {request.what}: {e.strerror or e}")
            )

    def _forget(self, request: _Request) -> None:
        """Drop ``request``'s tag and timer: it is answered, given up or abandoned."""
        if request.tag is not None:
            self._pending.pop(request.tag, None)
            request.tag = None
        if request.timer is not None:
            if request.timer.active():
                request.timer.cancel()
            request.timer = None

    def _expire(self, request: _Request) -> None:
        """No reply in time: retransmit with a new tag, or give up."""
        request.timer = None
        request.waited += request.timeout
        self._forget(request)
        if request.attempts > self.retry.retries:
            request.deferred.errback(
                AoETimeout(request.target, request.what, request.attempts, request.waited)
            )
            return
        request.timeout = min(request.timeout * 2, self.retry.max_timeout)
        self.retransmits += 1
        _log.debug(
            "{target}: no answer to {what}, sending it again (try {attempt})",
            target=request.target,
            what=request.what,
            attempt=request.attempts + 1,
        )
        self._transmit(request)

    def _abandon(self, request: _Request) -> None:
        """The caller cancelled: forget the request; its Deferred fails with CancelledError."""
        self._forget(request)

    # -- broadcast queries with many answers ----------------------------------

    def query_config(
        self,
        wait: float,
        *,
        major: int = BROADCAST_MAJOR,
        minor: int = BROADCAST_MINOR,
        sends: int = 2,
    ) -> Deferred[list[tuple[bytes, Header]]]:
        """
        Broadcast a config query and gather every reply for ``wait`` seconds.

        The query is sent ``sends`` times, spread over the first half of the
        wait, so that one lost broadcast does not hide a target.  Fires with
        ``(source MAC, reply header)`` pairs in arrival order, duplicates
        included; replies with the error flag are left out.
        """
        arg = ConfigArg(0, 0, 0, 0, ConfigCommand.READ, 0, b"")
        tag = self._new_tag()
        header = Header(
            VERSION, False, False, 0, major, minor, Command.QUERY_CONFIG_INFORMATION,
            tag.to_bytes(4, "big"), arg,
        )
        replies: list[tuple[bytes, Header]] = []
        self._collectors[tag] = replies
        timers: list[IDelayedCall] = []

        def finish() -> None:
            self._collectors.pop(tag, None)
            for timer in timers:
                if timer.active():
                    timer.cancel()
            if not done.called:
                done.callback(replies)

        def resend() -> None:
            try:
                self._send(BROADCAST_MAC, header)
            except OSError as e:
                _log.debug("config query not sent: {error}", error=e)

        done: Deferred[list[tuple[bytes, Header]]] = Deferred(lambda _: finish())
        try:
            self._send(BROADCAST_MAC, header)
        except OSError as e:
            self._collectors.pop(tag, None)
            done.errback(AoEClientError(f"cannot send a config query: {e.strerror or e}"))
            return done
        for i in range(1, max(sends, 1)):
            timers.append(self.reactor.callLater(wait * i / (2 * (sends - 1)), resend))
        timers.append(self.reactor.callLater(wait, finish))
        return done

    # -- receiving ------------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: object = None) -> None:
        """
        Match one received Ethernet frame to the request or query it answers.

        Anything that is not an AoE response with our tag bit is ignored, as
        is a reply whose tag is no longer outstanding (a stale copy).
        """
        try:
            ethernet = EthernetFrame.from_bytes(datagram)
            if ethernet.ethertype != ETHERTYPE:
                self.ignored += 1
                return
            header = Header.from_bytes(ethernet.payload)
        except WireError as e:
            self.ignored += 1
            _log.debug("ignoring an undecodable AoE frame: {error}", error=e)
            return
        if not header.flag_response:
            self.ignored += 1
            return
        tag = int.from_bytes(header.tag, "big")
        if not tag & CLIENT_TAG_BIT:
            self.ignored += 1
            return
        replies = self._collectors.get(tag)
        if replies is not None:
            if (
                header.command == Command.QUERY_CONFIG_INFORMATION
                and not header.flag_error
                and header.major != BROADCAST_MAJOR
                and header.minor != BROADCAST_MINOR
            ):
                replies.append((ethernet.src, header))
            else:
                self.ignored += 1
            return
        request = self._pending.get(tag)
        if request is None:
            self.stale_replies += 1
            return
        sent = request.header
        if header.command != sent.command or not (
            sent.major in (BROADCAST_MAJOR, header.major)
            and sent.minor in (BROADCAST_MINOR, header.minor)
        ):
            self.ignored += 1
            _log.debug(
                "ignoring a reply from {source} that does not match {what}",
                source=format_mac(ethernet.src),
                what=request.what,
            )
            return
        self._forget(request)
        if header.flag_error:
            request.deferred.errback(AoEProtocolError(header.error, request.target, request.what))
            return
        request.deferred.callback(Reply(ethernet.src, header))

    def stopProtocol(self) -> None:
        """The port closed: abandon every outstanding request and query."""
        for request in list(self._pending.values()):
            self._forget(request)
            request.deferred.errback(
                AoEClientError(f"{request.target}: {request.what} abandoned: the port closed")
            )
        for collector_tag in list(self._collectors):
            self._collectors.pop(collector_tag, None)


# -- discovery and opening --------------------------------------------------------


def _identify_arg() -> ATAArg:
    """Return the IDENTIFY DEVICE argument, as the Linux driver sends it."""
    return ATAArg(sector_count=1, cmd_status=ATACmdStatus.IDENTIFY, lba=_IDENTIFY_LBA)


def _check_ata(header: Header, target: str, what: str) -> ATAArg:
    """Return the ATA argument of a reply, raising ``ATAError`` if its status says failure."""
    arg = header.arg
    if not isinstance(arg, ATAArg):
        raise BadReply(f"{target}: reply to {what} without an ATA argument")
    if arg.cmd_status & _STATUS_FAILED:
        raise ATAError(arg.cmd_status, arg.err_feature, target, what)
    return arg


class AoEClient:
    """
    An initiator on one interface: discover targets and open them as ``RemoteDisk``.

    Make one with ``AoEClient.listen(interface)`` for a real interface, or
    around an ``AoEClientProtocol`` already connected to a transport (tests).
    ``close()`` stops the port when done.
    """

    def __init__(
        self,
        protocol: AoEClientProtocol,
        port: Any = None,
        *,
        interface: str = "",
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.protocol = protocol
        self.port = port
        self.interface = interface
        self.max_in_flight = max_in_flight

    @classmethod
    def listen(
        cls,
        interface: str,
        *,
        reactor: IReactorTime | None = None,
        netns: str | None = None,
        retry: RetryPolicy | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        system: Any = None,
    ) -> AoEClient:
        """
        Open a raw AoE socket on ``interface`` (in network namespace ``netns``).

        Needs ``CAP_NET_RAW``.  Raises ``aoe_twisted.net.port.CannotOpenInterface``
        (a ``CannotListenError`` whose ``str()`` is one line) for a missing
        interface or namespace or no permission.  ``system`` replaces the
        operating system's packet sockets (``aoe_twisted.testing``).
        """
        from aoe_twisted.net.port import AoEPort

        protocol = AoEClientProtocol(reactor, retry)
        port = AoEPort(
            interface, protocol, reactor=reactor, system=system, netns=netns,
            # Room for a full window of replies, twice over, at any MTU.
            receive_frames=2 * max_in_flight,
        )
        port.startListening()
        return cls(protocol, port, interface=interface, max_in_flight=max_in_flight)

    def close(self) -> Deferred[None]:
        """Stop listening; outstanding requests fail."""
        if self.port is None:
            return succeed(None)
        port, self.port = self.port, None
        return port.stopListening()  # type: ignore[no-any-return]

    def discover(
        self,
        timeout: float = 1.0,
        *,
        shelf: int = BROADCAST_MAJOR,
        slot: int = BROADCAST_MINOR,
        identify: bool = True,
    ) -> Deferred[list[TargetInfo]]:
        """
        Find every target that answers a broadcast config query within ``timeout`` seconds.

        ``shelf``/``slot`` narrow the query (the defaults ask everyone).  With
        ``identify`` each target is then asked for IDENTIFY to fill in its
        size; a target that does not answer that keeps ``size`` ``None``.
        Fires with the targets sorted by shelf, slot and MAC; a target seen
        through several of its MACs is listed once per MAC.
        """
        return Deferred.fromCoroutine(self._discover(timeout, shelf, slot, identify))

    async def _discover(
        self, timeout: float, shelf: int, slot: int, identify: bool
    ) -> list[TargetInfo]:
        replies = await self.protocol.query_config(timeout, major=shelf, minor=slot)
        found: dict[tuple[int, int, bytes], TargetInfo] = {}
        for src, header in replies:
            key = (header.major, header.minor, src)
            if key not in found:
                try:
                    found[key] = TargetInfo.from_config(src, header)
                except BadReply as e:
                    _log.debug("{error}", error=e)
        infos = sorted(found.values(), key=lambda i: (i.shelf, i.slot, i.mac))
        if not identify:
            return infos
        results = await DeferredList(
            [Deferred.fromCoroutine(self._identify(info)) for info in infos],
            consumeErrors=True,
        )
        completed = []
        for info, (ok, result) in zip(infos, results, strict=True):
            if ok:
                completed.append(info.with_identity(result))
            else:
                _log.info(
                    "{target}: no IDENTIFY answer during discovery: {error}",
                    target=info.name,
                    error=result.getErrorMessage(),
                )
                completed.append(info)
        return completed

    async def _identify(self, info: TargetInfo) -> Identity:
        """Ask ``info``'s target for IDENTIFY DEVICE and decode the page."""
        reply = await self.protocol.request(
            info.mac, info.shelf, info.slot, Command.ISSUE_ATA_COMMAND, _identify_arg(),
            what="IDENTIFY", target=info.name,
        )
        arg = _check_ata(reply.header, info.name, "IDENTIFY")
        try:
            return parse_identify(arg.data)
        except BadReply as e:
            raise BadReply(f"{info.name}: {e}") from None

    def open(
        self,
        shelf: int,
        slot: int,
        *,
        use_lba28: bool = False,
        max_in_flight: int | None = None,
    ) -> Deferred[RemoteDisk]:
        """
        Find the target at ``shelf``.``slot`` and return it as a ``RemoteDisk``.

        The config query goes to the broadcast MAC with the target's address
        and is retransmitted like any request; the first target to answer is
        used, and asked for IDENTIFY.  Fails with ``TargetNotFound`` if no one
        answers.  ``use_lba28`` and ``max_in_flight`` are passed to the disk.
        """
        return Deferred.fromCoroutine(
            self._open(shelf, slot, use_lba28,
                       self.max_in_flight if max_in_flight is None else max_in_flight)
        )

    async def _open(
        self, shelf: int, slot: int, use_lba28: bool, max_in_flight: int
    ) -> RemoteDisk:
        name = target_name(shelf, slot)
        arg = ConfigArg(0, 0, 0, 0, ConfigCommand.READ, 0, b"")
        try:
            reply = await self.protocol.request(
                BROADCAST_MAC, shelf, slot, Command.QUERY_CONFIG_INFORMATION, arg,
                what="config query", target=name,
            )
        except AoETimeout:
            raise TargetNotFound(name, self.interface) from None
        info = TargetInfo.from_config(reply.source, reply.header)
        info = info.with_identity(await self._identify(info))
        return RemoteDisk(self.protocol, info, max_in_flight=max_in_flight, use_lba28=use_lba28)


# -- one target as a disk --------------------------------------------------------


@define(eq=False)
class _Operation:
    """A read, write or other command split into chunks; fails as a whole on the first error."""

    deferred: Deferred[Any] = field(init=False)
    progress: Callable[[int], object] | None = None
    chunks: list[_Chunk] = field(factory=list)
    results: list[bytes] = field(factory=list)
    remaining: int = 0
    failed: bool = False


@define(eq=False)
class _Chunk:
    """One frame's worth of an operation: an ATA argument and where its result goes."""

    operation: _Operation
    index: int
    arg: Callable[[], ATAArg]
    what: str
    length: int
    expect: int = 0
    request: Deferred[Reply] | None = None


class RemoteDisk:
    """
    One AoE target used as a disk: sector reads and writes over the network.

    ``read``/``write`` take LBAs and whole sectors; ``read_at``/``write_at``
    take byte offsets and any length (a write that covers part of a sector
    reads that sector first).  Every transfer is split into frames of
    ``sectors_per_frame`` sectors, and at most ``window`` of them, across all
    operations on this disk, are in flight at once.  ``peak_in_flight``
    records the most there ever were.

    Commands are 48-bit (READ/WRITE SECTORS EXT with the E flag) when the
    target's IDENTIFY advertises LBA48.  With ``use_lba28`` a transfer that
    lies wholly below 2**28 uses the 28-bit commands instead; a target
    without LBA48 always gets those.
    """

    def __init__(
        self,
        protocol: AoEClientProtocol,
        info: TargetInfo,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        use_lba28: bool = False,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.protocol = protocol
        self.info = info
        self.name = info.name
        self.use_lba28 = use_lba28
        self.window = max(1, min(info.buffer_count, max_in_flight))
        mtu_sectors = max(1, (protocol.mtu - _ATA_OVERHEAD) // SECTOR_SIZE)
        self.sectors_per_frame = max(1, min(info.sector_count, mtu_sectors,
                                            _MAX_SECTORS_PER_COMMAND))
        self.in_flight = 0
        self.peak_in_flight = 0
        self._queue: deque[_Chunk] = deque()
        self._pumping = False

    @property
    def size(self) -> int | None:
        """The disk's size in bytes, from IDENTIFY (``None`` if unknown)."""
        return self.info.size

    @property
    def sectors(self) -> int | None:
        """The disk's size in sectors (``None`` if unknown)."""
        return None if self.info.size is None else self.info.size // SECTOR_SIZE

    # -- public operations ------------------------------------------------------

    def read(
        self, lba: int, count: int, progress: Callable[[int], object] | None = None
    ) -> Deferred[bytes]:
        """
        Read ``count`` sectors from ``lba``; fires with ``count * 512`` bytes.

        ``progress``, if given, is called with the number of bytes of each
        frame as it completes.  Fails with ``ATAError`` (e.g. IDNF past the
        end of the disk), ``AoEProtocolError``, ``AoETimeout`` or ``BadReply``;
        the first failure fails the whole read and stops the rest of it.
        """
        self._check_range(lba, count)
        if count == 0:
            return succeed(b"")
        op = self._operation(progress)
        per = self.sectors_per_frame
        for index, first in enumerate(range(lba, lba + count, per)):
            n = min(per, lba + count - first)
            self._add(
                op, index, self._rw_builder(False, first, n, b""),
                f"read of LBA {first}+{n}", n * SECTOR_SIZE, expect=n * SECTOR_SIZE,
            )
        op.deferred.addCallback(lambda _: b"".join(op.results))
        self._start(op)
        return op.deferred

    def write(
        self, lba: int, data: bytes, progress: Callable[[int], object] | None = None
    ) -> Deferred[None]:
        """
        Write ``data`` (a whole number of sectors) at ``lba``; fires with ``None``.

        Fires once the target acknowledged every frame.  Failures are as for
        ``read``; frames already acknowledged when one fails stay written.
        """
        if len(data) % SECTOR_SIZE:
            raise ValueError(f"{len(data)} bytes is not a whole number of {SECTOR_SIZE}-byte "
                             "sectors")
        count = len(data) // SECTOR_SIZE
        self._check_range(lba, count)
        if count == 0:
            return succeed(None)
        view = memoryview(data)
        op = self._operation(progress)
        per = self.sectors_per_frame
        for index, first in enumerate(range(lba, lba + count, per)):
            n = min(per, lba + count - first)
            start = (first - lba) * SECTOR_SIZE
            payload = view[start : start + n * SECTOR_SIZE]
            self._add(
                op, index, self._rw_builder(True, first, n, payload),
                f"write of LBA {first}+{n}", n * SECTOR_SIZE,
            )
        op.deferred.addCallback(lambda _: None)
        self._start(op)
        return op.deferred

    def flush(self) -> Deferred[None]:
        """
        Ask the target to make every acknowledged write durable.

        The command is FLUSH CACHE EXT (0xEA) when the target's IDENTIFY
        advertises it on an LBA48 device, as libata chooses, and FLUSH CACHE
        (0xE7) otherwise: vblade advertises only the latter and aborts 0xEA.
        A reply whose status has none of BSY, DF, DRQ and ERR is success;
        vblade answers 0xE7 with status 0 (without DRDY).
        """
        ext = self.info.lba48 and self.info.flush_ext
        command = ATACmdStatus.FLUSH_EXT if ext else ATACmdStatus.FLUSH
        op = self._operation(None)
        self._add(
            op, 0, lambda: ATAArg(flag_lba48_extended=ext, cmd_status=command),
            "FLUSH CACHE", 0,
        )
        op.deferred.addCallback(lambda _: None)
        self._start(op)
        return op.deferred

    def identify(self) -> Deferred[bytes]:
        """Fire with the target's 512-byte IDENTIFY DEVICE page."""
        op = self._operation(None)
        self._add(op, 0, _identify_arg, "IDENTIFY", 0, expect=512)
        op.deferred.addCallback(lambda _: op.results[0])
        self._start(op)
        return op.deferred

    def read_at(
        self, offset: int, length: int, progress: Callable[[int], object] | None = None
    ) -> Deferred[bytes]:
        """Read ``length`` bytes from byte ``offset``, whether or not they are sector-aligned."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        first = offset // SECTOR_SIZE
        end = -(-(offset + length) // SECTOR_SIZE)
        skip = offset - first * SECTOR_SIZE
        d = self.read(first, end - first, progress)
        d.addCallback(lambda data: data[skip : skip + length])
        return d

    def write_at(
        self, offset: int, data: bytes, progress: Callable[[int], object] | None = None
    ) -> Deferred[None]:
        """
        Write ``data`` at byte ``offset``.

        A partly covered first or last sector is read first and written back
        with the new bytes in place (read-modify-write: not atomic against
        other writers of the same sector).
        """
        if offset < 0:
            raise ValueError("offset must not be negative")
        return Deferred.fromCoroutine(self._write_at(offset, bytes(data), progress))

    async def _write_at(
        self, offset: int, data: bytes, progress: Callable[[int], object] | None
    ) -> None:
        first = offset // SECTOR_SIZE
        end = -(-(offset + len(data)) // SECTOR_SIZE)
        head = offset - first * SECTOR_SIZE
        tail = end * SECTOR_SIZE - (offset + len(data))
        if not data:
            return
        if head or tail:
            edges = {first} if head else set()
            if tail:
                edges.add(end - 1)
            old = {lba: await self.read(lba, 1) for lba in sorted(edges)}
            before = old[first][:head] if head else b""
            after = old[end - 1][SECTOR_SIZE - tail :] if tail else b""
            data = before + data + after
        await self.write(first, data, progress)

    # -- the window -------------------------------------------------------------

    def _check_range(self, lba: int, count: int) -> None:
        """Refuse what no command can express; the target judges the disk's own bounds."""
        if lba < 0 or count < 0:
            raise ValueError("LBA and count must not be negative")
        limit = _LBA48_LIMIT if self.info.lba48 else _LBA28_LIMIT
        if lba + count > limit:
            raise ValueError(f"{self.name}: LBA {lba}+{count} cannot be addressed "
                             f"({'48' if self.info.lba48 else '28'}-bit LBA)")

    def _operation(self, progress: Callable[[int], object] | None) -> _Operation:
        """Start an operation; cancelling its Deferred fails it like any error."""
        op = _Operation(progress)
        op.deferred = Deferred(lambda _: self._fail(op, Failure(CancelledError())))
        return op

    def _add(
        self, op: _Operation, index: int, arg: Callable[[], ATAArg], what: str, length: int,
        expect: int = 0,
    ) -> None:
        op.chunks.append(_Chunk(op, index, arg, what, length, expect))

    def _start(self, op: _Operation) -> None:
        op.results = [b""] * len(op.chunks)
        op.remaining = len(op.chunks)
        self._queue.extend(op.chunks)
        self._pump()

    def _rw_builder(
        self, write: bool, lba: int, count: int, data: bytes | memoryview
    ) -> Callable[[], ATAArg]:
        """Return a function building the READ/WRITE argument when its frame is sent."""
        lba28 = not self.info.lba48 or (self.use_lba28 and lba + count <= _LBA28_LIMIT)

        def build() -> ATAArg:
            if lba28:
                command = ATACmdStatus.WRITE_28BIT if write else ATACmdStatus.READ_28BIT
                address = (lba & (_LBA28_LIMIT - 1)) | _LBA28_DEVICE << 24
            else:
                command = ATACmdStatus.WRITE_48BIT if write else ATACmdStatus.READ_48BIT
                address = lba
            return ATAArg(
                flag_lba48_extended=not lba28,
                flag_write=write,
                sector_count=count,
                cmd_status=command,
                lba=address,
                data=bytes(data),
            )

        return build

    def _pump(self) -> None:
        """Send queued chunks while fewer than ``window`` are in flight."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._queue and self.in_flight < self.window:
                chunk = self._queue.popleft()
                if chunk.operation.failed:
                    continue
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                info = self.info
                d = self.protocol.request(
                    info.mac, info.shelf, info.slot, Command.ISSUE_ATA_COMMAND, chunk.arg(),
                    what=chunk.what, target=self.name,
                )
                chunk.request = d
                d.addBoth(self._chunk_done, chunk)
        finally:
            self._pumping = False

    def _chunk_done(self, result: Reply | Failure, chunk: _Chunk) -> None:
        """Account for one answered (or failed) frame and send the next ones."""
        self.in_flight -= 1
        chunk.request = None
        op = chunk.operation
        if not op.failed:
            if isinstance(result, Failure):
                self._fail(op, result)
            else:
                try:
                    arg = _check_ata(result.header, self.name, chunk.what)
                    if len(arg.data) < chunk.expect:
                        raise BadReply(
                            f"{self.name}: reply to {chunk.what} carried {len(arg.data)} "
                            f"bytes, expected {chunk.expect}"
                        )
                except AoEClientError:
                    self._fail(op, Failure())
                else:
                    op.results[chunk.index] = arg.data[: chunk.expect]
                    op.remaining -= 1
                    if op.progress is not None and chunk.length:
                        op.progress(chunk.length)
                    if op.remaining == 0:
                        op.deferred.callback(None)
        self._pump()

    def _fail(self, op: _Operation, failure: Failure) -> None:
        """Fail ``op``: abandon its frames in flight, skip its queued ones, fire its Deferred."""
        if op.failed:
            return
        op.failed = True
        for chunk in op.chunks:
            if chunk.request is not None:
                chunk.request.cancel()
        if not op.deferred.called:
            op.deferred.errback(failure)
