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
  other's replies;
- several paths, as the Linux driver uses them (``aoecmd.c``): one client
  may own several local interfaces (``AoEClient.listen(["eth0", "eth1"])``),
  and every server MAC that answers a target's config query on one of them
  is a ``Path`` (local interface, server MAC) of that target.  Requests are
  spread over the live paths round robin, each path keeping at most its own
  window in flight (no more than its advertised buffer count; halved by a
  timeout, grown back by one per window of answers).  A request that times
  out is sent again with a new tag on *another* live path; a path with
  ``PathPolicy.dead_after`` timeouts in a row is dead, is left out, and is
  probed with a config query every ``probe_interval`` while the disk is busy
  until it answers again.  A request completes exactly once: its old tags
  are retired, so a late reply on the path it left is stale.

Four layers: ``AoEClientProtocol`` owns tags, timers and retransmission
over any transport with ``write(frame)`` (an ``aoe_twisted.net.port.AoEPort``
or a test fake), one per local interface (``Link``); ``PathSet`` owns a
target's paths and chooses one for each frame; ``AoEClient`` discovers and
opens targets; ``RemoteDisk`` reads and writes one target with a window of
requests in flight.  Failures
are exceptions whose ``str()`` is one line naming the target and the
operation: ``AoETimeout``, ``AoEProtocolError`` (an AoE error code),
``ATAError`` (ATA status and error bits, named ABRT/IDNF/UNC),
``TargetNotFound`` and ``BadReply``.
"""

from __future__ import annotations

import errno
import random
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define, evolve, field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from aoe_twisted.core.wire import (
    ATA_ARG_SIZE,
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ETHERNET_HEADER_SIZE,
    ETHERTYPE,
    HEADER_SIZE,
    MIN_FRAME_SIZE,
    SECTOR_SIZE,
    VERSION,
    ATAArg,
    ATACmdStatus,
    ATAFlag,
    Command,
    ConfigArg,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    Error,
    EthernetFrame,
    Header,
    MACMaskArg,
    MACMaskCommand,
    MACMaskError,
    ReserveReleaseArg,
    ReserveReleaseCommand,
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
    "ConfigMismatch",
    "ConfigStringPresent",
    "Identity",
    "Link",
    "MaskEdit",
    "MaskEditError",
    "Path",
    "PathPolicy",
    "PathSet",
    "RemoteDisk",
    "Reply",
    "RetryPolicy",
    "TargetControl",
    "TargetInfo",
    "TargetNotFound",
    "TargetReserved",
    "parse_identify",
    "target_name",
]

_log = Logger()

#: Tag bit 31: set on every tag this client sends.  The Linux initiator leaves
#: it clear and ignores replies that have it, keeping that half for user space.
CLIENT_TAG_BIT = 0x8000_0000
_TAG_COUNTER_MASK = 0x7FFF_FFFF

#: The cap on requests in flight on one path, whatever its buffer count
#: (the Linux driver caps at 64 too).
DEFAULT_MAX_IN_FLIGHT = 64
#: A path is dead after this many timeouts in a row with no answer between them.
#: One lost frame is a timeout; three in a row is a path that stopped answering
#: (a link that goes down with frames in flight counts one per frame, at once).
DEFAULT_DEAD_AFTER = 3
#: How often a dead path, or a local interface with no path, is probed (seconds).
DEFAULT_PROBE_INTERVAL = 1.0
#: After the first interface finds the target, ``open`` waits at most this long
#: for the other interfaces' answers (replies after that still add paths).
DEFAULT_PATH_WAIT = 0.25

#: Where a message's tag starts, and its encoding (a 4-byte tag, as a number).
_TAG_AT = 6
_TAG = struct.Struct("!I")
_ETHERTYPE_BYTES = ETHERTYPE.to_bytes(2, "big")
#: A frame's bytes before an AoE message's argument: Ethernet and AoE headers.
_BEFORE_ARG = ETHERNET_HEADER_SIZE + HEADER_SIZE
#: The fixed fields of an ATA reply, as ``AoEClientProtocol.datagramReceived`` reads
#: them without decoding the message: EtherType, version and flags, major,
#: minor, command, tag; then the ATA argument's error and status registers
#: and its reserved bytes (the other fields are skipped); the sectors follow.
_ATA_REPLY = struct.Struct("!12xHBxHBBI xBxB6xH")
_ATA_REPLY_SIZE = _ATA_REPLY.size
#: Version 1 with the response flag and nothing else: an answer, not an error.
_ANSWER = VERSION << 4 | 0x08
_ATA_COMMAND = int(Command.ISSUE_ATA_COMMAND)
#: An ATA request's AoE header before its tag: version and flags, error, major,
#: minor, command; its argument (``ATAArg``), and the AFlags bits it sets.
_ATA_HEAD = struct.Struct("!BBHBB")
_ATA_ARG = struct.Struct("<BBBB6sH")
_AFLAG_LBA48 = int(ATAFlag.LBA48_EXTENDED)
_AFLAG_WRITE = int(ATAFlag.WRITE)
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

    def __init__(
        self, code: int, target: str = "", what: str = "request", reply: Header | None = None,
        message: str | None = None,
    ) -> None:
        try:
            self.code: Error | int = Error(code)
        except ValueError:
            self.code = code
        self.target = target
        self.what = what
        #: The error reply itself (its argument may say more, e.g. the current config string).
        self.reply = reply
        text = _AOE_ERROR_TEXT.get(self.code, "unknown error")  # type: ignore[call-overload]
        prefix = f"{target}: " if target else ""
        super().__init__(
            prefix + (message or f"{what} refused: AoE error {int(code)} ({text})")
        )


class ConfigStringPresent(AoEProtocolError):
    """
    A config SET was refused (AoE error 4): the target already holds another string.

    ``current`` is the string the target holds, as its error reply says
    (``None`` if the reply did not carry it).  FORCE_SET replaces it anyway.
    """

    def __init__(self, current: bytes | None, target: str = "", reply: Header | None = None,
                 ) -> None:
        self.current = current
        shown = "" if current is None else f": {_string_text(current)}"
        super().__init__(Error.CONFIG_STRING_PRESENT, target, "config set", reply,
                         f"config string already set{shown}")


class TargetReserved(AoEProtocolError):
    """
    A request was refused with AoE error 6: the target is reserved by other hosts.

    ``reserved_by`` lists the reserve list's MACs when the reply carried it
    (a reserve SET's error reply does; an ATA command's does not).
    """

    def __init__(self, reserved_by: tuple[bytes, ...], target: str = "", what: str = "request",
                 reply: Header | None = None) -> None:
        self.reserved_by = reserved_by
        hosts = ", ".join(format_mac(mac) for mac in reserved_by) or "another host"
        super().__init__(Error.TARGET_IS_RESERVED, target, what, reply,
                         f"target is reserved by {hosts}")


_MASK_ERROR_TEXT = {
    MACMaskError.UNSPECIFIED: "unspecified error",
    MACMaskError.BAD_COMMAND: "bad directive command",
    MACMaskError.LIST_FULL: "mask list full",
}


class MaskEditError(AoEClientError):
    """
    A MAC mask list edit stopped at one directive (AoEr11 section 3.3: MError, not an AoE error).

    ``error`` is the ``MACMaskError`` (or raw number); ``index`` the position
    of the directive that stopped the edit (0-based; every directive before it
    was applied) and ``directive`` that directive, if the request had it.
    """

    def __init__(self, error: int, index: int, directive: Directive | None,
                 target: str = "") -> None:
        try:
            self.error: MACMaskError | int = MACMaskError(error)
        except ValueError:
            self.error = error
        self.index = index
        self.directive = directive
        self.target = target
        text = _MASK_ERROR_TEXT.get(self.error, f"error {int(error)}")  # type: ignore[call-overload]
        at = f"at MAC {index + 1}"
        if directive is not None:
            at += f", {format_mac(directive.mac)}"
        applied = f"; the {index} before it were applied" if index else ""
        prefix = f"{target}: " if target else ""
        super().__init__(f"{prefix}{text} ({at}){applied}")


class ConfigMismatch(AoEClientError):
    """
    A config TEST or TEST_PREFIX got no answer: the target's string does not match.

    AoEr11 has the target stay silent on a mismatch, so this is a timeout by
    another name: it comes only after every retry, and a target that stopped
    answering looks the same.
    """

    def __init__(self, target: str, prefix: bool, string: bytes, waited: float) -> None:
        self.target = target
        self.string = string
        self.waited = waited
        kind = "start with" if prefix else "equal"
        super().__init__(f"{target}: no answer in {waited:.1f} s: the config string does not "
                         f"{kind} {_string_text(string)}")


def _string_text(value: bytes) -> str:
    """Show a config string in a message: quoted, binary bytes escaped."""
    return repr(value.decode("utf-8", "backslashreplace"))


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
    it answered from and ``interface`` the local interface that heard it
    (empty if unknown).  ``size`` (bytes) and the IDENTIFY fields are ``None``
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
    interface: str = ""

    @property
    def name(self) -> str:
        """The target's name, ``eSHELF.SLOT``."""
        return target_name(self.shelf, self.slot)

    @classmethod
    def from_config(cls, src: bytes, header: Header, interface: str = "") -> TargetInfo:
        """Build the info in a config reply ``header`` from MAC ``src`` heard on ``interface``."""
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
            interface=interface,
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
    """
    One outstanding request and the state of its retransmission.

    The message is kept encoded, as the bytes before and after the tag
    (``head``: version and flags to command; ``body``: the argument, padded
    so that the frame is at least 60 bytes), so each copy is the same frame
    with a new tag.  ``command``, ``major`` and ``minor`` are what a reply
    must match.  A request of a ``RemoteDisk`` has no Deferred: its answer or
    failure goes straight to ``sink`` (the disk) with its ``chunk``.
    """

    dst: bytes
    head: bytes
    body: bytes
    command: int
    major: int
    minor: int
    what: str
    target: str
    deferred: Deferred[Reply] | None = None
    attempts: int = 0
    timeout: float = 0.0
    waited: float = 0.0
    tag: int | None = None
    #: The deadlines of the copy in flight (its timer), if one is.
    deadlines: _Deadlines | None = None
    #: The retry policy of this request (the protocol's unless given).
    retry: RetryPolicy | None = None
    #: The target's paths, for a request that may move from one path to another.
    paths: PathSet | None = None
    #: The path the current copy went out on (it counts in that path's in-flight).
    path: Path | None = None
    #: When the current copy was sent, for the path's round-trip time.
    sent_at: float = 0.0
    #: The protocol whose tag the current copy carries.
    owner: Any = None
    #: The disk that gets the answer instead of a Deferred, and the chunk it is for.
    sink: RemoteDisk | None = None
    chunk: _Chunk | None = None

    def settle(self, result: Reply | Failure | Exception) -> None:
        """
        Give the answer or failure to whoever waits: the Deferred, or the disk.

        Called once the request is forgotten, so the room it had on its path is
        free: the disk sends into it once it has accounted for the answer (its
        pump); for a request of no disk, retransmissions held for room
        (``PathSet.release``) go once the Deferred has fired.
        """
        sink = self.sink
        if sink is not None:
            assert self.chunk is not None
            sink._chunk_done(
                Failure(result) if isinstance(result, Exception) else result, self.chunk
            )
            return
        assert self.deferred is not None
        if isinstance(result, Reply):
            self.deferred.callback(result)
        else:
            self.deferred.errback(result)
        if self.paths is not None:
            self.paths.release()


#: Deadlines within this much of the present are due: a timer set for a
#: deadline ``d`` as ``callLater(d - now)`` may fire a rounding error before ``d``.
_DEADLINE_SLACK = 1e-6


@define(eq=False)
class _Deadlines:
    """
    The requests in flight that wait ``timeout`` seconds, in the order they were sent.

    One ``DelayedCall`` (``call``) serves all of them rather than one per
    request: as they all wait the same time, the order they were sent in is
    the order of their deadlines, so the timer only ever needs the oldest
    one's (as ``server.py``'s backend deadlines do).  A request answered
    before the oldest one leaves the timer as it is; when it fires early it
    is set again for the oldest left, and when the last one is answered it
    is cancelled.
    """

    timeout: float
    requests: dict[_Request, float] = field(factory=dict)
    call: IDelayedCall | None = None

    def cancel(self) -> None:
        """Cancel the timer (nothing left to wait for)."""
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None


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

    ``config_observers`` are called with ``(source MAC, header)`` for every
    config reply to one of our tags (answered, stale or gathered), so that a
    ``PathSet`` learns of every server MAC that answers on this interface.
    ``closing`` is set by ``AoEClient.close``: a port that stops without it
    went away under us, and requests that can move to another path do.
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
        self.closing = False
        self.config_observers: list[Callable[[bytes, Header], object]] = []
        # The timers of the requests in flight, one per timeout (``_Deadlines``).
        self._deadlines: dict[float, _Deadlines] = {}
        # Our MAC and the EtherType, as the transport ``_source_of`` gave them.
        self._source_of: object = None
        self._source_bytes = b""

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
        """
        Send ``header`` to ``dst`` as one Ethernet frame, padded to 60 bytes.

        @raise OSError: ``ENETDOWN`` if the port is closed (its interface went away).
        """
        if self.transport is None:
            raise OSError(errno.ENETDOWN, "the port is closed")
        self._write(EthernetFrame(dst, self.mac, ETHERTYPE, header.to_bytes()).to_bytes(pad=True))

    def _write(self, frame: bytes) -> None:
        """
        Send ``frame`` (whole, padded) and count it.

        @raise OSError: ``ENETDOWN`` if the port is closed (its interface went away).
        """
        transport = self.transport
        if transport is None:
            raise OSError(errno.ENETDOWN, "the port is closed")
        transport.write(frame)  # type: ignore[attr-defined]
        self.frames_sent += 1

    def _source(self) -> bytes:
        """
        Return the frame bytes after the destination MAC: our MAC and the EtherType.

        Kept for as long as the transport is the same one (a reopened port
        may have another MAC), rather than asked of the transport per frame.

        @raise OSError: ``ENETDOWN`` if the port is closed (its interface went away).
        """
        transport = self.transport
        if transport is None:
            raise OSError(errno.ENETDOWN, "the port is closed")
        if transport is not self._source_of:
            mac = self.mac
            if len(mac) != 6:
                raise WireError("a MAC address must be 6 bytes")
            self._source_bytes = mac + _ETHERTYPE_BYTES
            self._source_of = transport
        return self._source_bytes

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
        retry: RetryPolicy | None = None,
        paths: PathSet | None = None,
        path: Path | None = None,
    ) -> Deferred[Reply]:
        """
        Send a request and return a Deferred that fires with its ``Reply``.

        ``dst`` may be the broadcast MAC (to find a target by address).  The
        reply must carry the same command and, unless ``major``/``minor``
        are wildcards, the same address.  Fails with ``AoEProtocolError`` if
        the reply has the error flag and ``AoETimeout`` if the retry policy
        (``retry``, else the protocol's) runs out; cancelling the Deferred
        abandons the request.  ``what`` and ``target`` name the request in
        those errors.

        With ``paths`` and ``path`` (a path of ``paths`` on this protocol's
        interface, whose MAC is ``dst``) the request counts in that path's
        in-flight and round-trip time, and each retransmission goes where
        ``paths.reroute`` says: another live path if there is one, with a new
        tag on that path's protocol.
        """
        if len(dst) != 6:
            raise WireError("a MAC address must be 6 bytes")
        message = Header(VERSION, False, False, 0, major, minor, command, bytes(4), arg).to_bytes()
        request = _Request(
            dst, message[:_TAG_AT], _padded(message[HEADER_SIZE:]), command, major, minor,
            what, target or target_name(major, minor),
        )
        request.retry = retry or self.retry
        request.paths = paths
        request.path = path
        request.deferred = Deferred(lambda _: request.owner._abandon(request))
        request.timeout = request.retry.initial_timeout
        self._transmit(request)
        return request.deferred

    def _transmit(self, request: _Request) -> None:
        """
        Send (again) ``request`` under a new tag of this protocol and start its timer.

        Once the client is closing nothing more is sent: the request fails at
        once (a disk's queued operations too, as their turn comes), rather
        than waiting for answers on a closed port until its retries run out.
        """
        if self.closing:
            request.path = None
            request.settle(
                AoEClientError(f"{request.target}: {request.what} abandoned: the client closed")
            )
            return
        tag = self._new_tag()
        request.tag = tag
        request.attempts += 1
        request.owner = self
        self._pending[tag] = request
        now = request.sent_at = self.reactor.seconds()
        path = request.path
        if path is not None:
            path.in_flight += 1
            path.sent += 1
        self._arm(request, now)
        try:
            self._write(
                b"".join((request.dst, self._source(), request.head, _TAG.pack(tag),
                          request.body))
            )
        except OSError as e:
            if request.paths is not None and e.errno == errno.ENETDOWN:
                # The interface is gone for now: this copy is lost like a frame on
                # a cut wire, and its timer moves the request to another path.
                return
            # The port itself drops a frame the kernel has no room for (the timer
            # then resends it); what it raises will not get better by retrying.
            self._forget(request)
            request.settle(
                AoEClientError(f"{request.target}: cannot send {request.what}: {e.strerror or e}")
            )

    def _arm(self, request: _Request, now: float) -> None:
        """Start ``request``'s timer: its deadline joins those of its timeout (``_Deadlines``)."""
        timeout = request.timeout
        deadlines = self._deadlines.get(timeout)
        if deadlines is None:
            deadlines = self._deadlines[timeout] = _Deadlines(timeout)
        deadlines.requests[request] = now + timeout
        request.deadlines = deadlines
        if deadlines.call is None:
            deadlines.call = self.reactor.callLater(timeout, self._expire_due, deadlines)

    def _expire_due(self, deadlines: _Deadlines) -> None:
        """
        A timer fired: expire every request of ``deadlines`` whose deadline came.

        Then set the timer again for the oldest one left (the order they were
        sent in is the order of their deadlines), if one is.
        """
        deadlines.call = None
        requests = deadlines.requests
        now = self.reactor.seconds()
        while requests:
            request, deadline = next(iter(requests.items()))
            if deadline > now + _DEADLINE_SLACK:
                break
            del requests[request]
            request.deadlines = None
            self._expire(request)
        # Expiring may have sent requests that set a timer for themselves (later
        # than the oldest left): the timer is for the oldest.
        deadlines.cancel()
        if requests:
            deadline = next(iter(requests.values()))
            # The clock again: expiring (resending) took time of its own.
            now = self.reactor.seconds()
            deadlines.call = self.reactor.callLater(max(0.0, deadline - now), self._expire_due,
                                                    deadlines)

    @staticmethod
    def _disarm(request: _Request) -> None:
        """Stop ``request``'s timer: take it out of its deadlines (cancel theirs if it was last)."""
        deadlines = request.deadlines
        if deadlines is not None:
            request.deadlines = None
            requests = deadlines.requests
            del requests[request]
            if not requests:
                deadlines.cancel()

    def _forget(self, request: _Request) -> None:
        """Drop ``request``'s tag, timer and path: it is answered, given up, moved or abandoned."""
        if request.tag is not None:
            self._pending.pop(request.tag, None)
            request.tag = None
        if request.deadlines is not None:
            self._disarm(request)
        if request.path is not None:
            request.path.in_flight -= 1
            request.path = None

    def _expire(self, request: _Request) -> None:
        """No reply in time: retransmit with a new tag (on another path if any), or give up."""
        request.waited += request.timeout
        failed = request.path
        self._forget(request)
        paths = request.paths
        if paths is not None and failed is not None:
            paths.timed_out(failed)
        retry = request.retry or self.retry
        if request.attempts > retry.retries:
            request.settle(
                AoETimeout(request.target, request.what, request.attempts, request.waited)
            )
            return
        request.timeout = min(request.timeout * 2, retry.max_timeout)
        self.retransmits += 1
        if paths is None:
            _log.debug(
                "{target}: no answer to {what}, sending it again (try {attempt})",
                target=request.target,
                what=request.what,
                attempt=request.attempts + 1,
            )
            self._transmit(request)
            return
        path = paths.reroute(failed)
        if path is None:
            # Every other live path's window is full: wait for room rather than
            # overflow a server's buffers (they would drop it).
            paths.hold(request)
            return
        request.path = path
        request.dst = path.mac
        _log.debug(
            "{target}: no answer to {what}, sending it again on {path} (try {attempt})",
            target=request.target,
            what=request.what,
            path=path.describe(),
            attempt=request.attempts + 1,
        )
        path.protocol._transmit(request)
        if path is not failed:
            # The copy that timed out left room on ``failed``: a retransmission held
            # earlier may take it now rather than wait for the next reply.
            paths.release()

    def _abandon(self, request: _Request) -> None:
        """
        The caller cancelled: forget the request; its Deferred fails with CancelledError.

        A disk's request leaves its room to the disk, which sends into it once it
        has accounted for the failure (its pump); another's releases held
        retransmissions at once.
        """
        self._forget(request)
        paths = request.paths
        if paths is not None:
            paths.drop(request)
            if request.sink is None:
                paths.release()

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

        The common case, a disk's ATA request answered without an error, is
        read from the frame's fixed fields (the tag first, to find the
        request) and handed to the disk without decoding the message into
        objects; everything else is decoded in full (``_received``).
        """
        if len(datagram) >= _ATA_REPLY_SIZE:
            (ethertype, verflags, major, minor, command, tag, error, status, reserved,
             ) = _ATA_REPLY.unpack_from(datagram)
            if ethertype == ETHERTYPE and verflags == _ANSWER and command == _ATA_COMMAND:
                request = self._pending.get(tag)
                if (
                    request is not None
                    and request.sink is not None
                    and not reserved
                    and request.command == _ATA_COMMAND
                    and request.major in (BROADCAST_MAJOR, major)
                    and request.minor in (BROADCAST_MINOR, minor)
                ):
                    path = request.path
                    self._forget(request)
                    paths = request.paths
                    if path is not None and paths is not None:
                        paths.answered(path, self.reactor.seconds() - request.sent_at)
                    assert request.chunk is not None
                    request.sink._chunk_answered(
                        request.chunk, status, error, bytes(datagram[_ATA_REPLY_SIZE:])
                    )
                    return
        self._received(datagram)

    def _received(self, datagram: bytes) -> None:
        """Decode a frame in full and match it to the request or query it answers."""
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
        is_config = (
            header.command == Command.QUERY_CONFIG_INFORMATION
            and not header.flag_error
            and header.major != BROADCAST_MAJOR
            and header.minor != BROADCAST_MINOR
        )
        if is_config:
            for observe in list(self.config_observers):
                observe(ethernet.src, header)
        replies = self._collectors.get(tag)
        if replies is not None:
            if is_config:
                replies.append((ethernet.src, header))
            else:
                self.ignored += 1
            return
        request = self._pending.get(tag)
        if request is None:
            self.stale_replies += 1
            return
        if header.command != request.command or not (
            request.major in (BROADCAST_MAJOR, header.major)
            and request.minor in (BROADCAST_MINOR, header.minor)
        ):
            self.ignored += 1
            _log.debug(
                "ignoring a reply from {source} that does not match {what}",
                source=format_mac(ethernet.src),
                what=request.what,
            )
            return
        path = request.path
        self._forget(request)
        if path is not None and request.paths is not None:
            # Any answer, even an AoE error, shows the path carries frames both ways.
            request.paths.answered(path, self.reactor.seconds() - request.sent_at)
        if header.flag_error:
            request.settle(AoEProtocolError(header.error, request.target, request.what, header))
            return
        request.settle(Reply(ethernet.src, header))

    def stopProtocol(self) -> None:
        """
        The port closed: abandon every outstanding request and query.

        Unless the client is closing, a request that can move to another path
        (one of a ``RemoteDisk``'s) is not abandoned: it counts as timed out
        on its path and goes out again on another, as when a link is cut.
        """
        for tag, request in list(self._pending.items()):
            if self._pending.get(tag) is not request:
                continue  # answered or cancelled by an earlier one's failure
            if request.paths is not None and not self.closing:
                self._disarm(request)
                self._expire(request)
                continue
            self._forget(request)
            request.settle(
                AoEClientError(f"{request.target}: {request.what} abandoned: the port closed")
            )
        for collector_tag in list(self._collectors):
            self._collectors.pop(collector_tag, None)


# -- paths: local interfaces and server MACs -------------------------------------


def _padded(body: bytes) -> bytes:
    """Return a message's bytes after its tag, zero-filled so that its frame is 60 bytes or more."""
    short = MIN_FRAME_SIZE - _BEFORE_ARG - len(body)
    return body + bytes(short) if short > 0 else body


def _mtu_sectors(mtu: int) -> int:
    """Return how many sectors one frame carries at ``mtu``."""
    return max(1, (mtu - _ATA_OVERHEAD) // SECTOR_SIZE)


@frozen
class PathPolicy:
    """
    When a path counts as dead and how often a dead one is tried again.

    A path is dead after ``dead_after`` timeouts in a row with no answer in
    between; while a target's disk is busy, each dead path is sent a config
    query every ``probe_interval`` seconds, and the first answer on it brings
    it back.  A local interface where no path was found is probed the same
    way (a broadcast config query), and one whose port closed is reopened.
    """

    dead_after: int = field(default=DEFAULT_DEAD_AFTER)
    probe_interval: float = field(default=DEFAULT_PROBE_INTERVAL)

    @dead_after.validator
    def _check_dead_after(self, attribute: object, value: int) -> None:
        if value < 1:
            raise ValueError(f"dead_after must be at least 1, not {value!r}")

    @probe_interval.validator
    def _check_probe_interval(self, attribute: object, value: float) -> None:
        if not value > 0:
            raise ValueError(f"probe_interval must be positive, not {value!r}")


@define(eq=False)
class Link:
    """
    One local interface of a client: its name, its protocol and port, how to reopen it.

    ``opener(protocol)`` opens a new port for ``protocol`` (``AoEClient.listen``
    gives one); without it a link whose port closed stays down.  ``up`` is
    whether the protocol has a port now.
    """

    name: str
    protocol: AoEClientProtocol
    port: Any = None
    opener: Callable[[AoEClientProtocol], Any] | None = None
    reopened: int = 0
    next_reopen: float | None = None

    @property
    def up(self) -> bool:
        """Whether the protocol is connected to a port."""
        return self.protocol.transport is not None

    def reopen(self) -> bool:
        """Open a new port if this one closed under us (and may be); return whether it is up."""
        if self.up or self.opener is None or self.protocol.closing:
            return self.up
        try:
            self.port = self.opener(self.protocol)
        except (CannotListenError, OSError) as e:
            _log.debug("{interface} still cannot be opened: {error}", interface=self.name, error=e)
            return False
        self.reopened += 1
        _log.info("{interface}: port open again", interface=self.name)
        return self.up


@define(eq=False)
class Path:
    """
    One way to a target: a local interface (``link``) and a server MAC that answered on it.

    ``max_window`` is the most requests it may have in flight: its config
    reply's buffer count, capped by the client's ``max_in_flight``;
    ``window`` the present limit (halved by each timeout, grown back by one
    for each window's worth of answers).  ``timeouts`` counts timeouts in a
    row; ``dead`` is set after ``PathPolicy.dead_after`` of them.  ``srtt``
    is the smoothed round-trip time in seconds (``None`` before an answer).
    ``sent``, ``answered``, ``timeouts_total`` and ``deaths`` count frames
    sent, answers, timeouts and the times it was declared dead.
    """

    link: Link
    mac: bytes
    buffer_count: int
    sector_count: int
    max_window: int
    window: int
    in_flight: int = 0
    srtt: float | None = None
    rttvar: float = 0.0
    timeouts: int = 0
    dead: bool = False
    sent: int = 0
    answered: int = 0
    timeouts_total: int = 0
    deaths: int = 0
    next_probe: float = 0.0
    probe: Deferred[Reply] | None = None
    growth: int = 0

    @property
    def interface(self) -> str:
        """The local interface's name."""
        return self.link.name

    @property
    def protocol(self) -> AoEClientProtocol:
        """The protocol that sends and receives this path's frames."""
        return self.link.protocol

    @property
    def usable(self) -> bool:
        """Neither dead nor on an interface whose port is closed."""
        return not self.dead and self.link.up

    def describe(self) -> str:
        """Return ``eth0 -> 02:00:00:00:00:01``."""
        return f"{self.interface or '?'} -> {format_mac(self.mac)}"

    def state(self) -> str:
        """Return one line on this path: state, window, frames, timeouts, round-trip time."""
        status = "dead" if self.dead else ("up" if self.link.up else "interface down")
        rtt = "-" if self.srtt is None else f"{self.srtt * 1e3:.2f} ms"
        return (
            f"{self.describe()}: {status}, window {self.window}/{self.max_window}, "
            f"{self.sent} frames sent, {self.answered} answered, "
            f"{self.timeouts_total} timed out, rtt {rtt}"
        )


class PathSet:
    """
    The paths to one target, and which one each frame takes.

    ``offer`` adds a path for each (local interface, server MAC) whose config
    reply it is shown, or brings a dead one back.  ``choose`` returns the
    next path with room in its window, round robin over the live ones (all
    of them, when none is live: the retry policy then decides), or ``None``
    when all are full; ``reroute`` picks the path for a retransmission:
    another live one if there is any, or ``None`` when those are all full:
    the retransmission is then held (``hold``) and sent by ``release``
    (or ``choose``) as soon as room appears.  ``answered`` and ``timed_out``
    keep each path's window, round-trip time and consecutive timeouts.

    A path whose frames are smaller than ``sectors_per_frame`` (the disk's,
    fixed when it opened) is not used.  ``on_change`` (the disk's pump) is
    called when a config reply adds a path or brings one back (a path that
    comes back by answering a request gets it from the disk's accounting of
    that answer).  ``failovers`` counts the retransmissions that moved to
    another path.
    """

    def __init__(
        self,
        shelf: int,
        slot: int,
        links: Sequence[Link],
        *,
        reactor: IReactorTime,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        policy: PathPolicy | None = None,
    ) -> None:
        self.shelf = shelf
        self.slot = slot
        self.name = target_name(shelf, slot)
        self.links = list(links)
        self.reactor = reactor
        self.max_in_flight = max_in_flight
        self.policy = policy or PathPolicy()
        self.paths: list[Path] = []
        self.sectors_per_frame: int | None = None
        self.on_change: Callable[[], object] | None = None
        self.failovers = 0
        self._held: deque[_Request] = deque()
        # Whether held retransmissions are being sent (``_send_held`` does not run
        # inside itself) or failed (``stop``).
        self._sending_held = False
        self._next = 0
        self._link_probes: dict[int, float] = {}
        self._observers: list[tuple[AoEClientProtocol, Callable[[bytes, Header], object]]] = []

    # -- learning paths -------------------------------------------------------

    def watch(self) -> None:
        """Hear every config reply on every link from now on (``offer``)."""
        for link in self.links:

            def observe(src: bytes, header: Header, link: Link = link) -> None:
                self.offer(link, src, header)

            link.protocol.config_observers.append(observe)
            self._observers.append((link.protocol, observe))

    def unwatch(self) -> None:
        """Stop hearing config replies."""
        for protocol, observe in self._observers:
            if observe in protocol.config_observers:
                protocol.config_observers.remove(observe)
        self._observers.clear()

    def find(self, link: Link, mac: bytes) -> Path | None:
        """Return the path through ``link`` to ``mac``, if known."""
        for path in self.paths:
            if path.link is link and path.mac == mac:
                return path
        return None

    def add(self, link: Link, mac: bytes, buffer_count: int, sector_count: int) -> Path | None:
        """Add the path through ``link`` to ``mac`` (or return it if known); ``None`` if unfit."""
        path = self.find(link, mac)
        if path is not None:
            return path
        carries = min(sector_count, _mtu_sectors(link.protocol.mtu))
        if self.sectors_per_frame is not None and carries < self.sectors_per_frame:
            _log.warn(
                "{target}: not using {interface} -> {mac}: it carries {carries} sectors a "
                "frame, the disk sends {per}",
                target=self.name, interface=link.name, mac=format_mac(mac), carries=carries,
                per=self.sectors_per_frame,
            )
            return None
        window = max(1, min(buffer_count, self.max_in_flight))
        path = Path(link, mac, buffer_count, sector_count, window, window)
        self.paths.append(path)
        if len(self.paths) > 1:
            _log.info("{target}: path {path} added ({count} paths)", target=self.name,
                      path=path.describe(), count=len(self.paths))
        return path

    def offer(self, link: Link, src: bytes, header: Header) -> Path | None:
        """A config reply from ``src`` heard on ``link``: add its path, or revive it."""
        arg = header.arg
        if (header.major, header.minor) != (self.shelf, self.slot) or not isinstance(
            arg, ConfigArg
        ):
            return None
        known = self.find(link, src)
        path = self.add(link, src, arg.buffer_count, arg.sector_count or 2)
        if path is None:
            return None
        if path.dead:
            self._revive(path)
        elif known is not None:
            return path
        if self.on_change is not None:
            self.on_change()
        return path

    # -- choosing -------------------------------------------------------------

    def usable(self) -> list[Path]:
        """The live paths; if none is, every path (requests then wait for the retry policy)."""
        live = [p for p in self.paths if p.usable]
        if live:
            return live
        return [p for p in self.paths if p.link.up] or list(self.paths)

    @property
    def window(self) -> int:
        """How many requests the usable paths may have in flight together now."""
        return sum(p.window for p in self.usable())

    @property
    def in_flight(self) -> int:
        """How many requests are in flight on all paths."""
        return sum(p.in_flight for p in self.paths)

    def has_room(self, path: Path) -> bool:
        """
        Whether ``path`` may take one more request.

        Its window must have room, and the server MAC's buffer count must too:
        two local interfaces reaching one server MAC share that MAC's buffers.
        """
        if path.in_flight >= path.window:
            return False
        same_mac = sum(p.in_flight for p in self.paths if p.mac == path.mac)
        return same_mac < max(1, path.buffer_count)

    def choose(self) -> Path | None:
        """
        Return the next usable path with room, round robin; ``None`` if all are full.

        Retransmissions waiting for room (``hold``) are sent first: while one
        waits, no new frame gets a path.
        """
        self.probe_due()
        self._send_held()
        if self._held:
            return None
        return self._next_with_room()

    def _next_with_room(self) -> Path | None:
        """The next usable path with room, round robin."""
        paths = self.paths
        if len(paths) == 1:
            # What the loop below does with one path, which is usable whatever its
            # state (``usable`` falls back to every path) and shares its MAC's
            # buffers with no other.
            path = paths[0]
            self._next = 0
            if path.in_flight < path.window and path.in_flight < max(1, path.buffer_count):
                return path
            return None
        candidates = self.usable()
        count = len(candidates)
        for i in range(count):
            path = candidates[(self._next + i) % count]
            if self.has_room(path):
                self._next = (self._next + i + 1) % count
                return path
        return None

    def reroute(self, failed: Path | None) -> Path | None:
        """
        Return the path for a retransmission after ``failed`` timed out.

        Another live path with room if there is one (the least loaded);
        ``None`` if there are others but all are full (the caller then
        ``hold``s the request); with no other live path, ``failed`` itself
        (or any path).
        """
        self.probe_due()
        others = [p for p in self.paths if p.usable and p is not failed]
        if others:
            roomy = [p for p in others if self.has_room(p)]
            if failed is not None:
                self.failovers += 1
            if not roomy:
                return None
            return min(roomy, key=lambda p: p.in_flight / p.window)
        if failed is not None and failed in self.paths:
            return failed
        return self.usable()[0]

    def hold(self, request: _Request) -> None:
        """
        Keep a retransmission until a path has room.

        It has no timer while held: whatever frees room sends it (``release``,
        or ``choose``, which sends held ones before any new frame).  Some other
        path is full when a request is held, so a request is in flight whose
        answer, timeout or failure frees room.
        """
        self._held.append(request)

    def drop(self, request: _Request) -> None:
        """Forget a held retransmission (its caller gave up on it)."""
        if request in self._held:
            self._held.remove(request)

    def release(self) -> None:
        """
        Room may have appeared on a path: send the held retransmissions that fit now.

        Called wherever room is freed (a reply accounted for, a copy timed out
        and moved, a request failed or abandoned, a path back) whether or not
        new frames wait: a held retransmission has no timer of its own.
        """
        if self._held:
            self.probe_due()
            self._send_held()

    def _send_held(self) -> None:
        """
        Send held retransmissions, in the order they were held, each on the next
        usable path with room.

        Sending may fail at once and fail its operation, whose disk then pumps
        and lands here again: that inner call returns at once, and this loop,
        which looks for room again after each send, carries on in order.
        """
        if self._sending_held:
            return
        self._sending_held = True
        try:
            held = self._held
            while held:
                path = self._next_with_room()
                if path is None:
                    return
                request = held.popleft()
                request.path = path
                request.dst = path.mac
                path.protocol._transmit(request)
        finally:
            self._sending_held = False

    # -- what happened --------------------------------------------------------

    def answered(self, path: Path, rtt: float) -> None:
        """
        A reply came on ``path`` after ``rtt`` seconds: it is alive; its window may grow.

        Called before the reply is accounted for, so it sends nothing itself
        (a frame failing to go at once would fail an operation whose answered
        chunk is not yet counted): whoever accounts for the reply then sends
        into the room (the disk's pump, or ``_Request.settle``).
        """
        path.answered += 1
        path.timeouts = 0
        if path.srtt is None:
            path.srtt, path.rttvar = rtt, rtt / 2
        else:
            path.rttvar += (abs(path.srtt - rtt) - path.rttvar) / 4
            path.srtt += (rtt - path.srtt) / 8
        if path.dead:
            self._revive(path)
            return
        path.growth += 1
        if path.growth >= path.window and path.window < path.max_window:
            path.window += 1
            path.growth = 0

    def timed_out(self, path: Path) -> None:
        """A request on ``path`` got no reply in time: halve its window; dead after too many."""
        path.timeouts += 1
        path.timeouts_total += 1
        path.window = max(1, path.window // 2)
        path.growth = 0
        if not path.dead and path.timeouts >= self.policy.dead_after:
            path.dead = True
            path.deaths += 1
            path.next_probe = self.reactor.seconds() + self.policy.probe_interval
            others = sum(1 for p in self.paths if p.usable)
            _log.warn(
                "{target}: path {path} stopped answering ({count} timeouts in a row); "
                "{others} other path(s) live",
                target=self.name, path=path.describe(), count=path.timeouts, others=others,
            )

    def _revive(self, path: Path) -> None:
        """``path`` answered again: use it again, starting with a window of one."""
        path.dead = False
        path.timeouts = 0
        path.window = 1
        path.growth = 0
        _log.warn("{target}: path {path} answers again", target=self.name,
                  path=path.describe())

    # -- probing --------------------------------------------------------------

    def probe_due(self) -> None:
        """
        Probe what is due: reopen closed ports, query dead paths and pathless interfaces.

        Called whenever a frame is about to be sent, so probing costs nothing
        while the disk is idle.  Dead paths and interfaces without a path are
        probed only while another path is live: with none, the requests
        themselves go everywhere.
        """
        if self._nothing_to_probe():
            return
        now = self.reactor.seconds()
        interval = self.policy.probe_interval
        for link in self.links:
            if link.up or link.opener is None:
                link.next_reopen = None
            elif link.next_reopen is None:
                # Just noticed: the interface may come back by itself (its port then
                # never closed); try a new port one interval from now.
                link.next_reopen = now + interval
            elif now >= link.next_reopen:
                link.next_reopen = now + interval
                link.reopen()
        if not any(p.usable for p in self.paths):
            return
        for path in self.paths:
            if path.dead and path.probe is None and now >= path.next_probe and path.link.up:
                path.next_probe = now + interval
                self._probe(path)
        for link in self.links:
            if not link.up or any(p.link is link for p in self.paths):
                continue
            key = id(link)
            if now >= self._link_probes.get(key, 0.0):
                self._link_probes[key] = now + interval
                d = link.protocol.query_config(interval / 2, major=self.shelf, minor=self.slot,
                                               sends=1)
                d.addErrback(lambda _: None)

    def _nothing_to_probe(self) -> bool:
        """
        Whether ``probe_due`` would find nothing to do, asked cheaply (it runs per frame).

        So when every link is up and not waiting to be reopened, no path is
        dead and every link has a path.
        """
        paths = self.paths
        for path in paths:
            if path.dead:
                return False
        for link in self.links:
            if link.protocol.transport is None or link.next_reopen is not None:
                return False
            for path in paths:
                if path.link is link:
                    break
            else:
                return False
        return True

    def _probe(self, path: Path) -> None:
        """Send one config query to ``path``'s MAC; its answer (``offer``) revives the path."""
        arg = ConfigArg(0, 0, 0, 0, ConfigCommand.READ, 0, b"")
        wait = self.policy.probe_interval / 2
        d = path.protocol.request(
            path.mac, self.shelf, self.slot, Command.QUERY_CONFIG_INFORMATION, arg,
            what="path probe", target=self.name, retry=RetryPolicy(wait, wait, 0),
        )
        path.probe = d

        def done(_: object) -> None:
            path.probe = None

        d.addBoth(done)

    def stop(self) -> None:
        """
        Cancel probes in flight, stop hearing config replies, fail held retransmissions.

        A held retransmission is in flight on no port, so closing the ports
        would not fail it: its operation would never finish.
        """
        self.unwatch()
        for path in self.paths:
            if path.probe is not None:
                path.probe.cancel()
        # Failing one fails its operation, whose disk pumps: the others must not go
        # out meanwhile (``_send_held`` does nothing while this is set).
        self._sending_held = True
        try:
            while self._held:
                request = self._held.popleft()
                request.settle(AoEClientError(
                    f"{request.target}: {request.what} abandoned: the client closed"
                ))
        finally:
            self._sending_held = False


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
    An initiator on one or several interfaces: discover targets and open them as ``RemoteDisk``.

    Make one with ``AoEClient.listen(interface)`` (or a list of interfaces)
    for real interfaces, or around an ``AoEClientProtocol`` already connected
    to a transport, and/or ``links`` (tests).  ``close()`` stops the ports
    when done.  ``protocol``, ``port`` and ``interface`` are the first
    interface's; ``links`` lists them all.
    """

    def __init__(
        self,
        protocol: AoEClientProtocol | None = None,
        port: Any = None,
        *,
        interface: str = "",
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        links: Sequence[Link] = (),
        path_policy: PathPolicy | None = None,
        path_wait: float = DEFAULT_PATH_WAIT,
    ) -> None:
        self.links: list[Link] = []
        if protocol is not None:
            self.links.append(Link(interface, protocol, port))
        self.links.extend(links)
        if not self.links:
            raise ValueError("an AoEClient needs a protocol or at least one link")
        self.max_in_flight = max_in_flight
        self.path_policy = path_policy or PathPolicy()
        self.path_wait = path_wait
        self._path_sets: list[PathSet] = []

    @property
    def protocol(self) -> AoEClientProtocol:
        """The first interface's protocol."""
        return self.links[0].protocol

    @property
    def port(self) -> Any:
        """The first interface's port (``None`` once closed)."""
        return self.links[0].port

    @property
    def interface(self) -> str:
        """The first interface's name."""
        return self.links[0].name

    @property
    def interfaces(self) -> list[str]:
        """Every interface's name, in the order given."""
        return [link.name for link in self.links]

    @property
    def where(self) -> str:
        """The interfaces, for messages: ``eth0`` or ``eth0, eth1``."""
        return ", ".join(name for name in self.interfaces if name)

    @classmethod
    def listen(
        cls,
        interface: str | Sequence[str],
        *,
        reactor: IReactorTime | None = None,
        netns: str | None = None,
        retry: RetryPolicy | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        system: Any = None,
        path_policy: PathPolicy | None = None,
        path_wait: float = DEFAULT_PATH_WAIT,
    ) -> AoEClient:
        """
        Open a raw AoE socket on ``interface``, or on each of several (in namespace ``netns``).

        Needs ``CAP_NET_RAW``.  Raises ``aoe_twisted.net.port.CannotOpenInterface``
        (a ``CannotListenError`` whose ``str()`` is one line) for a missing
        interface or namespace or no permission; the interfaces already
        opened are closed again.  ``system`` replaces the operating system's
        packet sockets (``aoe_twisted.testing``).  A port that closes under
        the client (its interface went away) is reopened by the paths'
        probes (``PathPolicy``).
        """
        from aoe_twisted.net.port import AoEPort

        names = [interface] if isinstance(interface, str) else list(dict.fromkeys(interface))
        if not names:
            raise ValueError("no interface to listen on")
        links: list[Link] = []

        def opener(name: str) -> Callable[[AoEClientProtocol], Any]:
            def open_port(protocol: AoEClientProtocol) -> Any:
                port = AoEPort(
                    name, protocol, reactor=reactor, system=system, netns=netns,
                    # Room for a full window of replies, twice over, at any MTU.
                    receive_frames=2 * max_in_flight,
                    # A late reply is still the answer (the port's stale rule is
                    # for servers: not to carry out requests retried elsewhere).
                    stale_after=0,
                )
                port.startListening()
                return port

            return open_port

        try:
            for name in names:
                protocol = AoEClientProtocol(reactor, retry)
                open_port = opener(name)
                links.append(Link(name, protocol, open_port(protocol), open_port))
        except BaseException:
            for link in links:
                link.protocol.closing = True
                link.port.stopListening()
            raise
        return cls(links=links, max_in_flight=max_in_flight, path_policy=path_policy,
                   path_wait=path_wait)

    def close(self) -> Deferred[None]:
        """Stop listening on every interface; outstanding and queued requests fail."""
        # Closing first: what fails from here on sends nothing more (``_transmit``).
        for link in self.links:
            link.protocol.closing = True
        for paths in self._path_sets:
            paths.stop()
        self._path_sets.clear()
        stopping = []
        for link in self.links:
            port, link.port = link.port, None
            if port is not None:
                stopping.append(port.stopListening())
        d = gatherResults(stopping, consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

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

        The query goes out on every interface at once.  ``shelf``/``slot``
        narrow it (the defaults ask everyone).  With ``identify`` each target
        is then asked for IDENTIFY to fill in its size; a target that does not
        answer that keeps ``size`` ``None``.  Fires with the targets sorted by
        shelf, slot, MAC and interface; a target seen through several of its
        MACs, or on several interfaces, is listed once per MAC and interface
        (``TargetInfo.interface``).
        """
        return Deferred.fromCoroutine(self._discover(timeout, shelf, slot, identify))

    async def _discover(
        self, timeout: float, shelf: int, slot: int, identify: bool
    ) -> list[TargetInfo]:
        live = [link for link in self.links if link.up]
        answers = await gatherResults(
            [link.protocol.query_config(timeout, major=shelf, minor=slot) for link in live],
            consumeErrors=True,
        )
        found: dict[tuple[int, int, bytes, int], tuple[TargetInfo, Link]] = {}
        for index, (link, replies) in enumerate(zip(live, answers, strict=True)):
            for src, header in replies:
                key = (header.major, header.minor, src, index)
                if key not in found:
                    try:
                        found[key] = (TargetInfo.from_config(src, header, link.name), link)
                    except BadReply as e:
                        _log.debug("{error}", error=e)
        ordered = sorted(found.items(), key=lambda item: item[0])
        if not identify:
            return [info for _, (info, _) in ordered]
        results = await DeferredList(
            [Deferred.fromCoroutine(self._identify(info, link.protocol))
             for _, (info, link) in ordered],
            consumeErrors=True,
        )
        completed = []
        for (_, (info, _link)), (ok, result) in zip(ordered, results, strict=True):
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

    async def _identify(self, info: TargetInfo, protocol: AoEClientProtocol) -> Identity:
        """Ask ``info``'s target for IDENTIFY DEVICE through ``protocol`` and decode the page."""
        reply = await protocol.request(
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

        A config query for the target goes to the broadcast MAC on every
        interface, retransmitted like any request.  Every server MAC that
        answers on an interface becomes a path of the disk (``disk.paths``);
        once the first answer came, ``open`` waits for the other interfaces'
        first answers at most ``path_wait`` seconds (answers after that, and
        to later probes, still add paths).  The first target to answer is
        asked for IDENTIFY.  Fails with ``TargetNotFound`` if no one answers.
        ``use_lba28`` and ``max_in_flight`` (per path) are passed to the disk.
        """
        return Deferred.fromCoroutine(
            self._open(shelf, slot, use_lba28,
                       self.max_in_flight if max_in_flight is None else max_in_flight)
        )

    async def _open(
        self, shelf: int, slot: int, use_lba28: bool, max_in_flight: int
    ) -> RemoteDisk:
        name = target_name(shelf, slot)
        protocol = self.protocol
        paths = PathSet(shelf, slot, self.links, reactor=protocol.reactor,
                        max_in_flight=max_in_flight, policy=self.path_policy)
        paths.watch()
        try:
            reply, link = await self._first_answers(shelf, slot, name)
        except BaseException:
            paths.stop()
            raise
        info = TargetInfo.from_config(reply.source, reply.header, link.name)
        try:
            info = info.with_identity(await self._identify(info, link.protocol))
        except BaseException:
            paths.stop()
            raise
        self._path_sets.append(paths)
        return RemoteDisk(link.protocol, info, max_in_flight=max_in_flight, use_lba28=use_lba28,
                          paths=paths)

    def control(self, shelf: int, slot: int) -> Deferred[TargetControl]:
        """
        Find the target at ``shelf``.``slot`` for its config string, mask and reserve lists.

        As ``open`` finds it (a config query on every interface), without
        IDENTIFY; the first MAC to answer is the one ``TargetControl`` talks
        to.  Fails with ``TargetNotFound`` if no one answers, which is also
        what a target whose mask list leaves this host out does.
        """
        return Deferred.fromCoroutine(self._control(shelf, slot))

    async def _control(self, shelf: int, slot: int) -> TargetControl:
        reply, link = await self._first_answers(shelf, slot, target_name(shelf, slot))
        return TargetControl(link.protocol,
                             TargetInfo.from_config(reply.source, reply.header, link.name))

    async def _first_answers(self, shelf: int, slot: int, name: str) -> tuple[Reply, Link]:
        """
        Query every interface for ``shelf``.``slot``; return the first answer and its link.

        Then wait (at most ``path_wait``) for the other interfaces' answers,
        which the ``PathSet`` watching them turns into paths.
        """
        arg = ConfigArg(0, 0, 0, 0, ConfigCommand.READ, 0, b"")
        links = [link for link in self.links if link.up]
        queries = [
            link.protocol.request(
                BROADCAST_MAC, shelf, slot, Command.QUERY_CONFIG_INFORMATION, arg,
                what="config query", target=name,
            )
            for link in links
        ]
        first: Deferred[tuple[Reply, Link]] = Deferred()
        remaining = [len(queries)]
        errors: list[Failure] = []

        def answered(reply: Reply, link: Link) -> None:
            if not first.called:
                first.callback((reply, link))

        def failed(failure: Failure) -> None:
            errors.append(failure)

        def settled(_: object) -> None:
            remaining[0] -= 1
            if remaining[0] == 0 and not first.called:
                first.errback(errors[0] if errors else Failure(AoETimeout(name, "config query",
                                                                          0, 0.0)))

        for link, query in zip(links, queries, strict=True):
            query.addCallbacks(answered, failed, callbackArgs=(link,))
            query.addBoth(settled)
        if not queries:
            first.errback(TargetNotFound(name, self.where))
        try:
            reply, link = await first
        except AoETimeout:
            raise TargetNotFound(name, self.where) from None
        if remaining[0]:
            reactor = self.protocol.reactor
            everyone: Deferred[None] = Deferred()

            def all_settled(_: object) -> None:
                if remaining[0] == 0 and not everyone.called:
                    everyone.callback(None)

            for query in queries:
                query.addBoth(all_settled)
            timer = reactor.callLater(self.path_wait, lambda: everyone.called
                                      or everyone.callback(None))
            await everyone
            if timer.active():
                timer.cancel()
            for query in queries:
                if not query.called:
                    query.cancel()
        return reply, link


# -- one target's config string, mask list and reserve list ------------------------


#: The most mask list directives one request carries in a 1500-byte frame
#: (the 10-byte AoE header, the 4-byte argument, 8 bytes a directive).
MAX_MASK_EDITS = (1500 - HEADER_SIZE - 4) // 8


@frozen
class MaskEdit:
    """One change to a MAC mask list: add or delete ``mac``."""

    add: bool
    mac: bytes

    def directive(self) -> Directive:
        """The AoEr11 directive for this change."""
        return Directive(DirectiveCommand.ADD if self.add else DirectiveCommand.DELETE, self.mac)


class TargetControl:
    """
    One target's config string, MAC mask list and reserve list (AoEr11 sections 3.2-3.4).

    ``AoEClient.control(shelf, slot)`` finds the target and returns one; each
    method then sends one request to the MAC that answered (``info.mac``),
    through the interface that heard it, retransmitted like any request.
    Every edit the protocol defines is idempotent, so a retransmission after
    a lost reply does what the first copy did: a second SET of the same config
    string is accepted, a second ADD or DELETE of the same MAC changes nothing,
    and a reserve SET whose refusal lists exactly the MACs asked for (the first
    copy took effect, leaving this host off the list) is a success.

    ``local_mac`` is the MAC requests leave from: what the target checks
    against its mask and reserve lists.
    """

    def __init__(self, protocol: AoEClientProtocol, info: TargetInfo) -> None:
        self.protocol = protocol
        self.info = info
        self.name = info.name

    @property
    def local_mac(self) -> bytes:
        """The MAC of the local interface that talks to the target."""
        return self.protocol.mac

    def _request(self, command: Command, arg: Any, what: str) -> Deferred[Reply]:
        info = self.info
        return self.protocol.request(info.mac, info.shelf, info.slot, command, arg,
                                     what=what, target=self.name)

    # -- config string (3.2) ----------------------------------------------

    def config(self, command: ConfigCommand = ConfigCommand.READ,
               string: bytes = b"") -> Deferred[TargetInfo]:
        """
        Send a config query with ``command`` and ``string``; fire with what the reply says.

        READ and a matching TEST/TEST_PREFIX fire with the target's config;
        SET and FORCE_SET with the config after the change.  Fails with
        ``ConfigStringPresent`` when SET finds another string, and with
        ``ConfigMismatch`` when TEST/TEST_PREFIX gets no answer (the target is
        silent on a mismatch: this comes only after every retry).
        """
        return Deferred.fromCoroutine(self._config(command, bytes(string)))

    async def _config(self, command: ConfigCommand, string: bytes) -> TargetInfo:
        arg = ConfigArg(0, 0, 0, 0, command, len(string), string)
        what = f"config {command.name.lower().replace('_', '-')}"
        try:
            reply = await self._request(Command.QUERY_CONFIG_INFORMATION, arg, what)
        except AoETimeout as e:
            if command in (ConfigCommand.TEST, ConfigCommand.TEST_PREFIX):
                raise ConfigMismatch(self.name, command == ConfigCommand.TEST_PREFIX, string,
                                     e.waited) from None
            raise
        except AoEProtocolError as e:
            if e.code == Error.CONFIG_STRING_PRESENT:
                current = e.reply.arg if e.reply is not None else None
                raise ConfigStringPresent(
                    current.string if isinstance(current, ConfigArg) else None,
                    self.name, e.reply,
                ) from None
            raise
        return TargetInfo.from_config(reply.source, reply.header, self.info.interface)

    # -- MAC mask list (3.3) ----------------------------------------------

    def mask_list(self) -> Deferred[tuple[bytes, ...]]:
        """Fire with the target's MAC mask list (empty: every host may use it)."""
        return Deferred.fromCoroutine(self._mask(MACMaskArg(MACMaskCommand.READ), "mask read"))

    def edit_mask(self, edits: Sequence[MaskEdit]) -> Deferred[tuple[bytes, ...]]:
        """
        Apply ``edits`` to the mask list, in order, in one request; fire with the new list.

        Fails with ``MaskEditError`` if the target stopped at one of them (the
        list is full, or it refused the directive); those before it stay
        applied.  One request carries at most ``MAX_MASK_EDITS`` (what a
        1500-byte frame holds).
        """
        if len(edits) > MAX_MASK_EDITS:
            raise ValueError(f"at most {MAX_MASK_EDITS} mask list changes in one request, "
                             f"not {len(edits)}")
        directives = tuple(edit.directive() for edit in edits)
        arg = MACMaskArg(MACMaskCommand.EDIT, 0, len(directives), directives)
        return Deferred.fromCoroutine(self._mask(arg, "mask edit"))

    async def _mask(self, arg: MACMaskArg, what: str) -> tuple[bytes, ...]:
        reply = await self._request(Command.MAC_MASK_LIST, arg, what)
        answer = reply.header.arg
        if not isinstance(answer, MACMaskArg):
            raise BadReply(f"{self.name}: reply to {what} without a mask argument")
        if answer.error:
            index = answer.dir_count
            directive = arg.directives[index] if index < len(arg.directives) else None
            raise MaskEditError(answer.error, index, directive, self.name)
        return tuple(d.mac for d in answer.directives)

    # -- reserve list (3.4) -----------------------------------------------

    def reserve_list(self) -> Deferred[tuple[bytes, ...]]:
        """Fire with the target's reserve list (empty: not reserved)."""
        return Deferred.fromCoroutine(
            self._reserve(ReserveReleaseCommand.READ, (), "reserve read")
        )

    def set_reserve(self, macs: Sequence[bytes], *, force: bool = False,
                    ) -> Deferred[tuple[bytes, ...]]:
        """
        Replace the reserve list with ``macs`` (empty: release); fire with the new list.

        Without ``force`` the target refuses unless its list is empty or holds
        this host's MAC: ``TargetReserved`` names the hosts that hold it.
        """
        command = ReserveReleaseCommand.FORCE_SET if force else ReserveReleaseCommand.SET
        what = ("reserve force-set" if force else "reserve set") if macs else (
            "release (force)" if force else "release")
        return Deferred.fromCoroutine(self._reserve(command, tuple(macs), what))

    async def _reserve(self, command: ReserveReleaseCommand, macs: tuple[bytes, ...],
                       what: str) -> tuple[bytes, ...]:
        arg = ReserveReleaseArg(command, len(macs), macs)
        try:
            reply = await self._request(Command.RESERVE_RELEASE, arg, what)
        except AoEProtocolError as e:
            if e.code != Error.TARGET_IS_RESERVED:
                raise
            listed = e.reply.arg if e.reply is not None else None
            holders = listed.macs if isinstance(listed, ReserveReleaseArg) else ()
            if command == ReserveReleaseCommand.SET and holders == macs:
                # A retransmission: the first copy set exactly this list, without us on it.
                return macs
            raise TargetReserved(holders, self.name, what, e.reply) from None
        answer = reply.header.arg
        if not isinstance(answer, ReserveReleaseArg):
            raise BadReply(f"{self.name}: reply to {what} without a reserve argument")
        return answer.macs


# -- one target as a disk --------------------------------------------------------


@define(eq=False)
class _Operation:
    """A read, write or other command split into chunks; fails as a whole on the first error."""

    deferred: Deferred[Any] = field(init=False)
    progress: Callable[[int], object] | None = None
    #: The bytes (from the operation's first sector) the caller asked for:
    #: ``progress`` counts only those, not the rest of a partly covered sector.
    clip: tuple[int, int] | None = None
    chunks: list[_Chunk] = field(factory=list)
    results: list[bytes] = field(factory=list)
    remaining: int = 0
    failed: bool = False
    #: What ``deferred`` fires with, made of ``results`` once every chunk is answered.
    finish: Callable[[list[bytes]], Any] = lambda results: None


@define(eq=False)
class _Chunk:
    """
    One frame's worth of an operation: an ATA argument and where its result goes.

    ``arg`` returns the encoded argument and the sectors it carries, built
    when the frame is first sent (a long write is not copied all at once).
    """

    operation: _Operation
    index: int
    arg: Callable[[], bytes]
    what: str
    length: int
    expect: int = 0
    request: _Request | None = None
    #: Where the chunk's bytes start, counted from the operation's first sector.
    start: int = 0

    def counted(self) -> int:
        """The bytes of this chunk that its operation's ``progress`` counts."""
        clip = self.operation.clip
        if clip is None:
            return self.length
        return max(0, min(self.start + self.length, clip[1]) - max(self.start, clip[0]))


class RemoteDisk:
    """
    One AoE target used as a disk: sector reads and writes over the network.

    ``read``/``write`` take LBAs and whole sectors; ``read_at``/``write_at``
    take byte offsets and any length (a write that covers part of a sector
    reads that sector first).  Every transfer is split into frames of
    ``sectors_per_frame`` sectors (the least any path carries when the disk
    opens), and at most ``window`` of them, across all operations on this
    disk, are in flight at once: the sum of the live paths' windows
    (``paths``, a ``PathSet``; one path, to ``info.mac``, unless ``AoEClient.open``
    found more).  ``peak_in_flight`` records the most there ever were.

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
        paths: PathSet | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.protocol = protocol
        self.info = info
        self.name = info.name
        self.use_lba28 = use_lba28
        if paths is None:
            link = Link(info.interface or str(getattr(protocol.transport, "interface", "")),
                        protocol)
            paths = PathSet(info.shelf, info.slot, [link], reactor=protocol.reactor,
                            max_in_flight=max_in_flight)
        if not paths.paths:
            link = next((lk for lk in paths.links if lk.protocol is protocol), None)
            if link is None:
                link = Link(info.interface, protocol)
                paths.links.append(link)
            paths.add(link, info.mac, info.buffer_count, info.sector_count)
        self.paths = paths
        self.sectors_per_frame = max(1, min(
            [_MAX_SECTORS_PER_COMMAND]
            + [min(p.sector_count, _mtu_sectors(p.protocol.mtu)) for p in paths.paths]
        ))
        paths.sectors_per_frame = self.sectors_per_frame
        paths.on_change = self._pump
        # The AoE header of every ATA request to this target, but its tag.
        self._head = _ATA_HEAD.pack(VERSION << 4, 0, info.shelf, info.slot, _ATA_COMMAND)
        self.in_flight = 0
        self.peak_in_flight = 0
        self._queue: deque[_Chunk] = deque()
        self._pumping = False

    @property
    def window(self) -> int:
        """How many frames may be in flight now: the sum of the usable paths' windows."""
        return self.paths.window

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
        return self._read(lba, count, progress, None)

    def _read(
        self, lba: int, count: int, progress: Callable[[int], object] | None,
        clip: tuple[int, int] | None,
    ) -> Deferred[bytes]:
        self._check_range(lba, count)
        if count == 0:
            return succeed(b"")
        op = self._operation(progress, clip)
        per = self.sectors_per_frame
        for index, first in enumerate(range(lba, lba + count, per)):
            n = min(per, lba + count - first)
            self._add(
                op, index, self._rw_builder(False, first, n, b""),
                f"read of LBA {first}+{n}", n * SECTOR_SIZE, expect=n * SECTOR_SIZE,
                start=(first - lba) * SECTOR_SIZE,
            )
        op.finish = b"".join
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
        return self._write(lba, data, progress, None)

    def _write(
        self, lba: int, data: bytes, progress: Callable[[int], object] | None,
        clip: tuple[int, int] | None,
    ) -> Deferred[None]:
        if len(data) % SECTOR_SIZE:
            raise ValueError(f"{len(data)} bytes is not a whole number of {SECTOR_SIZE}-byte "
                             "sectors")
        count = len(data) // SECTOR_SIZE
        self._check_range(lba, count)
        if count == 0:
            return succeed(None)
        view = memoryview(data)
        op = self._operation(progress, clip)
        per = self.sectors_per_frame
        for index, first in enumerate(range(lba, lba + count, per)):
            n = min(per, lba + count - first)
            start = (first - lba) * SECTOR_SIZE
            payload = view[start : start + n * SECTOR_SIZE]
            self._add(
                op, index, self._rw_builder(True, first, n, payload),
                f"write of LBA {first}+{n}", n * SECTOR_SIZE, start=start,
            )
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
            op, 0, lambda: ATAArg(flag_lba48_extended=ext, cmd_status=command).to_bytes(),
            "FLUSH CACHE", 0,
        )
        self._start(op)
        return op.deferred

    def identify(self) -> Deferred[bytes]:
        """Fire with the target's 512-byte IDENTIFY DEVICE page."""
        op = self._operation(None)
        self._add(op, 0, lambda: _identify_arg().to_bytes(), "IDENTIFY", 0, expect=512)
        op.finish = lambda results: results[0]
        self._start(op)
        return op.deferred

    def read_at(
        self, offset: int, length: int, progress: Callable[[int], object] | None = None
    ) -> Deferred[bytes]:
        """
        Read ``length`` bytes from byte ``offset``, whether or not they are sector-aligned.

        ``progress`` counts only the bytes asked for, not the rest of a partly
        read first or last sector.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        first = offset // SECTOR_SIZE
        end = -(-(offset + length) // SECTOR_SIZE)
        skip = offset - first * SECTOR_SIZE
        d = self._read(first, end - first, progress, (skip, skip + length))
        d.addCallback(lambda data: data[skip : skip + length])
        return d

    def write_at(
        self, offset: int, data: bytes, progress: Callable[[int], object] | None = None
    ) -> Deferred[None]:
        """
        Write ``data`` at byte ``offset``.

        A partly covered first or last sector is read first and written back
        with the new bytes in place (read-modify-write: not atomic against
        other writers of the same sector).  ``progress`` counts only the bytes
        of ``data`` each acknowledged frame carried.
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
        await self._write(first, data, progress, (head, len(data) - tail))

    # -- the window -------------------------------------------------------------

    def _check_range(self, lba: int, count: int) -> None:
        """Refuse what no command can express; the target judges the disk's own bounds."""
        if lba < 0 or count < 0:
            raise ValueError("LBA and count must not be negative")
        limit = _LBA48_LIMIT if self.info.lba48 else _LBA28_LIMIT
        if lba + count > limit:
            raise ValueError(f"{self.name}: LBA {lba}+{count} cannot be addressed "
                             f"({'48' if self.info.lba48 else '28'}-bit LBA)")

    def _operation(
        self, progress: Callable[[int], object] | None, clip: tuple[int, int] | None = None
    ) -> _Operation:
        """Start an operation; cancelling its Deferred fails it like any error."""
        op = _Operation(progress, clip)
        op.deferred = Deferred(lambda _: self._fail(op, Failure(CancelledError())))
        return op

    def _add(
        self, op: _Operation, index: int, arg: Callable[[], bytes], what: str, length: int,
        expect: int = 0, start: int = 0,
    ) -> None:
        op.chunks.append(_Chunk(op, index, arg, what, length, expect, start=start))

    def _start(self, op: _Operation) -> None:
        op.results = [b""] * len(op.chunks)
        op.remaining = len(op.chunks)
        self._queue.extend(op.chunks)
        self._pump()

    def _rw_builder(
        self, write: bool, lba: int, count: int, data: bytes | memoryview
    ) -> Callable[[], bytes]:
        """Return a function encoding the READ/WRITE argument and data when its frame is sent."""
        lba28 = not self.info.lba48 or (self.use_lba28 and lba + count <= _LBA28_LIMIT)
        if lba28:
            command = ATACmdStatus.WRITE_28BIT if write else ATACmdStatus.READ_28BIT
            address = (lba & (_LBA28_LIMIT - 1)) | _LBA28_DEVICE << 24
        else:
            command = ATACmdStatus.WRITE_48BIT if write else ATACmdStatus.READ_48BIT
            address = lba
        aflags = (0 if lba28 else _AFLAG_LBA48) | (_AFLAG_WRITE if write else 0)
        command = int(command)

        def build() -> bytes:
            # As ATAArg(...).to_bytes() encodes it, without the object.
            return _ATA_ARG.pack(aflags, 0, count, command, address.to_bytes(6, "little"),
                                 0) + data

        return build

    def _pump(self) -> None:
        """
        Send into the room on the paths: held retransmissions first, then queued chunks,
        each on the path ``PathSet.choose`` gives, while one has room.

        Called after every answer or failure is accounted for, and when a path
        is added or comes back.  Held retransmissions are sent even when no
        chunk is queued: they have no timer, and nothing else would.
        """
        paths = self.paths
        if self._pumping or not (self._queue or paths._held):
            return
        self._pumping = True
        try:
            queue = self._queue
            info = self.info
            while True:
                if not queue:
                    paths.release()
                    if queue:
                        continue  # queued while releasing (a failure's callbacks)
                    break
                if queue[0].operation.failed:
                    queue.popleft()
                    continue
                path = paths.choose()
                if path is None:
                    break
                chunk = queue.popleft()
                self.in_flight += 1
                if self.in_flight > self.peak_in_flight:
                    self.peak_in_flight = self.in_flight
                protocol = path.protocol
                request = _Request(
                    path.mac, self._head, _padded(chunk.arg()), _ATA_COMMAND, info.shelf,
                    info.slot, chunk.what, self.name, retry=protocol.retry, paths=paths,
                    path=path, sink=self, chunk=chunk,
                )
                request.timeout = protocol.retry.initial_timeout
                chunk.request = request
                protocol._transmit(request)
        finally:
            self._pumping = False

    def _chunk_done(self, result: Reply | Failure, chunk: _Chunk) -> None:
        """One frame failed, or was answered by a reply decoded in full: account for it."""
        if isinstance(result, Failure):
            self.in_flight -= 1
            chunk.request = None
            if not chunk.operation.failed:
                self._fail(chunk.operation, result)
            self._pump()
            return
        arg = result.header.arg
        if not isinstance(arg, ATAArg):
            self.in_flight -= 1
            chunk.request = None
            if not chunk.operation.failed:
                try:
                    _check_ata(result.header, self.name, chunk.what)
                except AoEClientError:
                    self._fail(chunk.operation, Failure())
            self._pump()
            return
        self._chunk_answered(chunk, arg.cmd_status, arg.err_feature, arg.data)

    def _chunk_answered(self, chunk: _Chunk, status: int, error: int, data: bytes) -> None:
        """
        Account for one answered frame, from its reply's ATA status and error registers
        and the bytes after its argument, and send the next ones.
        """
        self.in_flight -= 1
        chunk.request = None
        op = chunk.operation
        if not op.failed:
            expect = chunk.expect
            if status & _STATUS_FAILED or len(data) < expect:
                try:
                    if status & _STATUS_FAILED:
                        raise ATAError(status, error, self.name, chunk.what)
                    raise BadReply(
                        f"{self.name}: reply to {chunk.what} carried {len(data)} "
                        f"bytes, expected {expect}"
                    )
                except AoEClientError:
                    self._fail(op, Failure())
            else:
                op.results[chunk.index] = data[:expect]
                op.remaining -= 1
                if op.progress is not None and chunk.length:
                    counted = chunk.counted()
                    if counted:
                        op.progress(counted)
                if op.remaining == 0:
                    # Every chunk is answered: let go of them, so that the operation
                    # and its chunks (which point at each other) are freed at once
                    # rather than by the cyclic garbage collector.
                    op.chunks.clear()
                    op.deferred.callback(op.finish(op.results))
        self._pump()

    def _fail(self, op: _Operation, failure: Failure) -> None:
        """Fail ``op``: abandon its frames in flight, skip its queued ones, fire its Deferred."""
        if op.failed:
            return
        op.failed = True
        # As cancelling a request's Deferred does: abandon them, then fail them.  All
        # are abandoned first: failing one pumps, and the pump must not send a held
        # retransmission of this operation into the room it left.
        for chunk in op.chunks:
            request = chunk.request
            if request is not None:
                request.owner._abandon(request)
        for chunk in op.chunks:
            if chunk.request is not None:
                self._chunk_done(Failure(CancelledError()), chunk)
        # No operation <-> chunk cycle left for the garbage collector (its queued
        # chunks, still in the queue, are skipped by ``_pump``).
        op.chunks.clear()
        if not op.deferred.called:
            op.deferred.errback(failure)
