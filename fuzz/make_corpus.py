#!/usr/bin/env python3
"""
Write the seeds: every frame of the captures in ``tests/data`` and hand-built
frames of each command, for the three fuzz targets.

``fuzz/seeds/decode/`` gets one file per distinct frame or AoE message (named
by SHA-1, as libFuzzer names inputs); ``fuzz/seeds/frames/`` gets frames
inputs (``fuzz.harness.encode_input``): each request alone under a few
scenarios, and short sequences that set ACL state and then read or write;
``fuzz/seeds/lane/`` gets the same under lane options (``LANE_PREFIXES``).
The seeds stay as written; ``make fuzz`` starts from them and keeps what it
finds, minimized, in ``fuzz/corpus/<target>/``.  Re-run this after changing
the input format.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aoe_twisted.core.wire import (  # noqa: E402
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ETHERTYPE,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    EthernetFrame,
    Header,
    MACMaskArg,
    MACMaskCommand,
    ReserveReleaseArg,
    ReserveReleaseCommand,
)
from fuzz.harness import ALLOWED_MAC, SERVER_MAC, Scenario, encode_input  # noqa: E402
from tests.pcap import read_pcap  # noqa: E402

__all__ = ["LANE_PREFIXES", "lane_inputs", "main", "seed_frames"]

OTHER_MAC = bytes.fromhex("020000000b02")


def _frame(header: Header, src: bytes = ALLOWED_MAC, dst: bytes = SERVER_MAC) -> bytes:
    """Return ``header`` in an Ethernet frame."""
    return EthernetFrame(dst, src, ETHERTYPE, header.to_bytes()).to_bytes()


def _request(shelf: int, slot: int, command: Command, arg: object, tag: int = 1) -> Header:
    """Return a request header."""
    return Header(major=shelf, minor=slot, command=command, tag=tag.to_bytes(4, "big"), arg=arg)


def _ata(shelf: int, slot: int, arg: ATAArg, tag: int = 1) -> Header:
    return _request(shelf, slot, Command.ISSUE_ATA_COMMAND, arg, tag)


def seed_frames() -> list[bytes]:
    """Return hand-built frames: each command and sub-command, valid, to e1.0."""
    frames = []
    sector = bytes(range(256)) * 2
    for opcode, extended in ((ATACmdStatus.WRITE_48BIT, True), (ATACmdStatus.WRITE_28BIT, False)):
        arg = ATAArg(flag_lba48_extended=extended, flag_write=True, sector_count=1,
                     cmd_status=opcode, lba=5, data=sector)
        frames.append(_frame(_ata(1, 0, arg)))
    frames.append(_frame(_ata(1, 0, ATAArg(flag_lba48_extended=True, flag_write=True,
                                          sector_count=2, cmd_status=ATACmdStatus.WRITE_48BIT,
                                          lba=62, data=sector * 2))))
    for opcode, extended in ((ATACmdStatus.READ_48BIT, True), (ATACmdStatus.READ_28BIT, False)):
        arg = ATAArg(flag_lba48_extended=extended, sector_count=2, cmd_status=opcode, lba=3)
        frames.append(_frame(_ata(1, 0, arg)))
    for opcode in (ATACmdStatus.IDENTIFY, ATACmdStatus.FLUSH, ATACmdStatus.FLUSH_EXT,
                   ATACmdStatus.CHECK_POWER):
        frames.append(_frame(_ata(1, 0, ATAArg(sector_count=1, cmd_status=opcode))))
    for ccmd in ConfigCommand:
        arg = ConfigArg(command=ccmd, string_length=4, string=b"fuzz")
        frames.append(_frame(_request(1, 0, Command.QUERY_CONFIG_INFORMATION, arg)))
    discover = _request(BROADCAST_MAJOR, BROADCAST_MINOR, Command.QUERY_CONFIG_INFORMATION,
                        ConfigArg())
    frames.append(_frame(discover, dst=BROADCAST_MAC))
    frames.append(_frame(_request(1, 0, Command.MAC_MASK_LIST, MACMaskArg(MACMaskCommand.READ))))
    edit = MACMaskArg(MACMaskCommand.EDIT, 0, 3, (
        Directive(DirectiveCommand.ADD, ALLOWED_MAC),
        Directive(DirectiveCommand.ADD, OTHER_MAC),
        Directive(DirectiveCommand.DELETE, OTHER_MAC),
    ))
    frames.append(_frame(_request(1, 0, Command.MAC_MASK_LIST, edit)))
    for rcmd in ReserveReleaseCommand:
        arg = ReserveReleaseArg(rcmd, 1, (ALLOWED_MAC,))
        frames.append(_frame(_request(1, 0, Command.RESERVE_RELEASE, arg)))
    # A response (R flag), an unknown command, a wrong version: each must get no action.
    response = Header(flag_response=True, major=1, minor=0,
                      command=Command.QUERY_CONFIG_INFORMATION, tag=bytes(4), arg=ConfigArg())
    frames.append(_frame(response))
    frames.append(_frame(response, src=OTHER_MAC)[:14] + b"\x10\x00\x00\x01\x00\x09" + bytes(4))
    frames.append(_frame(discover)[:14] + b"\x20" + _frame(discover)[15:])
    return frames


def capture_frames() -> list[bytes]:
    """Return every distinct frame of the captures in ``tests/data``."""
    frames: list[bytes] = []
    for path in sorted((ROOT / "tests" / "data").glob("*.pcap")):
        for frame in read_pcap(path).frames:
            if frame not in frames:
                frames.append(frame)
    return frames


def frames_inputs(hand: list[bytes], captured: list[bytes]) -> list[bytes]:
    """Return the frames-target seeds."""
    plain = Scenario(0, False, False, False, False, False, False)
    jumbo = Scenario(0, False, False, False, True, False, False)
    configured = Scenario(0, False, False, True, False, False, False)
    inputs = [encode_input(scenario, [frame]) for frame in hand for scenario in (plain, configured)]
    for scenario_byte in (0x01, 0x02, 0x03, 0x04, 0x08, 0x0C, 0x10, 0x44, 0x48, 0x80):
        inputs.append(encode_input(Scenario.from_byte(scenario_byte), hand[:1] + hand[3:4]))
    write, read = hand[0], hand[3]
    reserve_other = _frame(_request(1, 0, Command.RESERVE_RELEASE, ReserveReleaseArg(
        ReserveReleaseCommand.SET, 1, (OTHER_MAC,))))
    inputs.append(encode_input(plain, [reserve_other, write, read]))
    mask_other = _frame(_request(1, 0, Command.MAC_MASK_LIST, MACMaskArg(
        MACMaskCommand.EDIT, 0, 1, (Directive(DirectiveCommand.ADD, OTHER_MAC),))))
    inputs.append(encode_input(plain, [mask_other, write, read]))
    for frame in captured:
        scenario = jumbo if len(frame) > 1514 else plain
        inputs.append(encode_input(scenario, [frame]))
    return inputs


#: Lane options and ring seed bytes the lane seeds cycle through (``fuzz.lane_harness``):
#: answer() on each kind of disk, with writes held, a sync target, a faulty descriptor;
#: the ring walk clean and with hostile slot headers, a refused group commit.
LANE_PREFIXES = (
    b"\x00\x00", b"\x41\x01", b"\x56\x02", b"\x5b\x03",
    b"\x20\x00", b"\x21\x35", b"\x3a\x91", b"\xa3\xf7", b"\x2e\x00", b"\x30\x4b",
)


def lane_inputs(frames: list[bytes]) -> list[bytes]:
    """Return the lane-target seeds: each frames seed under one of ``LANE_PREFIXES``."""
    return [LANE_PREFIXES[i % len(LANE_PREFIXES)] + data for i, data in enumerate(frames)]


def _write_all(directory: Path, inputs: list[bytes]) -> int:
    """Write each input to ``directory`` named by its SHA-1, as libFuzzer does."""
    directory.mkdir(parents=True, exist_ok=True)
    for data in inputs:
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return len(set(inputs))


def main() -> None:
    """Write both targets' seeds under ``fuzz/seeds``."""
    corpus = ROOT / "fuzz" / "seeds"
    hand = seed_frames()
    captured = capture_frames()
    decode = hand + captured + [frame[14:] for frame in hand]
    print("decode:", _write_all(corpus / "decode", decode), "seeds")
    frames = frames_inputs(hand, captured)
    print("frames:", _write_all(corpus / "frames", frames), "seeds")
    print("lane:", _write_all(corpus / "lane", lane_inputs(frames)), "seeds")


if __name__ == "__main__":
    main()
