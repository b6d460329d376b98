"""
Tests for ``aoe_twisted.backends.slice``: part of a disk served as a disk of its own.

The slices are of real files (opened with ``open_backend("file:PATH")``) and
real memory disks; the one fake (``_PlainBackend``) is a disk with none of
the optional interfaces, to show that a slice declares none either.
IDENTIFY is asked for the way an initiator asks, through a ``Dispatcher``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyObject

from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.identity import slice_identity
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.backends.shared_memory import SharedMemoryBackend
from aoe_twisted.backends.slice import SliceBackend, slice_backend
from aoe_twisted.backendspec import open_backend
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.identify import LBA28_MAX_SECTORS, disk_serial, disk_wwn, page_identity
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import SECTOR_SIZE, ATAArg, ATACmdStatus, EthernetFrame, Header
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import (
    IBlockBackend,
    IDataSyncBackend,
    IDescriptorBackend,
    IDiskIdentity,
    IProcessShareableBackend,
    IZeroCopyBackend,
)
from aoe_twisted.testing.frames import TARGET_MAC, ata_request, ethernet_frame
from aoe_twisted.workers import _describe_backend, _open_backend

#: The optional interfaces a slice may declare, besides ``IBlockBackend``.
OPTIONAL = (
    IZeroCopyBackend,
    IDataSyncBackend,
    IDiskIdentity,
    IDescriptorBackend,
    IProcessShareableBackend,
)

MIB = 1 << 20


def _pattern(size: int, seed: int = 0) -> bytes:
    """Return ``size`` reproducible pseudo-random bytes: every sector different."""
    return random.Random(seed).randbytes(size)


def _declared(backend: object) -> set[InterfaceClass]:
    """Return which of ``OPTIONAL`` ``backend`` provides."""
    return {interface for interface in OPTIONAL if interface.providedBy(backend)}


@implementer(IBlockBackend)
class _PlainBackend:
    """A disk of zeros with no optional interface: what a minimal plugin provides."""

    read_only = False

    def __init__(self, size: int) -> None:
        self.size = size
        self.closed = False

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write(self, offset: int, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _FileMixin(SynchronousTestCase):
    """Make image files and open them as ``file:`` backends closed at cleanup."""

    def make_file(self, size: int = MIB, contents: bytes | None = None) -> str:
        """Return the path of a new file of ``size`` bytes of ``_pattern`` (or ``contents``)."""
        path = self.mktemp()
        Path(path).write_bytes(_pattern(size) if contents is None else contents)
        return path

    def open_file(self, path: str, read_only: bool = False) -> FileBackend:
        """Open ``path`` with ``open_backend("file:PATH")``; closed at cleanup."""
        backend = open_backend(f"file:{path}", read_only=read_only)
        self.addCleanup(backend.close)
        assert isinstance(backend, FileBackend)
        return backend


class SliceSpecTests(_FileMixin):
    """``slice_backend`` checks the slice and returns the whole disk as it is."""

    def assert_refused(self, offset: int, length: int, message: str, size: int = MIB) -> None:
        """Slicing a ``size``-byte disk at ``offset``, ``length`` is refused with ``message``."""
        disk = _PlainBackend(size)
        error = self.assertRaises(BackendSpecError, slice_backend, disk, offset, length)
        self.assertEqual(str(error), message)
        self.assertNotIn("\n", str(error))
        # SliceBackend itself refuses the same slices, with the same words.
        error = self.assertRaises(BackendSpecError, SliceBackend, disk, offset, length)
        self.assertEqual(str(error), message)

    def test_past_the_end(self) -> None:
        """A slice that runs past the end is refused, naming offset, length and disk size."""
        self.assert_refused(
            MIB, 4096, "offset 1048576 + length 4096 is past the end of the disk (1048576 bytes)"
        )
        self.assert_refused(
            MIB - 512,
            1024,
            "offset 1048064 + length 1024 is past the end of the disk (1048576 bytes)",
        )

    def test_offset_past_the_end(self) -> None:
        """An offset beyond the disk, to its end, is refused."""
        self.assert_refused(
            2 * MIB, 0, "offset 2097152 is past the end of the disk (1048576 bytes)"
        )

    def test_empty(self) -> None:
        """A slice from the very end to the end is empty, and refused."""
        self.assert_refused(
            MIB, 0, "offset 1048576 is the end of the disk (1048576 bytes): the slice is empty"
        )

    def test_negative(self) -> None:
        """A negative offset or length is refused."""
        self.assert_refused(-512, 0, "offset -512 is negative")
        self.assert_refused(0, -512, "length -512 is negative")

    def test_not_whole_sectors(self) -> None:
        """An offset or length that is not a whole number of sectors is refused."""
        self.assert_refused(100, 0, "offset 100 is not a whole number of 512-byte sectors")
        self.assert_refused(0, 4000, "length 4000 is not a whole number of 512-byte sectors")

    def test_whole_disk_is_the_disk(self) -> None:
        """Offset 0 with length 0 or the disk's size is the backend itself, no wrapper."""
        disk = _PlainBackend(MIB)
        self.assertIs(slice_backend(disk, 0, 0), disk)
        self.assertIs(slice_backend(disk, 0, MIB), disk)

    def test_to_the_end(self) -> None:
        """Length 0 is the rest of the disk from the offset; a length is taken as it is."""
        disk = _PlainBackend(MIB)
        rest = slice_backend(disk, 4096, 0)
        self.assertIsInstance(rest, SliceBackend)
        self.assertEqual(rest.size, MIB - 4096)
        head = slice_backend(disk, 0, 4096)
        self.assertEqual(head.size, 4096)

    def test_not_a_backend(self) -> None:
        """A slice of something that is not an ``IBlockBackend`` is a ``TypeError``."""
        self.assertRaises(TypeError, SliceBackend, object(), 0, 512)

    def test_slice_of_slice(self) -> None:
        """
        A slice of a slice is one slice of the disk under both: the same bytes
        and the same identity as that slice made directly.
        """
        path = self.make_file()
        outer = slice_backend(self.open_file(path), 64 * 1024, 512 * 1024)
        inner = slice_backend(outer, 4096, 8192)
        assert isinstance(outer, SliceBackend) and isinstance(inner, SliceBackend)
        self.assertIs(inner.inner, outer.inner)
        self.assertEqual((inner.offset, inner.size), (64 * 1024 + 4096, 8192))
        self.assertEqual(inner.read(0, 8192), _pattern(MIB)[68 * 1024 : 76 * 1024])
        direct = slice_backend(self.open_file(path), 68 * 1024, 8192)
        self.assertEqual(inner.disk_identity(), direct.disk_identity())  # type: ignore[attr-defined]
        self.assertIs(slice_backend(outer, 0, 0), outer)


class SliceIOTests(_FileMixin):
    """A slice reads and writes its own bytes of the disk, and no others."""

    def test_reads_its_bytes(self) -> None:
        """Byte 0 of the slice is byte ``offset`` of the file."""
        path = self.make_file()
        backend = slice_backend(self.open_file(path), 8192, 16384)
        self.assertEqual(backend.read(0, 16384), _pattern(MIB)[8192 : 8192 + 16384])
        self.assertEqual(backend.read(16384 - 512, 512), _pattern(MIB)[24576 - 512 : 24576])

    def test_writes_its_bytes(self) -> None:
        """A write lands at ``offset`` + its offset in the file, nowhere else."""
        path = self.make_file()
        backend = slice_backend(self.open_file(path), 8192, 16384)
        backend.write(512, b"\xaa" * 1024)
        expected = bytearray(_pattern(MIB))
        expected[8192 + 512 : 8192 + 1536] = b"\xaa" * 1024
        self.assertEqual(Path(path).read_bytes(), bytes(expected))

    def test_read_into(self) -> None:
        """``read_into`` fills the view from the slice's bytes and says how many."""
        path = self.make_file()
        backend = slice_backend(self.open_file(path), 4096, 4096)
        buffer = bytearray(1024)
        self.assertEqual(backend.read_into(512, memoryview(buffer)), 1024)  # type: ignore[attr-defined]
        self.assertEqual(bytes(buffer), _pattern(MIB)[4608:5632])

    def test_write_memoryview(self) -> None:
        """A zero-copy slice takes a ``memoryview`` to write, as its disk does."""
        backend = slice_backend(MemoryBackend(MIB), 4096, 4096)
        backend.write(0, memoryview(b"\x55" * 512))
        self.assertEqual(backend.read(0, 512), b"\x55" * 512)

    def test_outside_refused(self) -> None:
        """Ranges that leave the slice raise ``ValueError`` and leave the file as it was."""
        path = self.make_file()
        backend = slice_backend(self.open_file(path), 8192, 4096)
        self.assertRaises(ValueError, backend.read, 4096, 1)
        self.assertRaises(ValueError, backend.read, -512, 512)
        self.assertRaises(ValueError, backend.read, 0, -1)
        self.assertRaises(ValueError, backend.write, 3584, b"x" * 1024)
        self.assertRaises(ValueError, backend.write, -1, b"x")
        self.assertRaises(ValueError, backend.read_into, 4095, memoryview(bytearray(2)))  # type: ignore[attr-defined]
        self.assertRaises(ValueError, backend.read_into, -1, memoryview(bytearray(2)))  # type: ignore[attr-defined]
        self.assertEqual(Path(path).read_bytes(), _pattern(MIB))

    def test_read_only(self) -> None:
        """A slice of a read-only disk is read-only and refuses writes with ``EROFS``."""
        path = self.make_file()
        backend = slice_backend(self.open_file(path, read_only=True), 8192, 4096)
        self.assertIs(backend.read_only, True)
        error = self.assertRaises(OSError, backend.write, 0, b"x" * 512)
        self.assertEqual(error.errno, errno.EROFS)
        self.assertIs(slice_backend(self.open_file(path), 8192, 4096).read_only, False)

    def test_close_closes_inner(self) -> None:
        """Closing the slice closes the disk it slices."""
        inner = self.open_file(self.make_file())
        backend = slice_backend(inner, 8192, 4096)
        backend.close()
        self.assertEqual(inner.fileno(), -1)

    @settings(max_examples=60, deadline=None)
    @given(data=st.data())
    def test_never_leaves_the_slice(self, data: st.DataObject) -> None:
        """
        Any slice of a file and any reads and writes, in range or not, never
        change a byte of the file outside ``[offset, offset + length)``, and
        reads give back what was written.
        """
        sectors = data.draw(st.integers(1, 32), label="disk sectors")
        first = data.draw(st.integers(0, sectors - 1), label="first sector")
        count = data.draw(st.integers(0, sectors - first), label="sectors (0: to the end)")
        offset, length = first * SECTOR_SIZE, count * SECTOR_SIZE
        original = _pattern(sectors * SECTOR_SIZE, data.draw(st.integers(0, 1000), label="seed"))
        path = self.make_file(contents=original)
        backend = slice_backend(open_backend(f"file:{path}"), offset, length)
        try:
            size = backend.size
            self.assertEqual(size, length or sectors * SECTOR_SIZE - offset)
            model = bytearray(original[offset : offset + size])
            reach = 2 * SECTOR_SIZE
            operations = data.draw(
                st.lists(
                    st.tuples(
                        st.sampled_from(["read", "read_into", "write"]),
                        st.integers(-reach, size + reach),
                        st.integers(-1, 3 * SECTOR_SIZE),
                    ),
                    max_size=10,
                ),
                label="operations",
            )
            for index, (kind, at, amount) in enumerate(operations):
                inside = at >= 0 and amount >= 0 and at + amount <= size
                if kind == "write":
                    payload = bytes([index + 1]) * max(amount, 0)
                    if at >= 0 and at + len(payload) <= size:
                        backend.write(at, payload)
                        model[at : at + len(payload)] = payload
                    else:
                        self.assertRaises(ValueError, backend.write, at, payload)
                elif kind == "read_into":
                    view = memoryview(bytearray(max(amount, 0)))
                    if at >= 0 and at + len(view) <= size:
                        backend.read_into(at, view)  # type: ignore[attr-defined]
                        self.assertEqual(view.tobytes(), model[at : at + len(view)])
                    else:
                        self.assertRaises(ValueError, backend.read_into, at, view)  # type: ignore[attr-defined]
                elif inside:
                    self.assertEqual(backend.read(at, amount), model[at : at + amount])
                else:
                    self.assertRaises(ValueError, backend.read, at, amount)
            self.assertEqual(backend.read(0, size), model)
        finally:
            backend.close()
        expected = original[:offset] + model + original[offset + size :]
        self.assertEqual(Path(path).read_bytes(), expected)


class SliceCapabilityTests(_FileMixin):
    """A slice declares, and forwards, exactly the optional interfaces its disk has."""

    def verify(self, backend: object, interfaces: set[InterfaceClass]) -> None:
        """``backend`` provides ``interfaces`` and no other optional one, each verified."""
        self.assertEqual(_declared(backend), interfaces)
        self.assertTrue(verifyObject(IBlockBackend, backend))
        for interface in interfaces:
            self.assertTrue(verifyObject(interface, backend), interface)

    def test_file(self) -> None:
        """A slice of a file: zero copy, data sync, identity and descriptor, as the file."""
        inner = self.open_file(self.make_file())
        self.assertEqual(
            _declared(inner),
            {IZeroCopyBackend, IDataSyncBackend, IDiskIdentity, IDescriptorBackend},
        )
        self.verify(slice_backend(inner, 4096, 4096), _declared(inner))

    def test_memory(self) -> None:
        """A slice of a memory disk: zero copy, data sync and share, as the memory disk."""
        inner = MemoryBackend(MIB)
        self.addCleanup(inner.close)
        self.verify(
            slice_backend(inner, 4096, 4096),
            {IZeroCopyBackend, IDataSyncBackend, IProcessShareableBackend},
        )

    def test_plain(self) -> None:
        """A slice of a disk with no optional interface declares none."""
        backend = slice_backend(_PlainBackend(MIB), 4096, 4096)
        self.verify(backend, set())
        backend.close()
        self.assertTrue(backend.inner.closed)  # type: ignore[attr-defined]

    def test_target_zero_copy(self) -> None:
        """A target learns the slice's abilities as it learns its disk's."""
        self.assertTrue(Target(1, 0, slice_backend(MemoryBackend(MIB), 0, 4096)).zero_copy)
        self.assertFalse(Target(1, 0, slice_backend(_PlainBackend(MIB), 0, 4096)).zero_copy)

    def test_forwards(self) -> None:
        """``fileno`` is the file's descriptor; ``flush`` and ``sync_data`` work through it."""
        inner = self.open_file(self.make_file())
        backend = slice_backend(inner, 4096, 4096)
        self.assertEqual(backend.fileno(), inner.fileno())  # type: ignore[attr-defined]
        backend.write(0, b"\x01" * 512)
        backend.flush()
        backend.sync_data()  # type: ignore[attr-defined]
        inner.close()
        # Both now reach the closed file's descriptor, -1, which os refuses.
        self.assertEqual(backend.fileno(), -1)  # type: ignore[attr-defined]
        self.assertRaises(ValueError, backend.sync_data)  # type: ignore[attr-defined]
        self.assertRaises(ValueError, backend.flush)

    def test_identity(self) -> None:
        """The slice's identity is ``slice_identity`` of the file's, with the slice's length."""
        inner = self.open_file(self.make_file())
        identity = inner.disk_identity()
        assert identity is not None
        backend = slice_backend(inner, 4096, 0)
        self.assertEqual(
            backend.disk_identity(),  # type: ignore[attr-defined]
            slice_identity(identity, 4096, MIB - 4096),
        )

    def test_identity_none(self) -> None:
        """A disk declaring ``IDiskIdentity`` with no identity gives a slice with none."""
        inner = self.open_file(self.make_file())
        inner.identity = None
        self.assertIsNone(slice_backend(inner, 4096, 0).disk_identity())  # type: ignore[attr-defined]


def _identify(dispatcher: Dispatcher, slot: int) -> bytes:
    """Return the IDENTIFY page target e1.``slot`` of ``dispatcher`` answers with."""
    request = ata_request(ATACmdStatus.IDENTIFY, slot=slot, count=1, extended=False)
    [reply] = dispatcher.serve(ethernet_frame(request))
    header = Header.from_bytes(EthernetFrame.from_bytes(reply).payload)
    assert isinstance(header.arg, ATAArg)
    if header.flag_error or header.arg.err_feature:
        raise AssertionError(f"IDENTIFY failed: {header!r}")
    return header.arg.data


def _capacities(page: bytes) -> tuple[int, int]:
    """Return the page's LBA28 (words 60-61) and LBA48 (words 100-103) sector counts."""
    words = struct.unpack("<256H", page)
    lba28 = words[60] | words[61] << 16
    lba48 = words[100] | words[101] << 16 | words[102] << 32 | words[103] << 48
    return lba28, lba48


class SliceTargetTests(_FileMixin):
    """A target over a slice is a disk of the slice's size, with an identity of its own."""

    def serve(self, *backends: IBlockBackend) -> Dispatcher:
        """Return a dispatcher serving ``backends`` at e1.0, e1.1, ..."""
        targets = [Target(1, slot, backend) for slot, backend in enumerate(backends)]
        return Dispatcher(TARGET_MAC, targets)

    def test_size(self) -> None:
        """IDENTIFY reports the slice's sector count in LBA28 and LBA48 alike."""
        path = self.make_file()
        dispatcher = self.serve(slice_backend(self.open_file(path), 64 * 1024, 256 * 1024))
        self.assertEqual(_capacities(_identify(dispatcher, 0)), (512, 512))

    def test_size_beyond_lba28(self) -> None:
        """
        A slice of more than 2**28 sectors (of a sparse file) gets the LBA28
        maximum in words 60-61 and its whole size in words 100-103.
        """
        path = self.mktemp()
        with open(path, "wb") as image:
            image.truncate((2**28 + 4096) * SECTOR_SIZE)
        backend = slice_backend(self.open_file(path), 2048 * SECTOR_SIZE, (2**28 + 1) * SECTOR_SIZE)
        page = _identify(self.serve(backend), 0)
        self.assertEqual(_capacities(page), (LBA28_MAX_SECTORS, 2**28 + 1))

    def test_identity(self) -> None:
        """The page carries the serial and world-wide name of the slice's identity."""
        inner = self.open_file(self.make_file())
        backend = slice_backend(inner, 4096, 4096)
        identity = backend.disk_identity()  # type: ignore[attr-defined]
        page = _identify(self.serve(backend), 0)
        self.assertEqual(page_identity(page), (disk_serial(identity), disk_wwn(identity)))

    def test_two_slices_two_disks(self) -> None:
        """
        Two slices of one file, and the file itself, are three disks: three
        serials, three world-wide names.
        """
        path = self.make_file()
        dispatcher = self.serve(
            slice_backend(self.open_file(path), 0, MIB // 2),
            slice_backend(self.open_file(path), MIB // 2, 0),
            self.open_file(path),
        )
        pages = [page_identity(_identify(dispatcher, slot)) for slot in range(3)]
        self.assertEqual(len({serial for serial, _ in pages}), 3)
        self.assertEqual(len({wwn for _, wwn in pages}), 3)
        self.assertNotIn(None, [wwn for _, wwn in pages])

    def test_same_slice_same_disk(self) -> None:
        """The same slice of one file opened twice (two servers) is one disk."""
        path = self.make_file()
        dispatcher = self.serve(
            slice_backend(self.open_file(path), 4096, 8192),
            slice_backend(self.open_file(path), 4096, 8192),
        )
        first, second = (page_identity(_identify(dispatcher, slot)) for slot in range(2))
        self.assertEqual(first, second)
        self.assertIsNotNone(first[1])

    def test_two_independent_targets(self) -> None:
        """
        Two slices of one file, each on its own open backend, are two targets:
        a write to one shows in its part of the file and not in the other,
        and closing one leaves the other serving.
        """
        path = self.make_file()
        half = MIB // 2
        first = slice_backend(self.open_file(path), 0, half)
        second = slice_backend(self.open_file(path), half, 0)
        dispatcher = self.serve(first, second)
        sector = b"\x77" * SECTOR_SIZE
        write = ata_request(ATACmdStatus.WRITE_48BIT, slot=0, lba=0, data=sector)
        [reply] = dispatcher.serve(ethernet_frame(write))
        self.assertFalse(Header.from_bytes(EthernetFrame.from_bytes(reply).payload).flag_error)
        self.assertEqual(first.read(0, SECTOR_SIZE), sector)
        self.assertEqual(second.read(0, SECTOR_SIZE), _pattern(MIB)[half : half + SECTOR_SIZE])
        first.close()
        read = ata_request(ATACmdStatus.READ_48BIT, slot=1, lba=0, count=1)
        [reply] = dispatcher.serve(ethernet_frame(read))
        arg = Header.from_bytes(EthernetFrame.from_bytes(reply).payload).arg
        assert isinstance(arg, ATAArg)
        self.assertEqual(arg.data, _pattern(MIB)[half : half + SECTOR_SIZE])
        contents = Path(path).read_bytes()
        self.assertEqual(contents[:SECTOR_SIZE], sector)
        self.assertEqual(contents[SECTOR_SIZE:], _pattern(MIB)[SECTOR_SIZE:])


class SliceWorkersTests(_FileMixin):
    """``--workers`` hands a slice to its workers as it hands the disk under it."""

    def round_trip(self, backend: IBlockBackend, spec: str) -> SliceBackend:
        """
        Describe ``backend`` as the parent does, through JSON, and open it as a worker does.

        The worker gets a copy of the descriptor, as the one ``_spawn`` passes.
        """
        description = json.loads(json.dumps(_describe_backend(backend, spec, False)))
        self.assertEqual(description["class"], "aoe_twisted.backends.slice.SliceBackend")
        description["fd"] = os.dup(description["fd"])
        adopted = _open_backend(description)
        self.addCleanup(adopted.close)
        self.assertIsInstance(adopted, SliceBackend)
        return adopted

    def test_file(self) -> None:
        """The adopted slice is the same slice of the same file: same bytes, identity, abilities."""
        path = self.make_file()
        backend = slice_backend(self.open_file(path), 8192, 16384)
        adopted = self.round_trip(backend, f"file:{path}")
        self.assertEqual((adopted.offset, adopted.size, adopted.read_only), (8192, 16384, False))
        self.assertIsInstance(adopted.inner, FileBackend)
        self.assertEqual(adopted.read(0, 16384), backend.read(0, 16384))
        adopted.write(0, b"\x33" * SECTOR_SIZE)
        self.assertEqual(backend.read(0, SECTOR_SIZE), b"\x33" * SECTOR_SIZE)
        self.assertEqual(adopted.disk_identity(), backend.disk_identity())  # type: ignore[attr-defined]
        self.assertEqual(_declared(adopted), _declared(backend))
        for interface in _declared(adopted):
            self.assertTrue(verifyObject(interface, adopted))

    def test_file_read_only(self) -> None:
        """A read-only slice is adopted read-only."""
        path = self.make_file()
        backend = slice_backend(self.open_file(path, read_only=True), 8192, 0)
        adopted = self.round_trip(backend, f"file:{path}")
        self.assertIs(adopted.read_only, True)
        self.assertRaises(OSError, adopted.write, 0, b"x" * SECTOR_SIZE)

    def test_adopt_refuses_other_classes(self) -> None:
        """``adopt`` rebuilds only an ``IDescriptorBackend`` class under the slice."""
        handoff = {
            "class": "aoe_twisted.backends.memory.MemoryBackend",
            "handoff": {},
            "offset": 0,
            "length": 512,
        }
        self.assertRaises(TypeError, SliceBackend.adopt, -1, handoff)

    def test_memory_shares(self) -> None:
        """
        A slice of a memory disk ``share()``s into the same slice of a shared
        memory disk holding the same bytes, which workers adopt by descriptor.
        """
        inner = MemoryBackend(MIB)
        inner.write(0, _pattern(MIB))
        backend = slice_backend(inner, 4096, 8192)
        assert isinstance(backend, SliceBackend)
        shared = backend.share()
        self.addCleanup(shared.close)
        self.assertIsInstance(shared, SliceBackend)
        self.assertIsInstance(shared.inner, SharedMemoryBackend)
        self.assertEqual((shared.offset, shared.size), (4096, 8192))
        self.assertEqual(shared.read(0, 8192), _pattern(MIB)[4096 : 4096 + 8192])
        self.assertRaises(ValueError, inner.read, 0, 1)  # share() closed the memory disk
        self.assertEqual(
            _declared(shared), {IZeroCopyBackend, IDataSyncBackend, IDescriptorBackend}
        )
        self.assertTrue(verifyObject(IDescriptorBackend, shared))
        adopted = self.round_trip(shared, "memory:1M")
        adopted.write(0, b"\x44" * SECTOR_SIZE)
        self.assertEqual(shared.read(0, SECTOR_SIZE), b"\x44" * SECTOR_SIZE)
