"""
The invariants the fuzz targets check, as plain functions over one fuzz input.

``check_decode(data)`` is the codec's contract: decoding raises nothing but
``WireError``, and whatever decodes encodes back to the same bytes (up to the
flag bits the codec does not keep) and decodes to the same message.

``check_frames(data)`` is the dispatcher's: ``data`` picks a small set of
memory-disk targets and ACL state (its first byte) and holds up to
``MAX_FRAMES`` length-prefixed Ethernet frames, which go through a fresh
``Dispatcher.frame_received`` one by one.  After every frame:

- nothing raised, and the counters account for the frame exactly once;
- every reply is a padded Ethernet frame from the dispatcher's MAC to the
  sender, no longer than the MTU allows, that decodes as an AoE response with
  the request's tag and command, from one target's own shelf.slot (never a
  wildcard), at most one per target and only from targets the request
  addressed and whose mask list admitted the sender;
- frames with the response flag, a multicast source or another EtherType get
  no reply;
- every disk equals what an independent model of the write rules says: the
  disk before the frame, with the frame's write applied if and only if it is
  a well-formed write that this target must accept (addressed, admitted by
  the mask list and the reserve list as they were before the frame, writable,
  within the advertised sector count and the disk);
- a read that succeeded returned exactly the disk's bytes;
- an ACL list or config string changed only by a request of the command that
  owns it, addressed to that target and admitted, as the AoE rules allow;
- a second dispatcher on its own identical targets, with the fast path
  (``aoe_twisted.core.fastpath``), gave the same replies, counters and disks;
  so did a third holding writes for group commit (``hold_writes``, as under
  ``--sync``: every acknowledged write carries its refusal), and a fourth
  answering in place into a buffer (``frame_received_into``, as from the
  rings): the checks above run on the general path (``fast_path=False``),
  the reference.

Every iteration builds its targets anew, so no state carries from one input
to the next and a crasher replays alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from attrs import frozen

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import RESERVE_LIST_LIMIT, MemoryACLStore
from aoe_twisted.core.dispatch import Dispatcher, FrameCounters
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
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
    Command,
    ConfigArg,
    ConfigCommand,
    Error,
    EthernetFrame,
    FrameTooShort,
    Header,
    MACMaskArg,
    MACMaskCommand,
    ProtocolError,
    RawArg,
    ReserveReleaseArg,
    ReserveReleaseCommand,
    WireError,
)
from aoe_twisted.net.port import max_sectors_for_mtu

__all__ = [
    "ALLOWED_MAC",
    "DISK_SECTORS",
    "MAX_FRAMES",
    "PATTERN",
    "SERVER_MAC",
    "FuzzInvariantError",
    "Scenario",
    "build_targets",
    "changes_state",
    "check_decode",
    "check_frames",
    "classify_frame",
    "encode_input",
    "memory_disk",
    "parse_input",
]

#: The MAC the dispatcher answers from.
SERVER_MAC = bytes.fromhex("020000000001")
#: The one MAC on the preset mask and reserve lists of a scenario that has them.
ALLOWED_MAC = bytes.fromhex("020000000a01")
#: The most frames one input sends: enough to set state up and then use it.
MAX_FRAMES = 8
#: Sectors of every memory disk: small, so in-range LBAs are easy to hit.
DISK_SECTORS = 64
#: Status of a successful ATA command.
_DRDY = int(ATACmdStatus.READY_STATUS)
_WRITES = (int(ATACmdStatus.WRITE_28BIT), int(ATACmdStatus.WRITE_48BIT))
_READS = (int(ATACmdStatus.READ_28BIT), int(ATACmdStatus.READ_48BIT))
_MASK28 = (1 << 28) - 1
_MASK48 = (1 << 48) - 1
#: Flag bits the codec keeps: the header's R and E, the ATA argument's E, D, A and W.
_HEADER_FLAGS_KEPT = 0xFC
_AFLAGS_KEPT = 0x53
#: The dispatcher's counters that say what became of a frame; each frame lands in one
#: (a malformed request answered with an AoE error in two: malformed and answered).
_FATES = ("not_aoe", "malformed", "response", "unaddressed", "silent", "answered")
#: The shelf.slot layouts a scenario can pick (the first byte's low two bits).
_LAYOUTS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((1, 0),),
    ((1, 0), (1, 1)),
    ((0, 0), (1, 0), (BROADCAST_MAJOR - 1, BROADCAST_MINOR - 1)),
    ((1, 2),),
)
#: Disk contents, the same every iteration (a pattern, so a write of zeros shows).
PATTERN = random.Random(0xA0E).randbytes(DISK_SECTORS * SECTOR_SIZE)


class FuzzInvariantError(AssertionError):
    """An invariant of the codec or the dispatcher does not hold for a fuzz input."""


def _check(condition: object, message: str) -> None:
    """Raise ``FuzzInvariantError(message)`` unless ``condition`` is true."""
    if not condition:
        raise FuzzInvariantError(message)


# -- the codec -----------------------------------------------------------------


def _same_but_flags(encoded: bytes, data: bytes, ata: bool) -> bool:
    """Whether ``encoded`` is ``data``'s prefix, ignoring flag bits the codec drops."""
    if len(encoded) > len(data):
        return False
    original = bytearray(data[: len(encoded)])
    mine = bytearray(encoded)
    if original:
        original[0] &= _HEADER_FLAGS_KEPT
        mine[0] &= _HEADER_FLAGS_KEPT
    if ata and len(original) > HEADER_SIZE:
        original[HEADER_SIZE] &= _AFLAGS_KEPT
        mine[HEADER_SIZE] &= _AFLAGS_KEPT
    return original == mine


def _check_protocol_error(error: ProtocolError, data: bytes) -> None:
    """A ``ProtocolError`` carries a real ``Error`` and, if any, a header true to ``data``."""
    _check(isinstance(error.code, Error), f"ProtocolError code {error.code!r} is not an Error")
    header = error.header
    if header is None:
        return
    _check(isinstance(header.arg, RawArg), "a partial header keeps its argument raw")
    assert isinstance(header.arg, RawArg)
    _check(header.arg.data == data[HEADER_SIZE:], "the raw argument is every byte after the header")
    _check(header.major == int.from_bytes(data[2:4], "big"), "partial header: wrong major")
    _check(header.minor == data[4] and header.command == data[5], "partial header: wrong minor")
    _check(header.tag == data[6:10], "partial header: wrong tag")
    _check(header.flag_response == bool(data[0] & 0x08), "partial header: wrong R flag")


def _check_header(data: bytes) -> None:
    """``Header.from_bytes(data)`` keeps the codec's contract."""
    try:
        header = Header.from_bytes(data)
    except ProtocolError as e:
        _check(len(data) >= HEADER_SIZE, "ProtocolError for fewer bytes than a header")
        _check_protocol_error(e, data)
        return
    except FrameTooShort:
        return
    _check(header.version == VERSION, "decoded a header of another version")
    encoded = header.to_bytes()
    _check(
        _same_but_flags(encoded, data, header.command == Command.ISSUE_ATA_COMMAND),
        "a decoded message does not encode back to the bytes it came from",
    )
    again = Header.from_bytes(encoded)
    _check(again == header, f"re-decoding gave {again!r}, not {header!r}")
    if isinstance(header.arg, RawArg):
        _check(
            header.flag_response and header.flag_error,
            "only an error response may decode with a raw argument",
        )


def check_decode(data: bytes) -> None:
    """
    Check the codec on ``data``, read as an Ethernet frame and as an AoE message.

    Only ``WireError`` may come out of decoding (anything else propagates);
    everything that decodes re-encodes to the same bytes and decodes to the same
    message.  Raise ``FuzzInvariantError`` when a rule is broken.
    """
    _check_header(data)
    try:
        frame = EthernetFrame.from_bytes(data)
    except FrameTooShort:
        _check(len(data) < ETHERNET_HEADER_SIZE, "FrameTooShort for a whole Ethernet header")
        return
    _check(frame.to_bytes() == data, "an Ethernet frame does not encode back to its bytes")
    _check(EthernetFrame.from_bytes(frame.to_bytes()) == frame, "Ethernet round trip differs")
    padded = frame.to_bytes(pad=True)
    _check(len(padded) == max(MIN_FRAME_SIZE, len(data)), "padding to the wrong length")
    _check(padded.startswith(data), "padding changed the frame")
    _check_header(frame.payload)


# -- the dispatcher -------------------------------------------------------------


def unpack_option_byte(value: int) -> tuple[int, bool, bool, bool, bool, bool, bool]:
    """Split an input's option byte: bits 0-1 a number (0-3), bits 2-7 six flags."""
    b = [bool(value >> bit & 1) for bit in range(2, 8)]
    return (value & 3, b[0], b[1], b[2], b[3], b[4], b[5])


def pack_option_byte(number: int, *flags: bool) -> int:
    """The option byte of ``number`` (0-3) and six ``flags`` (``unpack_option_byte``'s inverse)."""
    return number | sum(int(flag) << bit for bit, flag in enumerate(flags, 2))


@frozen
class Scenario:
    """What the first byte of a frames input picks: targets, ACL state, MTU, source."""

    layout: int
    masked: bool
    reserved: bool
    config: bool
    jumbo: bool
    force_source: bool
    read_only: bool

    @classmethod
    def from_byte(cls, value: int) -> Scenario:
        """Decode the scenario byte (bits: 0-1 layout, 2 mask, 3 reserve, 4 config, 5 MTU...)."""
        return cls(*unpack_option_byte(value))

    def to_byte(self) -> int:
        """Encode the scenario byte."""
        return pack_option_byte(
            self.layout,
            self.masked,
            self.reserved,
            self.config,
            self.jumbo,
            self.force_source,
            self.read_only,
        )

    @property
    def mtu(self) -> int:
        """The interface MTU the targets are sized for: 1500, or 9000 for jumbo frames."""
        return 9000 if self.jumbo else 1500


def parse_input(data: bytes, oversized: bool = False) -> tuple[Scenario, list[bytes]]:
    """
    Split a frames input into its scenario and frames.

    Byte 0 is the scenario; then each frame is a 2-byte big-endian length and
    that many bytes (the last one takes what is left if the input is shorter).
    Frames longer than the MTU plus the Ethernet header are left out, as
    ``AoEPort`` drops them before the dispatcher sees them, unless
    ``oversized`` (the lane's ring walk drops them itself, by ``tp_len``).
    """
    if not data:
        return Scenario.from_byte(0), []
    scenario = Scenario.from_byte(data[0])
    limit = scenario.mtu + ETHERNET_HEADER_SIZE
    frames = []
    position = 1
    while position < len(data) and len(frames) < MAX_FRAMES:
        length = int.from_bytes(data[position : position + 2], "big")
        frame = data[position + 2 : position + 2 + length]
        position += 2 + length
        if scenario.force_source and len(frame) >= 12:
            frame = frame[:6] + ALLOWED_MAC + frame[12:]
        if oversized or len(frame) <= limit:
            frames.append(frame)
    return scenario, frames


def encode_input(scenario: Scenario, frames: list[bytes]) -> bytes:
    """Return the frames input that ``parse_input`` reads as ``scenario`` and ``frames``."""
    out = bytearray([scenario.to_byte()])
    for frame in frames:
        out += len(frame).to_bytes(2, "big") + frame
    return bytes(out)


def memory_disk() -> MemoryBackend:
    """Return a fresh memory disk of ``DISK_SECTORS`` sectors holding the fixed pattern."""
    backend = MemoryBackend(DISK_SECTORS * SECTOR_SIZE)
    backend.write(0, PATTERN)
    return backend


def build_targets(scenario: Scenario, disk: Callable[[], Any] = memory_disk) -> list[Target]:
    """
    Return fresh targets for ``scenario``, each on a new disk from ``disk()``.

    ``disk`` returns a backend of ``DISK_SECTORS`` sectors holding the fixed
    pattern (memory disks by default; the lane's checks use others too).
    """
    targets = []
    sectors = max_sectors_for_mtu(scenario.mtu)
    for shelf, slot in _LAYOUTS[scenario.layout]:
        backend = disk()
        backend.read_only = scenario.read_only and (shelf, slot) != (1, 0)
        acl = MemoryACLStore(
            config_string=b"fuzz" if scenario.config else b"",
            mask_list=(ALLOWED_MAC,) if scenario.masked else (),
            reserve_list=(ALLOWED_MAC,) if scenario.reserved else (),
        )
        targets.append(Target(shelf, slot, backend, acl, max_sectors=sectors))
    return targets


@frozen
class _State:
    """What one target holds before a frame: disk bytes and ACL state."""

    disk: bytes
    config: bytes
    mask: tuple[bytes, ...]
    reserve: tuple[bytes, ...]

    @classmethod
    def of(cls, target: Target) -> _State:
        backend = target.backend
        acl = target.acl
        return cls(
            backend.read(0, backend.size), acl.config_string, acl.mask_list, acl.reserve_list
        )


def classify_frame(frame: bytes) -> tuple[bytes, Header | None, bool]:
    """
    Decide, apart from the dispatcher, what ``frame`` is: its source MAC, its
    decoded AoE message (``None`` if it has none), and whether the dispatcher
    must count it as malformed.
    """
    if len(frame) < ETHERNET_HEADER_SIZE:
        return b"", None, True
    src = frame[6:12]
    if int.from_bytes(frame[12:14], "big") != ETHERTYPE:
        return src, None, False
    if src[0] & 1:
        return src, None, True
    try:
        header = Header.from_bytes(frame[ETHERNET_HEADER_SIZE:])
    except WireError:
        return src, None, True
    return src, header, False


def changes_state(target: Target, frame: bytes) -> bool:
    """
    Whether ``frame`` is a request that may change ``target``'s disk or ACL state
    as it is now, by the rules this module checks (for generating harmless floods).
    """
    src, header, _ = classify_frame(frame)
    if header is None or header.flag_response:
        return False
    state = _State.of(target)
    if _expected_write(target, state, src, header) is not None:
        return True
    if not target.addresses(header.major, header.minor) or not _admits(state, src):
        return False
    arg = header.arg
    return (
        (isinstance(arg, ConfigArg) and arg.command in (ConfigCommand.SET, ConfigCommand.FORCE_SET))
        or (isinstance(arg, MACMaskArg) and arg.command == MACMaskCommand.EDIT)
        or (isinstance(arg, ReserveReleaseArg) and arg.command != ReserveReleaseCommand.READ)
    )


def _admits(state: _State, src: bytes) -> bool:
    """Whether the mask list (as it was before the frame) lets ``src`` talk to a target."""
    return not state.mask or src in state.mask


def _expected_write(
    target: Target, state: _State, src: bytes, header: Header | None
) -> tuple[int, bytes] | None:
    """
    The write the target must perform for ``header``: ``(offset, data)`` or ``None``.

    The rules, written down apart from ``aoe_twisted.core.ata``: a request (not a
    response) addressed to the target, from a host the mask and reserve lists
    admit, of WRITE SECTORS (EXT) with the W flag, 1 to ``max_sectors`` sectors,
    all their data present, inside the disk, which is writable.
    """
    if header is None or header.flag_response:
        return None
    if not target.addresses(header.major, header.minor) or not _admits(state, src):
        return None
    if state.reserve and src not in state.reserve:
        return None
    arg = header.arg
    if not isinstance(arg, ATAArg) or arg.cmd_status not in _WRITES or not arg.flag_write:
        return None
    count = arg.sector_count
    if not 0 < count <= target.max_sectors or len(arg.data) < count * SECTOR_SIZE:
        return None
    if target.backend.read_only:
        return None
    wide = arg.cmd_status == ATACmdStatus.WRITE_48BIT and arg.flag_lba48_extended
    lba = arg.lba & (_MASK48 if wide else _MASK28)
    if lba + count > target.backend.size // SECTOR_SIZE:
        return None
    return lba * SECTOR_SIZE, arg.data[: count * SECTOR_SIZE]


def _check_reply(
    frame: bytes, reply: bytes, targets: list[Target], scenario: Scenario
) -> tuple[int, int, Header | None]:
    """Check one reply frame to ``frame``; return its shelf.slot and decoded header."""
    limit = max(MIN_FRAME_SIZE, ETHERNET_HEADER_SIZE + scenario.mtu)
    _check(len(reply) >= MIN_FRAME_SIZE, f"a reply of {len(reply)} bytes is not padded")
    _check(len(reply) <= limit, f"a reply of {len(reply)} bytes exceeds MTU {scenario.mtu}")
    ethernet = EthernetFrame.from_bytes(reply)
    _check(ethernet.dst == frame[6:12], "a reply not addressed to the request's sender")
    _check(ethernet.src == SERVER_MAC, "a reply not from the dispatcher's MAC")
    _check(ethernet.ethertype == ETHERTYPE, "a reply that is not AoE")
    payload = ethernet.payload
    request = frame[ETHERNET_HEADER_SIZE:]
    _check(payload[0] >> 4 == VERSION, "a reply of another AoE version")
    _check(payload[0] & 0x08, "a reply without the response flag")
    major = int.from_bytes(payload[2:4], "big")
    minor = payload[4]
    _check(major != BROADCAST_MAJOR and minor != BROADCAST_MINOR, "a reply from a wildcard")
    _check(
        any((t.shelf, t.slot) == (major, minor) for t in targets),
        f"a reply from e{major}.{minor}, which is no target here",
    )
    _check(payload[5] == request[5], "a reply with another command")
    _check(payload[6:10] == request[6:10], "a reply with another tag")
    try:
        header: Header | None = Header.from_bytes(payload)
    except ProtocolError as e:
        # An error reply echoes an unknown command, which no codec decodes.
        _check(e.code == Error.UNRECOGNIZED_COMMAND_CODE, f"a reply does not decode: {e!r}")
        _check(payload[0] & 0x04, "only an error reply may carry an unknown command")
        header = None
    except WireError as e:
        raise FuzzInvariantError(f"a reply does not decode: {e!r}") from None
    return major, minor, header


def _check_acl(
    target: Target, before: _State, after: _State, src: bytes, header: Header | None
) -> None:
    """Check that ACL state changed only as a request addressed to ``target`` may change it."""
    name = f"e{target.shelf}.{target.slot}"
    _check(len(after.mask) <= target.mask_limit, f"{name}: mask list over its limit")
    _check(len(set(after.mask)) == len(after.mask), f"{name}: a MAC twice on the mask list")
    _check(len(after.reserve) <= RESERVE_LIST_LIMIT, f"{name}: reserve list over 255")
    changed = (after.config, after.mask, after.reserve) != (
        before.config, before.mask, before.reserve
    )
    if not changed:
        return
    _check(
        header is not None
        and not header.flag_response
        and target.addresses(header.major, header.minor)
        and _admits(before, src),
        f"{name}: ACL state changed by a frame that may not change it",
    )
    assert header is not None
    arg = header.arg
    if after.config != before.config:
        _check(
            isinstance(arg, ConfigArg)
            and after.config == arg.string
            and (
                arg.command == ConfigCommand.FORCE_SET
                or (arg.command == ConfigCommand.SET and not before.config)
            ),
            f"{name}: config string changed by {header!r}",
        )
    if after.mask != before.mask:
        _check(
            isinstance(arg, MACMaskArg) and arg.command == MACMaskCommand.EDIT,
            f"{name}: mask list changed by {header!r}",
        )
    if after.reserve != before.reserve:
        _check(
            isinstance(arg, ReserveReleaseArg)
            and after.reserve == arg.macs
            and (
                arg.command == ReserveReleaseCommand.FORCE_SET
                or (
                    arg.command == ReserveReleaseCommand.SET
                    and (not before.reserve or src in before.reserve)
                )
            ),
            f"{name}: reserve list changed by {header!r}",
        )


def _check_read(target: Target, state: _State, header: Header, reply: Header) -> None:
    """A read that succeeded returned the disk's bytes at the request's LBA."""
    request = header.arg
    answer = reply.arg
    if not (isinstance(request, ATAArg) and isinstance(answer, ATAArg)):
        return
    if request.cmd_status not in _READS or reply.flag_error or answer.cmd_status != _DRDY:
        return
    count = request.sector_count
    _check(0 < count <= target.max_sectors, "a read of a bad sector count succeeded")
    wide = request.cmd_status == ATACmdStatus.READ_48BIT and request.flag_lba48_extended
    offset = (request.lba & (_MASK48 if wide else _MASK28)) * SECTOR_SIZE
    length = count * SECTOR_SIZE
    _check(offset + length <= len(state.disk), "a read past the end succeeded")
    _check(answer.data[:length] == state.disk[offset : offset + length], "a read returned junk")


def _fates(dispatcher: Dispatcher) -> dict[str, int]:
    """The dispatcher's counters but ``fast`` (which path answered is not a fate)."""
    counts = dispatcher.counters.as_dict()
    del counts["fast"]
    return counts


def check_frames(data: bytes) -> FrameCounters:
    """
    Run one frames input through a fresh dispatcher, checking every invariant.

    Return the dispatcher's counters (so a caller can see what the input did).
    Raise ``FuzzInvariantError`` when a rule is broken; any other exception
    is a crash of the core itself.
    """
    scenario, frames = parse_input(data)
    targets = build_targets(scenario)
    dispatcher = Dispatcher(SERVER_MAC, targets, fast_path=False)
    counters = dispatcher.counters
    fast_targets = build_targets(scenario)
    fast = Dispatcher(SERVER_MAC, fast_targets)
    into_targets = build_targets(scenario)
    into = Dispatcher(SERVER_MAC, into_targets)
    held_targets = build_targets(scenario)
    held = Dispatcher(SERVER_MAC, held_targets, hold_writes=True)
    slot = memoryview(bytearray(16384))
    for number, frame in enumerate(frames, 1):
        before = [_State.of(t) for t in targets]
        fates = sum(counters[f] for f in _FATES)
        malformed = counters["malformed"]
        answered_before = counters["answered"]
        replies = dispatcher.serve(frame)
        _check(counters["received"] == number, "a frame not counted as received")
        src, header, is_malformed = classify_frame(frame)
        # One fate each; a malformed request answered with an AoE error counts twice.
        _check(
            sum(counters[f] for f in _FATES) == fates + 1 + int(is_malformed and bool(replies)),
            "a frame not counted exactly once",
        )
        _check(bool(replies) == (counters["answered"] > answered_before), "answered miscounted")
        _check(
            counters["malformed"] - malformed == int(is_malformed),
            f"malformed counter wrong for frame {frame.hex()}",
        )
        if (
            len(frame) < ETHERNET_HEADER_SIZE + 1
            or int.from_bytes(frame[12:14], "big") != ETHERTYPE
            or src[0] & 1
            or frame[ETHERNET_HEADER_SIZE] & 0x08
        ):
            _check(not replies, "a reply to a response, a multicast source or another EtherType")
        answered: set[tuple[int, int]] = set()
        decoded: dict[tuple[int, int], Header] = {}
        request = frame[ETHERNET_HEADER_SIZE:]
        for reply in replies:
            major, minor, reply_header = _check_reply(frame, reply, targets, scenario)
            _check((major, minor) not in answered, f"two replies from e{major}.{minor}")
            answered.add((major, minor))
            if reply_header is not None:
                decoded[(major, minor)] = reply_header
        for target, state in zip(targets, before, strict=True):
            address = (target.shelf, target.slot)
            if address in answered:
                _check(
                    target.addresses(int.from_bytes(request[2:4], "big"), request[4]),
                    f"e{target.shelf}.{target.slot} answered a request for another address",
                )
                _check(_admits(state, src), "a masked-out host got a reply")
            after = _State.of(target)
            write = _expected_write(target, state, src, header)
            expected = state.disk
            if write is not None:
                offset, sectors = write
                expected = expected[:offset] + sectors + expected[offset + len(sectors) :]
                reply = decoded.get(address)
                _check(
                    reply is not None
                    and isinstance(reply.arg, ATAArg)
                    and not reply.flag_error
                    and reply.arg.cmd_status == _DRDY,
                    f"e{target.shelf}.{target.slot}: an accepted write was not acknowledged",
                )
            _check(
                after.disk == expected,
                f"e{target.shelf}.{target.slot}: the disk is not what the valid writes make it",
            )
            _check_acl(target, state, after, src, header)
            if header is not None and address in decoded:
                _check_read(target, state, header, decoded[address])
        _check(fast.serve(frame) == replies, "the fast path answered otherwise")
        _check(_fates(fast) == _fates(dispatcher), "the fast path counted otherwise")
        _check(
            [_State.of(t) for t in fast_targets] == [_State.of(t) for t in targets],
            "the fast path left other disks or ACL state",
        )
        # As under --sync: the same replies, and a refusal with every acknowledged write.
        decision = held.frame_received(frame)
        _check(
            (decision.written is None) == (decision.refusal == b""),
            "a held write without its refusal, or a refusal without a write",
        )
        _check(held.settle(decision) == replies, "holding writes answered otherwise")
        _check(_fates(held) == _fates(dispatcher), "holding writes counted otherwise")
        _check(
            [_State.of(t) for t in held_targets] == [_State.of(t) for t in targets],
            "holding writes left other disks or ACL state",
        )
        # In place, as from a receive ring slot into a transmit ring slot; what
        # that path declines goes the general way, as AoEProtocol does.
        length = into.frame_received_into(memoryview(frame), slot)
        in_place = [bytes(slot[:length])] if length else into.settle(into.general(frame))
        _check(in_place == replies, "the in-place fast path answered otherwise")
        _check(_fates(into) == _fates(dispatcher), "the in-place fast path counted otherwise")
        _check(
            [_State.of(t) for t in into_targets] == [_State.of(t) for t in targets],
            "the in-place fast path left other disks or ACL state",
        )
    _check(not counters["unencodable"], "a reply the core could not encode")
    return counters
