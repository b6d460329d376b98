"""
The fuzzers' invariants without atheris: the whole corpus, every crasher, and Hypothesis.

``fuzz/seeds/<target>/``, ``fuzz/corpus/<target>/`` and
``fuzz/crashers/<target>-*`` are replayed
through ``fuzz.harness``, exactly the checks ``make fuzz`` runs, so an input
that once crashed the core stays fixed and the coverage the corpus reached is
exercised on every ``make test``.  The Hypothesis tests feed the same checks
with valid, mutated and random frames (``tests.strategies``), as a short
fuzzing run that needs nothing but the test dependencies.  With the compiled
lane built, its inputs (``fuzz/*/lane``) and generated ones go through
``fuzz.lane_harness.check_lane``: the lane against the Python paths.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from aoe_twisted.core.wire import ETHERTYPE, MIN_FRAME_SIZE, EthernetFrame
from tests.strategies import aoe_frames, bytes_of_header, headers, macs, mutated_messages

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz.harness import (  # noqa: E402
    ALLOWED_MAC,
    SERVER_MAC,
    FuzzInvariantError,
    Scenario,
    check_decode,
    check_frames,
    encode_input,
    parse_input,
)
from fuzz.lane_harness import (  # noqa: E402
    LaneOptions,
    check_lane,
    encode_lane_input,
    parse_lane_input,
)

from aoe_twisted import lane as _lane  # noqa: E402

FUZZ = ROOT / "fuzz"
CHECKS = {"decode": check_decode, "frames": check_frames, "lane": check_lane}
#: The corpus committed to the repository stays small.
CORPUS_LIMIT = 2 * 1024 * 1024

_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _inputs(target: str) -> list[Path]:
    """Return the seeds, corpus files and crashers of ``target``."""
    paths = []
    for kind in ("seeds", "corpus"):
        directory = FUZZ / kind / target
        if directory.exists():
            paths += sorted(directory.iterdir())
    return paths + sorted((FUZZ / "crashers").glob(f"{target}-*"))


class CorpusReplayTests(SynchronousTestCase):
    """Every input the fuzzers kept passes the checks they assert."""

    def replay(self, target: str) -> int:
        """Run every seed, corpus file and crasher of ``target`` through its check."""
        check = CHECKS[target]
        failures = []
        paths = _inputs(target)
        for path in paths:
            try:
                check(path.read_bytes())
            except Exception as e:
                failures.append(f"{path.relative_to(ROOT)}: {type(e).__name__}: {e}")
        self.assertEqual(failures, [])
        return len(paths)

    def test_decode_corpus(self) -> None:
        """The codec's inputs decode (or fail with WireError) and round-trip."""
        self.assertGreater(self.replay("decode"), 10)

    def test_frames_corpus(self) -> None:
        """The dispatcher's inputs keep every dispatcher invariant."""
        self.assertGreater(self.replay("frames"), 10)

    def test_lane_corpus(self) -> None:
        """The lane's inputs: the compiled lane answers as the Python paths do."""
        if _lane.native is None:
            raise SkipTest(f"the compiled lane is not built ({_lane.lane_reason})")
        self.assertGreater(self.replay("lane"), 10)

    def test_corpus_small(self) -> None:
        """The committed seeds, corpus and crashers stay under 2 MB."""
        files = [
            p for kind in ("seeds", "corpus", "crashers")
            for p in (FUZZ / kind).rglob("*") if p.is_file()
        ]
        self.assertLess(sum(p.stat().st_size for p in files), CORPUS_LIMIT)


class HarnessTests(SynchronousTestCase):
    """The checks catch what they are there to catch."""

    def test_input_format(self) -> None:
        """``encode_input`` and ``parse_input`` agree; frames over the MTU are left out."""
        scenario = Scenario.from_byte(0x2D)
        self.assertEqual(Scenario.from_byte(scenario.to_byte()), scenario)
        frames = [b"a" * 20, b"", b"b" * 9015, b"c" * 9014]
        parsed_scenario, parsed = parse_input(encode_input(scenario, frames))
        self.assertEqual(parsed_scenario, scenario)
        self.assertEqual(parsed, [b"a" * 20, b"", b"c" * 9014])

    def test_broken_core_caught(self) -> None:
        """A core whose READ also writes the disk is caught by the disk oracle."""
        from aoe_twisted.core import ata
        from aoe_twisted.core.wire import ATAArg, ATACmdStatus, Command, Header

        read = Header(major=1, minor=0, command=Command.ISSUE_ATA_COMMAND, tag=b"tag1",
                      arg=ATAArg(sector_count=1, cmd_status=ATACmdStatus.READ_28BIT))
        frame = EthernetFrame(SERVER_MAC, ALLOWED_MAC, ETHERTYPE, read.to_bytes()).to_bytes()
        data = encode_input(Scenario.from_byte(0), [frame])
        check_frames(data)
        honest = ata._HANDLERS[ATACmdStatus.READ_28BIT]

        def read_and_scribble(request: Any, backend: Any, *args: Any) -> Any:
            backend.write(0, bytes(512))
            return honest(request, backend, *args)

        self.patch(ata, "_HANDLERS", {**ata._HANDLERS, ATACmdStatus.READ_28BIT: read_and_scribble})
        error = self.assertRaises(FuzzInvariantError, check_frames, data)
        self.assertIn("the disk is not what the valid writes make it", str(error))


def _write(sectors: int = 1, lba: int = 5, tag: int = 7) -> bytes:
    """A WRITE SECTORS EXT frame to e1.0 from ``ALLOWED_MAC``."""
    from aoe_twisted.core.wire import ATAArg, ATACmdStatus, Command, Header

    arg = ATAArg(flag_lba48_extended=True, flag_write=True, sector_count=sectors,
                 cmd_status=ATACmdStatus.WRITE_48BIT, lba=lba, data=b"\x5a" * 512 * sectors)
    header = Header(major=1, minor=0, command=Command.ISSUE_ATA_COMMAND,
                    tag=tag.to_bytes(4, "big"), arg=arg)
    return EthernetFrame(SERVER_MAC, ALLOWED_MAC, ETHERTYPE, header.to_bytes()).to_bytes()


def _read(sectors: int = 2, lba: int = 3, tag: int = 8) -> bytes:
    """A READ SECTORS EXT frame to e1.0 from ``ALLOWED_MAC``."""
    from aoe_twisted.core.wire import ATAArg, ATACmdStatus, Command, Header

    arg = ATAArg(flag_lba48_extended=True, sector_count=sectors,
                 cmd_status=ATACmdStatus.READ_48BIT, lba=lba)
    header = Header(major=1, minor=0, command=Command.ISSUE_ATA_COMMAND,
                    tag=tag.to_bytes(4, "big"), arg=arg)
    return EthernetFrame(SERVER_MAC, ALLOWED_MAC, ETHERTYPE, header.to_bytes()).to_bytes()


class LaneHarnessTests(SynchronousTestCase):
    """The lane check compares what it says it compares, and catches a lane that differs."""

    def setUp(self) -> None:
        if _lane.native is None:
            raise SkipTest(f"the compiled lane is not built ({_lane.lane_reason})")

    def test_input_format(self) -> None:
        """``encode_lane_input`` and ``parse_lane_input`` agree; the ring keeps long frames."""
        options = LaneOptions.from_byte(0xA7)
        self.assertEqual(LaneOptions.from_byte(options.to_byte()), options)
        scenario = Scenario.from_byte(0)
        frames = [b"a" * 20, b"b" * 1600]
        self.assertEqual(
            parse_lane_input(encode_lane_input(options, 9, scenario, frames)),
            (options, 9, scenario, frames),
        )
        answer = LaneOptions.from_byte(0)
        self.assertEqual(parse_lane_input(encode_lane_input(answer, 0, scenario, frames))[3],
                         frames[:1])

    def test_lane_answers(self) -> None:
        """Plain reads and writes are answered by the lane, in both modes, on every disk."""
        frames = [_write(), _read(), _write(2, 62, 9), _read(1, 63, 10)]
        for byte in (0x00, 0x01, 0x02, 0x03, 0x20, 0x21, 0x22, 0x23):
            counters = check_lane(encode_lane_input(LaneOptions.from_byte(byte), 0,
                                                    Scenario.from_byte(0), frames))
            assert counters is not None
            self.assertEqual(counters["fast"], 4, f"options {byte:#x}")

    def test_held_and_refused(self) -> None:
        """Writes held for group commit, released; the first target's refused (seed bit 0)."""
        frames = [_write(), _read(), _write(1, 6, 11)]
        for seed in (0, 1):
            counters = check_lane(encode_lane_input(LaneOptions.from_byte(0x28), seed,
                                                    Scenario.from_byte(0), frames))
            assert counters is not None
            self.assertEqual(counters["fast"], 3)

    def test_broken_lane_caught(self) -> None:
        """A lane whose replies differ by one byte, or that answers nothing, is caught."""
        native = _lane.native

        class Scribbling:
            def __init__(self, *args: Any) -> None:
                self.lane = native.Lane(*args)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.lane, name)

            def answer(self, table: Any, frame: bytes, reply: bytearray) -> int:
                written = self.lane.answer(table, frame, reply)
                if written:
                    reply[written - 1] ^= 1
                return written  # type: ignore[no-any-return]

        class Declining(Scribbling):
            def answer(self, table: Any, frame: bytes, reply: bytearray) -> int:
                return 0

            def drain(self, table: Any, rx: int, tx: int, *rest: Any) -> tuple[int, ...]:
                return (native.STOP_PYTHON, rx, tx, 0, 0, 0, rest[1])

        data = encode_lane_input(LaneOptions.from_byte(0), 0, Scenario.from_byte(0), [_read()])
        check_lane(data)
        error = self.assertRaises(FuzzInvariantError, check_lane, data, Scribbling)
        self.assertIn("answered otherwise", str(error))
        error = self.assertRaises(FuzzInvariantError, check_lane, data, Declining)
        self.assertIn("declined a frame", str(error))
        ring = encode_lane_input(LaneOptions.from_byte(0x20), 0, Scenario.from_byte(0), [_read()])
        error = self.assertRaises(FuzzInvariantError, check_lane, ring, Declining)
        self.assertIn("declined a frame", str(error))


class HypothesisTests(SynchronousTestCase):
    """The invariants hold for generated, mutated and random frames."""

    @_settings
    @given(st.binary(max_size=200))
    def test_decode_random(self, data: bytes) -> None:
        """Random bytes: only WireError, and round trips."""
        check_decode(data)

    @_settings
    @given(st.one_of(bytes_of_header(), mutated_messages()))
    def test_decode_messages(self, data: bytes) -> None:
        """Valid and mutated messages, bare and in a frame."""
        check_decode(data)
        check_decode(EthernetFrame(SERVER_MAC, ALLOWED_MAC, ETHERTYPE, data).to_bytes())

    @_settings
    @given(
        st.integers(0, 255),
        st.lists(
            st.one_of(
                aoe_frames.map(EthernetFrame.to_bytes),
                headers.map(
                    lambda h: EthernetFrame(
                        SERVER_MAC, ALLOWED_MAC, ETHERTYPE,
                        attrs.evolve(h, major=1, minor=0, flag_response=False).to_bytes(),
                    ).to_bytes()
                ),
                st.tuples(macs, st.sampled_from([ALLOWED_MAC, SERVER_MAC]), mutated_messages())
                .map(lambda t: EthernetFrame(t[1], t[0], ETHERTYPE, t[2]).to_bytes()),
                st.binary(max_size=MIN_FRAME_SIZE + 40),
            ),
            max_size=6,
        ),
    )
    def test_frames(self, scenario: int, frames: list[bytes]) -> None:
        """Sequences of valid, mutated and random frames under every scenario."""
        check_frames(encode_input(Scenario.from_byte(scenario), frames))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.integers(0, 255),
        st.integers(0, 255),
        st.sampled_from([0x00, 0x01, 0x20, 0x23, 0x80]),
        st.lists(
            st.one_of(
                st.builds(_write, st.integers(1, 3), st.integers(0, 70), st.integers(0, 3)),
                st.builds(_read, st.integers(0, 3), st.integers(0, 70), st.integers(0, 3)),
                aoe_frames.map(EthernetFrame.to_bytes),
                st.binary(max_size=MIN_FRAME_SIZE + 40),
            ),
            max_size=6,
        ),
    )
    def test_lane(self, options: int, seed: int, scenario: int, frames: list[bytes]) -> None:
        """The compiled lane against the Python paths on generated frames and rings."""
        if _lane.native is None:
            raise SkipTest(f"the compiled lane is not built ({_lane.lane_reason})")
        check_lane(encode_lane_input(LaneOptions.from_byte(options), seed,
                                     Scenario.from_byte(scenario), frames))
