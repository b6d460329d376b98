"""
Property tests for ``aoe_twisted.core.wire``: round trips, robustness against any bytes, padding.

The example tests in ``tests.test_wire`` pin the byte layout; these check the
codec's promises over the whole valid input space (``tests.strategies``) and
over garbage: decoding anything raises nothing but ``WireError`` (the idea of
mdlayher/aoe's ``fuzz.go``, which found a real crasher there).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.core.wire import (
    ATAArg,
    ConfigArg,
    Directive,
    EthernetFrame,
    Header,
    MACMaskArg,
    RawArg,
    ReserveReleaseArg,
    WireError,
)
from tests import strategies as aoe

#: Enough examples to reach the argument decoders' corners, few enough for a quick run.
_settings = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class RoundTripTests(SynchronousTestCase):
    """``from_bytes(to_bytes(m)) == m`` for every message class."""

    @_settings
    @given(aoe.ata_args())
    def test_ataArg(self, arg: ATAArg) -> None:
        """An ATA argument, its flags, 48-bit LBA and data survive a round trip."""
        self.assertEqual(ATAArg.from_bytes(arg.to_bytes()), arg)

    @_settings
    @given(aoe.config_args())
    def test_configArg(self, arg: ConfigArg) -> None:
        """A config argument and its string (up to 1024 bytes) survive a round trip."""
        self.assertEqual(ConfigArg.from_bytes(arg.to_bytes()), arg)

    @_settings
    @given(aoe.directives())
    def test_directive(self, directive: Directive) -> None:
        """A directive survives a round trip."""
        self.assertEqual(Directive.from_bytes(directive.to_bytes()), directive)

    @_settings
    @given(aoe.mac_mask_args())
    def test_macMaskArg(self, arg: MACMaskArg) -> None:
        """A MAC mask argument with up to 255 directives survives a round trip."""
        self.assertEqual(MACMaskArg.from_bytes(arg.to_bytes()), arg)

    @_settings
    @given(aoe.reserve_release_args())
    def test_reserveReleaseArg(self, arg: ReserveReleaseArg) -> None:
        """A reserve/release argument with up to 255 MACs survives a round trip."""
        self.assertEqual(ReserveReleaseArg.from_bytes(arg.to_bytes()), arg)

    @_settings
    @given(aoe.headers)
    def test_header(self, header: Header) -> None:
        """A message of any command, with the argument kind it calls for, survives a round trip."""
        self.assertEqual(Header.from_bytes(header.to_bytes()), header)

    @_settings
    @given(aoe.raw_error_headers())
    def test_rawErrorHeader(self, header: Header) -> None:
        """An error response whose argument is too short to decode round-trips as ``RawArg``."""
        decoded = Header.from_bytes(header.to_bytes())
        self.assertIsInstance(decoded.arg, RawArg)
        self.assertEqual(decoded, header)

    @_settings
    @given(aoe.ethernet_frames)
    def test_ethernetFrame(self, frame: EthernetFrame) -> None:
        """An Ethernet frame with any EtherType and payload survives a round trip."""
        self.assertEqual(EthernetFrame.from_bytes(frame.to_bytes()), frame)

    @_settings
    @given(aoe.aoe_frames)
    def test_aoeFrame(self, frame: EthernetFrame) -> None:
        """An AoE message in a padded Ethernet frame decodes back from the frame's bytes."""
        message = Header.from_bytes(frame.payload)
        received = EthernetFrame.from_bytes(frame.to_bytes(pad=True))
        self.assertEqual((received.dst, received.src), (frame.dst, frame.src))
        self.assertEqual(received.ethertype, frame.ethertype)
        if not isinstance(message.arg, ATAArg):
            self.assertEqual(Header.from_bytes(received.payload), message)


class RobustnessTests(SynchronousTestCase):
    """Decoding any bytes either succeeds or raises ``WireError``, never anything else."""

    def assertDecodesOrWireError(self, data: bytes) -> None:
        """Decode ``data`` as a message; a successful decode must re-encode without error."""
        try:
            message = Header.from_bytes(data)
        except WireError:
            return
        message.to_bytes()

    @_settings
    @given(st.binary(max_size=64))
    def test_arbitraryMessageBytes(self, data: bytes) -> None:
        """``Header.from_bytes`` of arbitrary bytes raises nothing but ``WireError``."""
        self.assertDecodesOrWireError(data)

    @_settings
    @given(aoe.mutated_messages())
    def test_mutatedMessages(self, data: bytes) -> None:
        """Truncated, bit-flipped or overwritten valid messages raise nothing but ``WireError``."""
        self.assertDecodesOrWireError(data)

    @_settings
    @given(st.binary(max_size=80))
    def test_arbitraryFrameBytes(self, data: bytes) -> None:
        """Decoding arbitrary bytes as a frame, then its payload, raises only ``WireError``."""
        try:
            frame = EthernetFrame.from_bytes(data)
        except WireError:
            return
        self.assertEqual(frame.to_bytes(), data)
        self.assertDecodesOrWireError(frame.payload)

    @_settings
    @given(aoe.mutated_messages(aoe.aoe_frames.map(lambda f: f.to_bytes(pad=True))))
    def test_mutatedFrames(self, data: bytes) -> None:
        """Mutated whole AoE frames raise nothing but ``WireError`` at either layer."""
        try:
            frame = EthernetFrame.from_bytes(data)
        except WireError:
            return
        self.assertDecodesOrWireError(frame.payload)


class PaddingTests(SynchronousTestCase):
    """Bytes after a message that ends where its counts say are ignored."""

    @_settings
    @given(aoe.non_ata_headers, st.binary(min_size=1, max_size=64))
    def test_paddingIgnored(self, header: Header, padding: bytes) -> None:
        """Appending any bytes to a config, MAC mask or reserve message does not change it."""
        self.assertEqual(Header.from_bytes(header.to_bytes() + padding), header)

    @_settings
    @given(aoe.ata_headers, st.binary(min_size=1, max_size=64))
    def test_ataPaddingIsData(self, header: Header, padding: bytes) -> None:
        """Bytes appended to an ATA message become the end of its data, nothing else changes."""
        decoded = Header.from_bytes(header.to_bytes() + padding)
        self.assertEqual(decoded.arg.data, header.arg.data + padding)
