"""
The fuzzers' invariants without atheris: the whole corpus, every crasher, and Hypothesis.

``fuzz/seeds/<target>/``, ``fuzz/corpus/<target>/`` and
``fuzz/crashers/<target>-*`` are replayed
through ``fuzz.harness``, exactly the checks ``make fuzz`` runs, so an input
that once crashed the core stays fixed and the coverage the corpus reached is
exercised on every ``make test``.  The Hypothesis tests feed the same checks
with valid, mutated and random frames (``tests.strategies``), as a short
fuzzing run that needs nothing but the test dependencies.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

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

FUZZ = ROOT / "fuzz"
CHECKS = {"decode": check_decode, "frames": check_frames}
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
