"""
Tests for the disk backends, size parsing and ``--backend`` plugin discovery.

One contract suite (``_BackendContractMixin``) runs over every built-in
``IBlockBackend``: memory, a file image and a real block device (a loop
device, when the tests run as root).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import twisted
import twisted.plugins
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.reporter import TestResult
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aoe_twisted.backends._fd import FDBackend
from aoe_twisted.backends.block import BlockDeviceBackend
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.identity import (
    block_device_identity,
    device_name,
    file_identity,
    host_local,
    machine_id,
    slice_identity,
)
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.backends.shared_memory import SharedMemoryBackend
from aoe_twisted.backendspec import find_backend_factories, format_backend_help, open_backend
from aoe_twisted.errors import BackendSpecError, UnknownBackendScheme
from aoe_twisted.interfaces import (
    IBackendFactory,
    IBlockBackend,
    IDirectIOFactory,
    IDiskIdentity,
)
from aoe_twisted.units import SECTOR_SIZE, parse_size
from tests.plugintools import TEST_PLUGINS, use_test_plugins

if TYPE_CHECKING:
    _TestCaseBase = SynchronousTestCase
else:
    _TestCaseBase = object

SIZE = 256 * SECTOR_SIZE
"""The size of every disk the contract tests make: 128 KiB."""

LAST = SIZE - SECTOR_SIZE
"""The byte offset of the last sector."""

REPO = Path(__file__).resolve().parent.parent


def _sector(fill: int) -> bytes:
    """Return one sector of recognisable, non-zero bytes."""
    return bytes((fill + i) % 251 + 1 for i in range(SECTOR_SIZE))


def _make_image(case: SynchronousTestCase, size: int = SIZE) -> str:
    """Create a zero-filled image file of ``size`` bytes in the test's temp directory."""
    path = case.mktemp()
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _losetup(case: SynchronousTestCase, image: str, *options: str) -> str:
    """
    Attach ``image`` to a free loop device until ``case`` ends; return the device.

    @raise SkipTest: if we are not root or ``losetup`` is missing or fails.
    """
    if os.geteuid() != 0:
        raise SkipTest("loop devices need root: run the tests as root to test block devices")
    losetup = shutil.which("losetup") or shutil.which("/usr/sbin/losetup")
    if losetup is None:
        raise SkipTest("losetup (util-linux) is not installed")
    result = subprocess.run(
        [losetup, *options, "--find", "--show", image],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SkipTest(f"losetup could not attach a loop device: {result.stderr.strip()}")
    device = result.stdout.strip()
    case.addCleanup(subprocess.run, [losetup, "--detach", device], check=False)
    return device


class _BackendContractMixin(_TestCaseBase):
    """
    The ``IBlockBackend`` behaviour every backend shares.

    Subclasses implement ``make_backend``, which returns a disk of ``SIZE``
    bytes, all zeros unless a test wrote to it earlier.
    """

    def make_backend(self, read_only: bool = False) -> IBlockBackend:
        """Open a backend of ``SIZE`` bytes; see the class docstring."""
        raise NotImplementedError

    def backend(self, read_only: bool = False) -> IBlockBackend:
        """Return ``make_backend(read_only)``, closed when the test ends."""
        backend = self.make_backend(read_only)
        self.addCleanup(backend.close)
        return backend

    def test_provides_interface(self) -> None:
        """The backend, read-write or read-only, provides ``IBlockBackend``."""
        self.assertTrue(verifyObject(IBlockBackend, self.backend()))
        self.assertTrue(verifyObject(IBlockBackend, self.backend(read_only=True)))

    def test_size(self) -> None:
        """``size`` is the disk's size in bytes."""
        self.assertEqual(self.backend().size, SIZE)

    def test_read_only_attribute(self) -> None:
        """``read_only`` says whether the backend was opened read-only."""
        self.assertIs(self.backend().read_only, False)
        self.assertIs(self.backend(read_only=True).read_only, True)

    def test_new_disk_reads_zeros(self) -> None:
        """A new disk reads as zeros, first sector to last."""
        backend = self.backend()
        self.assertEqual(backend.read(0, SECTOR_SIZE), bytes(SECTOR_SIZE))
        self.assertEqual(backend.read(LAST, SECTOR_SIZE), bytes(SECTOR_SIZE))
        self.assertEqual(backend.read(0, SIZE), bytes(SIZE))

    def test_round_trip_first_sector(self) -> None:
        """What is written to the first sector reads back, and the next sector is untouched."""
        backend = self.backend()
        backend.write(0, _sector(1))
        self.assertEqual(backend.read(0, SECTOR_SIZE), _sector(1))
        self.assertEqual(backend.read(SECTOR_SIZE, SECTOR_SIZE), bytes(SECTOR_SIZE))

    def test_round_trip_last_sector(self) -> None:
        """What is written to the last sector reads back, and the disk does not grow."""
        backend = self.backend()
        backend.write(LAST, _sector(2))
        self.assertEqual(backend.read(LAST, SECTOR_SIZE), _sector(2))
        self.assertEqual(backend.read(LAST - SECTOR_SIZE, SECTOR_SIZE), bytes(SECTOR_SIZE))
        self.assertEqual(backend.size, SIZE)

    def test_round_trip_many_sectors(self) -> None:
        """A write of several sectors reads back whole and sector by sector."""
        backend = self.backend()
        data = b"".join(_sector(n) for n in range(8))
        backend.write(4 * SECTOR_SIZE, data)
        self.assertEqual(backend.read(4 * SECTOR_SIZE, len(data)), data)
        self.assertEqual(backend.read(6 * SECTOR_SIZE, SECTOR_SIZE), _sector(2))

    def test_round_trip_unaligned(self) -> None:
        """Offsets are bytes: a write that straddles a sector boundary changes only its bytes."""
        backend = self.backend()
        backend.write(300, b"\xaa" * 700)
        self.assertEqual(
            backend.read(0, 2 * SECTOR_SIZE),
            bytes(300) + b"\xaa" * 700 + bytes(2 * SECTOR_SIZE - 1000),
        )

    def test_write_accepts_bytes_like(self) -> None:
        """``write`` takes a ``memoryview`` or ``bytearray`` as well as ``bytes``."""
        backend = self.backend()
        backend.write(0, memoryview(_sector(3)))
        backend.write(SECTOR_SIZE, bytearray(_sector(4)))
        self.assertEqual(backend.read(0, 2 * SECTOR_SIZE), _sector(3) + _sector(4))

    # Every backend class runs this one method; sharing its example database
    # between them is harmless, so the differing-executors check is moot.
    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.differing_executors],
    )
    @given(
        writes=st.lists(
            st.tuples(st.integers(0, SIZE), st.binary(max_size=3 * SECTOR_SIZE)), max_size=8
        )
    )
    def test_matches_model(self, writes: list[tuple[int, bytes]]) -> None:
        """Any in-range writes read back as the same writes applied to a ``bytearray``."""
        backend = self.make_backend()
        try:
            model = bytearray(backend.read(0, SIZE))
            for offset, data in writes:
                data = data[: SIZE - offset]
                backend.write(offset, data)
                model[offset : offset + len(data)] = data
            self.assertEqual(backend.read(0, SIZE), bytes(model))
        finally:
            backend.close()

    def test_zero_length(self) -> None:
        """Reading or writing nothing, even at the very end, is allowed."""
        backend = self.backend()
        self.assertEqual(backend.read(SIZE, 0), b"")
        backend.write(SIZE, b"")

    def test_read_outside_refused(self) -> None:
        """A read that leaves the disk raises ``ValueError`` (the core never asks for one)."""
        backend = self.backend()
        self.assertRaises(ValueError, backend.read, LAST, 2 * SECTOR_SIZE)
        self.assertRaises(ValueError, backend.read, SIZE, 1)
        self.assertRaises(ValueError, backend.read, -1, 1)

    def test_write_outside_refused(self) -> None:
        """A write that leaves the disk raises ``ValueError`` and does not grow the disk."""
        backend = self.backend()
        self.assertRaises(ValueError, backend.write, LAST, bytes(2 * SECTOR_SIZE))
        self.assertRaises(ValueError, backend.write, -SECTOR_SIZE, _sector(5))
        self.assertEqual(backend.size, SIZE)
        self.assertEqual(backend.read(LAST, SECTOR_SIZE), bytes(SECTOR_SIZE))

    def test_read_only_refuses_writes(self) -> None:
        """A read-only backend raises ``OSError(EROFS)`` on write and its data is unchanged."""
        backend = self.backend(read_only=True)
        error = self.assertRaises(OSError, backend.write, 0, _sector(6))
        self.assertEqual(error.errno, errno.EROFS)
        self.assertEqual(backend.read(0, SECTOR_SIZE), bytes(SECTOR_SIZE))

    def test_flush(self) -> None:
        """``flush`` after writes succeeds and the data still reads back."""
        backend = self.backend()
        backend.write(LAST, _sector(7))
        self.assertIsNone(backend.flush())
        self.assertEqual(backend.read(LAST, SECTOR_SIZE), _sector(7))

    def test_flush_read_only(self) -> None:
        """``flush`` on a read-only backend succeeds."""
        self.assertIsNone(self.backend(read_only=True).flush())

    def test_close_twice(self) -> None:
        """``close`` may safely be called more than once."""
        backend = self.make_backend()
        backend.close()
        backend.close()


class _PersistentBackendMixin(_BackendContractMixin):
    """Backends on storage: what one opening writes, the next one reads."""

    def test_persists_across_reopen(self) -> None:
        """Writes reach the disk: a backend opened later (read-only) reads them."""
        backend = self.make_backend()
        backend.write(0, _sector(8))
        backend.write(LAST, _sector(9))
        backend.flush()
        backend.close()
        reopened = self.backend(read_only=True)
        self.assertEqual(reopened.read(0, SECTOR_SIZE), _sector(8))
        self.assertEqual(reopened.read(LAST, SECTOR_SIZE), _sector(9))


class MemoryBackendTests(_BackendContractMixin, SynchronousTestCase):
    """The contract, for ``MemoryBackend``."""

    def make_backend(self, read_only: bool = False) -> IBlockBackend:
        return MemoryBackend(SIZE, read_only=read_only)

    def test_size_must_be_whole_sectors(self) -> None:
        """A size that is not a positive multiple of 512 raises ``BackendSpecError``."""
        for size in (0, -512, 1000):
            self.assertRaises(BackendSpecError, MemoryBackend, size)

    def test_closed(self) -> None:
        """After ``close`` the memory is released and reads fail."""
        backend = self.make_backend()
        backend.close()
        self.assertRaises(ValueError, backend.read, 0, SECTOR_SIZE)


class FileBackendTests(_PersistentBackendMixin, SynchronousTestCase):
    """The contract, for ``FileBackend`` on an image file."""

    def setUp(self) -> None:
        self.path = _make_image(self)

    def make_backend(self, read_only: bool = False) -> IBlockBackend:
        return FileBackend.open(self.path, read_only=read_only)

    def test_writes_reach_the_file(self) -> None:
        """A flushed write is in the image file at the same offset."""
        backend = self.backend()
        backend.write(LAST, _sector(10))
        backend.flush()
        with open(self.path, "rb") as f:
            f.seek(LAST)
            self.assertEqual(f.read(), _sector(10))

    def test_closed(self) -> None:
        """After ``close`` the descriptor is gone and reads raise ``OSError``."""
        backend = self.make_backend()
        backend.close()
        self.assertRaises(OSError, backend.read, 0, SECTOR_SIZE)


class BlockDeviceBackendTests(_PersistentBackendMixin, SynchronousTestCase):
    """The contract, for ``BlockDeviceBackend`` on a loop device (root only)."""

    def setUp(self) -> None:
        self.image = _make_image(self)
        self.device = _losetup(self, self.image)

    def make_backend(self, read_only: bool = False) -> IBlockBackend:
        return BlockDeviceBackend.open(self.device, read_only=read_only)

    def test_flush_reaches_backing_file(self) -> None:
        """After ``flush`` a write to the device is in the loop device's backing file."""
        backend = self.backend()
        backend.write(LAST, _sector(11))
        backend.flush()
        with open(self.image, "rb") as f:
            f.seek(LAST)
            self.assertEqual(f.read(), _sector(11))

    def test_kernel_read_only_device(self) -> None:
        """
        Opening a device the kernel holds read-only for writing fails with a
        one-line error naming the device and suggesting ``--read-only``;
        opening it read-only works.
        """
        device = _losetup(self, _make_image(self), "--read-only")
        error = self.assertRaises(BackendSpecError, BlockDeviceBackend.open, device)
        self.assertIn(device, str(error))
        self.assertIn("--read-only", str(error))
        self.assertNotIn("\n", str(error))
        backend = BlockDeviceBackend.open(device, read_only=True)
        self.addCleanup(backend.close)
        self.assertEqual(backend.read(0, SECTOR_SIZE), bytes(SECTOR_SIZE))

    def test_file_scheme_refuses_device(self) -> None:
        """``file:`` on a block device is refused, pointing at ``block:``."""
        error = self.assertRaises(BackendSpecError, open_backend, "file:" + self.device)
        self.assertIn(f"block:{self.device}", str(error))


class ParseSizeTests(SynchronousTestCase):
    """``parse_size`` turns ``memory:SIZE`` sizes into bytes."""

    def test_valid(self) -> None:
        """Plain bytes and K/M/G/T (KiB/MiB/... too, any case) are powers of 1024."""
        table = [
            ("512", 512),
            ("1048576", 1 << 20),
            ("0512", 512),
            ("1k", 1 << 10),
            ("1K", 1 << 10),
            ("1KiB", 1 << 10),
            ("1kib", 1 << 10),
            ("64M", 64 << 20),
            ("64m", 64 << 20),
            ("64MiB", 64 << 20),
            ("2G", 2 << 30),
            ("2GIB", 2 << 30),
            ("1T", 1 << 40),
            ("3tib", 3 << 40),
        ]
        for text, size in table:
            self.assertEqual((text, parse_size(text)), (text, size))

    def test_invalid(self) -> None:
        """Anything else raises ``BackendSpecError`` (a ``ValueError``) quoting the text."""
        table = [
            "",
            "M",
            "64X",
            "64 M",
            " 64M",
            "1.5M",
            "-512",
            "+512",
            "1_024",
            "\u0665\u0661\u0662",  # Arabic-Indic digits "512": int() takes them, we do not
        ]
        for text in table:
            error = self.assertRaises(BackendSpecError, parse_size, text)
            self.assertIn(repr(text), str(error))
            self.assertIsInstance(error, ValueError)

    def test_not_whole_sectors(self) -> None:
        """Zero and sizes that are not a whole multiple of 512 are refused, naming the size."""
        for text, size in [("0", 0), ("0K", 0), ("1000", 1000), ("511", 511)]:
            error = self.assertRaises(BackendSpecError, parse_size, text)
            self.assertIn(f"{size} bytes", str(error))


class OpenBackendTests(SynchronousTestCase):
    """``open_backend`` splits ``SCHEME:SPEC`` and hands SPEC to the scheme's plugin."""

    def test_memory(self) -> None:
        """``memory:SIZE`` opens a memory disk of that size."""
        backend = open_backend("memory:64K")
        self.assertIsInstance(backend, MemoryBackend)
        self.assertEqual((backend.size, backend.read_only), (64 << 10, False))

    def test_read_only(self) -> None:
        """``read_only=True`` reaches the plugin: the disk refuses writes."""
        backend = open_backend("memory:64K", read_only=True)
        self.assertIs(backend.read_only, True)

    def test_file(self) -> None:
        """``file:PATH`` opens the image at PATH."""
        path = _make_image(self)
        backend = open_backend("file:" + path, read_only=True)
        self.addCleanup(backend.close)
        self.assertIsInstance(backend, FileBackend)
        self.assertEqual(backend.size, SIZE)

    def test_colon_in_spec(self) -> None:
        """Only the first colon splits: the rest belongs to the spec."""
        path = os.path.join(self.mktemp(), "a:b.img")
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.truncate(SIZE)
        backend = open_backend("file:" + path)
        self.addCleanup(backend.close)
        self.assertEqual(backend.size, SIZE)

    def test_no_colon(self) -> None:
        """A string without a colon (or with nothing before it) names the expected form."""
        for description in ("disk.img", ":disk.img", ""):
            error = self.assertRaises(BackendSpecError, open_backend, description)
            self.assertIn("SCHEME:SPEC", str(error))

    def test_empty_spec(self) -> None:
        """A string with nothing after the colon names the expected form."""
        error = self.assertRaises(BackendSpecError, open_backend, "file:")
        self.assertIn("SCHEME:SPEC", str(error))

    def test_unknown_scheme(self) -> None:
        """An unknown scheme raises ``UnknownBackendScheme`` listing installed schemes, sorted."""
        error = self.assertRaises(UnknownBackendScheme, open_backend, "nfs:server:/disk")
        installed = ", ".join(sorted(find_backend_factories()))
        self.assertIn("block, file, memory", installed)
        self.assertIn("'nfs'", str(error))
        self.assertIn(installed, str(error))
        self.assertIsInstance(error, BackendSpecError)

    def test_bad_memory_size(self) -> None:
        """``memory:`` with a bad size raises ``BackendSpecError`` quoting it."""
        error = self.assertRaises(BackendSpecError, open_backend, "memory:lots")
        self.assertIn("'lots'", str(error))

    def test_file_not_whole_sectors(self) -> None:
        """A file not a whole multiple of 512 bytes is refused: one line naming it and its size."""
        path = _make_image(self, 1000)
        error = self.assertRaises(BackendSpecError, open_backend, "file:" + path)
        self.assertIn(path, str(error))
        self.assertIn("1000", str(error))
        self.assertNotIn("\n", str(error))

    def test_file_empty(self) -> None:
        """An empty file is refused, naming it and its size."""
        path = _make_image(self, 0)
        error = self.assertRaises(BackendSpecError, open_backend, "file:" + path, True)
        self.assertIn(path, str(error))
        self.assertIn(" 0 bytes", str(error))

    def test_file_missing(self) -> None:
        """A missing file is refused, naming the path and the reason."""
        path = self.mktemp()
        error = self.assertRaises(BackendSpecError, open_backend, "file:" + path)
        self.assertIn(path, str(error))
        self.assertIn(os.strerror(errno.ENOENT), str(error))

    def test_file_directory(self) -> None:
        """A directory is refused, read-write or read-only, naming the path."""
        path = self.mktemp()
        os.mkdir(path)
        for read_only in (False, True):
            error = self.assertRaises(BackendSpecError, open_backend, "file:" + path, read_only)
            self.assertIn(path, str(error))
            self.assertIn("directory", str(error).lower())

    def test_file_fifo(self) -> None:
        """A FIFO is refused at once instead of hanging in ``open``."""
        path = self.mktemp()
        os.mkfifo(path)
        for read_only in (False, True):
            error = self.assertRaises(BackendSpecError, open_backend, "file:" + path, read_only)
            self.assertIn(f"{path} is a FIFO", str(error))

    def test_file_permission_denied(self) -> None:
        """A file we may not open is refused, naming the path and the reason."""
        if os.geteuid() == 0:
            raise SkipTest("root may open any file")
        path = _make_image(self)
        os.chmod(path, 0o400)
        error = self.assertRaises(BackendSpecError, open_backend, "file:" + path)
        self.assertIn(path, str(error))
        self.assertIn(os.strerror(errno.EACCES), str(error))
        self.assertIn("--read-only", str(error))

    def test_block_on_regular_file(self) -> None:
        """``block:`` on a regular file is refused, pointing at ``file:``."""
        path = _make_image(self)
        error = self.assertRaises(BackendSpecError, open_backend, "block:" + path)
        self.assertIn(f"{path} is a regular file, not a block device", str(error))
        self.assertIn(f"file:{path}", str(error))

    def test_block_missing(self) -> None:
        """A missing block device is refused, naming the path and the reason."""
        path = self.mktemp()
        error = self.assertRaises(BackendSpecError, open_backend, "block:" + path, True)
        self.assertIn(path, str(error))
        self.assertIn(os.strerror(errno.ENOENT), str(error))


class ShareTests(SynchronousTestCase):
    """``MemoryBackend.share`` moves the disk into shared memory (``IProcessShareableBackend``)."""

    def share(self, backend: MemoryBackend) -> SharedMemoryBackend:
        shared = backend.share()
        self.addCleanup(shared.close)
        self.assertIsInstance(shared, SharedMemoryBackend)
        return shared

    def test_keeps_contents(self) -> None:
        """The shared disk has the size and contents of the memory disk, which is closed."""
        backend = MemoryBackend(SIZE)
        backend.write(0, _sector(1))
        backend.write(LAST, _sector(2))
        shared = self.share(backend)
        self.assertEqual((shared.size, shared.read_only), (SIZE, False))
        self.assertEqual(shared.read(0, SECTOR_SIZE), _sector(1))
        self.assertEqual(shared.read(SECTOR_SIZE, LAST - SECTOR_SIZE), bytes(LAST - SECTOR_SIZE))
        self.assertEqual(shared.read(LAST, SECTOR_SIZE), _sector(2))
        self.assertRaises(ValueError, backend.read, 0, SECTOR_SIZE)

    def test_read_only(self) -> None:
        """A read-only memory disk becomes a read-only shared disk."""
        shared = self.share(MemoryBackend(SIZE, read_only=True))
        self.assertEqual((shared.size, shared.read_only), (SIZE, True))
        error = self.assertRaises(OSError, shared.write, 0, _sector(1))
        self.assertEqual(error.errno, errno.EROFS)

    def test_large_contents(self) -> None:
        """
        Contents across the 1 MiB copy chunks all arrive; runs of zeros stay
        unallocated in the ``memfd``, as in a fresh one.
        """
        size = 4 << 20
        backend = MemoryBackend(size)
        pattern = b"".join(_sector(n) for n in range(4))
        backend.write((1 << 20) - 2 * SECTOR_SIZE, pattern)
        backend.write(size - SECTOR_SIZE, _sector(9))
        expected = backend.read(0, size)
        shared = self.share(backend)
        self.assertEqual(shared.read(0, size), expected)
        # Chunks 0, 1 and 3 hold data; chunk 2 is all zeros and is not written.
        allocated = os.fstat(shared.fileno()).st_blocks * 512
        self.assertLessEqual(allocated, 3 << 20)

    def test_wrong_length_contents(self) -> None:
        """``SharedMemoryBackend.create`` refuses contents of another size than the disk's."""
        self.assertRaises(
            ValueError, SharedMemoryBackend.create, SIZE, contents=bytes(SIZE - SECTOR_SIZE)
        )


class DescriptorHandoffTests(SynchronousTestCase):
    """``IDescriptorBackend``: ``handoff`` and ``adopt`` rebuild a backend on its descriptor."""

    def adopt(self, backend: FDBackend) -> FDBackend:
        """Adopt a duplicate of ``backend``'s descriptor, as a worker would (through JSON)."""
        handoff = json.loads(json.dumps(backend.handoff()))
        adopted = type(backend).adopt(os.dup(backend.fileno()), handoff)
        self.addCleanup(adopted.close)
        self.assertIs(type(adopted), type(backend))
        return adopted

    def test_file(self) -> None:
        """The adopted file disk reads what the original wrote, and writes what it reads."""
        path = _make_image(self)
        backend = FileBackend.open(path)
        self.addCleanup(backend.close)
        backend.write(LAST, _sector(3))
        adopted = self.adopt(backend)
        self.assertEqual(
            (adopted.path, adopted.size, adopted.read_only, adopted.direct, adopted.alignment),
            (path, SIZE, False, False, SECTOR_SIZE),
        )
        self.assertEqual(adopted.read(LAST, SECTOR_SIZE), _sector(3))
        adopted.write(0, _sector(4))
        self.assertEqual(backend.read(0, SECTOR_SIZE), _sector(4))
        adopted.close()
        self.assertEqual(backend.read(LAST, SECTOR_SIZE), _sector(3), "the original stays open")

    def test_read_only(self) -> None:
        """A read-only disk is adopted read-only."""
        backend = FileBackend.open(_make_image(self), read_only=True)
        self.addCleanup(backend.close)
        adopted = self.adopt(backend)
        self.assertIs(adopted.read_only, True)
        self.assertRaises(OSError, adopted.write, 0, _sector(1))

    def test_shared_memory(self) -> None:
        """An adopted shared memory disk is the same memory: writes show on both sides."""
        shared = MemoryBackend(SIZE).share()
        self.addCleanup(shared.close)
        adopted = self.adopt(shared)
        adopted.write(0, _sector(5))
        self.assertEqual(shared.read(0, SECTOR_SIZE), _sector(5))


class DirectDeclarationTests(SynchronousTestCase):
    """``open_backend(..., direct=True)`` opens only factories that provide ``IDirectIOFactory``."""

    def use(self, factory: object) -> list[dict[str, object]]:
        """Make ``factory`` the only plugin, as scheme ``test``; return its ``open`` calls."""
        from aoe_twisted import backendspec

        self.patch(backendspec, "find_backend_factories", lambda package=None: {"test": factory})
        return factory.calls  # type: ignore[attr-defined, no-any-return]

    def test_undeclared_refused(self) -> None:
        """
        A factory that does not declare ``IDirectIOFactory`` is refused under
        --direct, although its ``open`` takes ``direct``: the declaration counts.
        """
        calls = self.use(_UndeclaredDirectFactory())
        error = self.assertRaises(BackendSpecError, open_backend, "test:x", direct=True)
        self.assertIn("'test'", str(error))
        self.assertIn("--direct", str(error))
        self.assertEqual(calls, [])
        open_backend("test:x")
        self.assertEqual(calls, [{"read_only": False}])

    def test_declared(self) -> None:
        """A factory that declares ``IDirectIOFactory`` is opened with ``direct=True``."""
        calls = self.use(_DirectFactory())
        open_backend("test:x", read_only=True, direct=True)
        self.assertEqual(calls, [{"read_only": True, "direct": True}])


@implementer(IBackendFactory)
class _UndeclaredDirectFactory:
    """A factory whose ``open`` takes ``direct`` but that does not declare ``IDirectIOFactory``."""

    scheme = "test"
    spec_format = "X"
    description = "a test"

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def open(self, spec: str, read_only: bool = False, **options: object) -> IBlockBackend:
        self.calls.append({"read_only": read_only, **options})
        return MemoryBackend(SIZE)


@implementer(IDirectIOFactory)
class _DirectFactory(_UndeclaredDirectFactory):
    """The same factory, declaring ``IDirectIOFactory``."""


class FindBackendFactoriesTests(SynchronousTestCase):
    """``find_backend_factories`` finds the backend plugins, keyed by scheme."""

    def test_builtin(self) -> None:
        """The built-in plugins are the module-level instances in ``aoe_twisted_backends``."""
        from twisted.plugins import aoe_twisted_backends

        factories = find_backend_factories()
        self.assertIs(factories["memory"], aoe_twisted_backends.memory_backend)
        self.assertIs(factories["file"], aoe_twisted_backends.file_backend)
        self.assertIs(factories["block"], aoe_twisted_backends.block_backend)

    def test_provide_interface(self) -> None:
        """Every plugin found provides ``IBackendFactory`` and is keyed by its own scheme."""
        for scheme, factory in find_backend_factories().items():
            self.assertTrue(verifyObject(IBackendFactory, factory))
            self.assertEqual(factory.scheme, scheme)

    def test_package(self) -> None:
        """With ``package`` only that package's plugins are found, and used by ``open_backend``."""
        root = Path(self.mktemp())
        package = root / "aoe_twisted_test_only_plugins"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "only_memory.py").write_text(
            textwrap.dedent(
                """
                from aoe_twisted.backends.factories import MemoryBackendFactory
                only_memory = MemoryBackendFactory()
                """
            )
        )
        sys.path.insert(0, str(root))
        self.addCleanup(sys.path.remove, str(root))
        for name in ("aoe_twisted_test_only_plugins", "aoe_twisted_test_only_plugins.only_memory"):
            self.addCleanup(sys.modules.pop, name, None)
        import aoe_twisted_test_only_plugins  # type: ignore[import-not-found]

        self.assertEqual(list(find_backend_factories(aoe_twisted_test_only_plugins)), ["memory"])
        error = self.assertRaises(
            UnknownBackendScheme,
            open_backend,
            "file:disk.img",
            package=aoe_twisted_test_only_plugins,
        )
        self.assertTrue(str(error).endswith("installed schemes: memory"), str(error))

    def test_plugin_module_is_light(self) -> None:
        """Scanning the plugin module imports no backend implementation; ``open`` does."""
        code = (
            "import sys, twisted.plugins.aoe_twisted_backends as p\n"
            "print(sorted(m for m in sys.modules if m.startswith('aoe_twisted.backends.')))\n"
            "p.memory_backend.open('1K')\n"
            "print('aoe_twisted.backends.memory' in sys.modules)\n"
        )
        output = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(output, "['aoe_twisted.backends.factories']\nTrue\n")

    def test_help(self) -> None:
        """
        ``--help-backends`` text: a ``scheme:FORMAT  description`` line per scheme, aligned;
        a format too wide for the column has its description on the next line.
        """
        text = format_backend_help()
        lines = text.splitlines()
        schemes = sorted(find_backend_factories())
        starts = [line for line in lines if not line.startswith(" ")]
        self.assertEqual([line.split(":", 1)[0] for line in starts], schemes)
        self.assertRegex(text, r"block:/dev/XXX +a block device")
        first = lines[0]
        column = len(first) - len(first.split("  ", 1)[1].lstrip())
        for line in lines:
            if line.startswith(" ") or len(line.split("  ", 1)[0]) <= column - 2:
                self.assertEqual(line[column - 2 : column], "  ", line)
                self.assertNotEqual(line[column], " ", line)
        self.assertRegex(text, r"\nfile:PATH +a disk image")
        self.assertRegex(text, r"\nmemory:SIZE +a disk in RAM")

    def test_help_given_factories(self) -> None:
        """``format_backend_help`` describes the factories it is given; none gives no text."""
        factories = find_backend_factories()
        self.assertEqual(
            format_backend_help({"file": factories["file"]}),
            "file:PATH  " + factories["file"].description,
        )
        self.assertEqual(format_backend_help({}), "")


class ExamplePluginTests(SynchronousTestCase):
    """The third-party example plugin in ``tests/plugins``, found through ``use_test_plugins``."""

    def test_invisible_by_default(self) -> None:
        """Without the fixture the test plugin directory is not searched."""
        self.assertNotIn(TEST_PLUGINS, twisted.plugins.__path__)
        self.assertNotIn("pattern", find_backend_factories())

    def test_fixture_cleans_up(self) -> None:
        """The fixture adds the directory and its cleanup removes it again."""
        seen: list[bool] = []

        class UsesTestPlugins(SynchronousTestCase):
            def test_it(self) -> None:
                use_test_plugins(self)
                seen.append(TEST_PLUGINS in twisted.plugins.__path__)

        result = TestResult()
        UsesTestPlugins("test_it").run(result)
        self.assertTrue(result.wasSuccessful())
        self.assertEqual(seen, [True])
        self.assertNotIn(TEST_PLUGINS, twisted.plugins.__path__)

    def test_found(self) -> None:
        """With the fixture the ``pattern`` plugin is found beside the built-in ones."""
        use_test_plugins(self)
        factories = find_backend_factories()
        self.assertTrue(verifyObject(IBackendFactory, factories["pattern"]))
        self.assertLessEqual({"block", "file", "memory", "pattern"}, set(factories))
        self.assertIn("pattern:SIZE", format_backend_help())

    def test_opens(self) -> None:
        """``pattern:SIZE`` opens a read-only disk whose sectors hold their own numbers."""
        use_test_plugins(self)
        backend = open_backend("pattern:4K")
        self.addCleanup(backend.close)
        self.assertTrue(verifyObject(IBlockBackend, backend))
        self.assertEqual((backend.size, backend.read_only), (4096, True))
        self.assertEqual(backend.read(3 * SECTOR_SIZE, SECTOR_SIZE), (3).to_bytes(8, "big") * 64)
        self.assertEqual(
            backend.read(2 * SECTOR_SIZE - 8, 16),
            (1).to_bytes(8, "big") + (2).to_bytes(8, "big"),
        )
        error = self.assertRaises(OSError, backend.write, 0, bytes(SECTOR_SIZE))
        self.assertEqual(error.errno, errno.EROFS)


class PackagingTests(SynchronousTestCase):
    """The plugin directories are laid out so Twisted's own ``twisted.plugins`` survives."""

    def test_no_init_in_plugin_namespace(self) -> None:
        """``src/twisted``, ``src/twisted/plugins``, ``tests/plugins`` have no ``__init__.py``."""
        plugins = REPO / "src" / "twisted" / "plugins"
        self.assertTrue((plugins / "aoe_twisted_backends.py").is_file())
        for directory in (plugins.parent, plugins, Path(TEST_PLUGINS)):
            self.assertFalse((directory / "__init__.py").exists(), directory)

    def test_twisted_plugins_is_twisteds(self) -> None:
        """``twisted.plugins`` is still Twisted's own package: nothing of ours shadows it."""
        own = Path(twisted.__file__).resolve().parent / "plugins"
        self.assertEqual(Path(twisted.plugins.__file__).resolve().parent, own)


class FileIdentityTests(SynchronousTestCase):
    """A file disk's identity (``IDiskIdentity``): this host, its filesystem, its inode."""

    def identity(self, path: str, **options: bool) -> bytes:
        """Open ``path`` as a file disk and return its identity."""
        backend = FileBackend.open(path, **options)
        self.addCleanup(backend.close)
        self.assertTrue(verifyObject(IDiskIdentity, backend))
        identity = backend.disk_identity()
        assert identity is not None
        return identity

    def test_stable_across_opens(self) -> None:
        """Two opens of one file (two servers, or a restart) give the same identity."""
        path = _make_image(self)
        self.assertEqual(self.identity(path), self.identity(path))

    def test_read_only_same(self) -> None:
        """Opening read-only does not change what the disk is."""
        path = _make_image(self)
        self.assertEqual(self.identity(path), self.identity(path, read_only=True))

    def test_two_files_differ(self) -> None:
        """Two files are two disks, even with the same contents."""
        self.assertNotEqual(self.identity(_make_image(self)), self.identity(_make_image(self)))

    def test_hard_link_same(self) -> None:
        """A hard link is the same inode, so the same disk."""
        path = _make_image(self)
        link = self.mktemp()
        os.link(path, link)
        self.assertEqual(self.identity(path), self.identity(link))

    def test_rename_same(self) -> None:
        """A renamed image is still the same disk."""
        path = _make_image(self)
        before = self.identity(path)
        moved = self.mktemp()
        os.rename(path, moved)
        self.assertEqual(self.identity(moved), before)

    def test_copy_differs(self) -> None:
        """A copy is another disk: writes to one never show on the other."""
        path = _make_image(self)
        copy = self.mktemp()
        shutil.copyfile(path, copy)
        self.assertNotEqual(self.identity(path), self.identity(copy))

    def test_local_to_this_host(self) -> None:
        """The identity names this host (its machine id): another host's file is another disk."""
        identity = self.identity(_make_image(self))
        self.assertTrue(identity.startswith(b"host=" + machine_id() + b" file "))

    def test_function_matches(self) -> None:
        """The backend's identity is ``file_identity`` of its descriptor."""
        path = _make_image(self)
        with open(path, "rb") as f:
            self.assertEqual(self.identity(path), file_identity(f.fileno()))

    def test_adopted_keeps_it(self) -> None:
        """A worker's adopted backend presents the identity the parent learnt."""
        backend = FileBackend.open(_make_image(self))
        self.addCleanup(backend.close)
        handoff = json.loads(json.dumps(backend.handoff()))
        adopted = FileBackend.adopt(os.dup(backend.fileno()), handoff)
        self.addCleanup(adopted.close)
        self.assertEqual(adopted.disk_identity(), backend.disk_identity())

    def test_shared_memory_has_none(self) -> None:
        """A shared memory disk has no identity, and its handoff says so."""
        shared = MemoryBackend(SIZE).share()
        self.addCleanup(shared.close)
        self.assertFalse(IDiskIdentity.providedBy(shared))
        self.assertIsNone(shared.handoff()["identity"])


class BlockIdentityTests(SynchronousTestCase):
    """A block device's identity, on loop devices (root only)."""

    def identity(self, device: str, **options: bool) -> bytes:
        """Open ``device`` as a block disk and return its identity."""
        backend = BlockDeviceBackend.open(device, **options)
        self.addCleanup(backend.close)
        self.assertTrue(verifyObject(IDiskIdentity, backend))
        identity = backend.disk_identity()
        assert identity is not None
        return identity

    def test_has_one(self) -> None:
        """A loop device gets an identity of its own, local to this host."""
        device = _losetup(self, _make_image(self))
        identity = self.identity(device)
        self.assertTrue(identity.startswith(b"host=" + machine_id() + b" loop"))

    def test_stable_across_opens(self) -> None:
        """Two opens of one device give one identity, with or without ``--direct``."""
        device = _losetup(self, _make_image(self))
        first = self.identity(device)
        self.assertEqual(self.identity(device, read_only=True), first)
        self.assertEqual(self.identity(device, direct=True), first)

    def test_two_loops_on_one_file_differ(self) -> None:
        """Two loop devices on one file have a page cache each: not one disk."""
        image = _make_image(self)
        self.assertNotEqual(
            self.identity(_losetup(self, image)), self.identity(_losetup(self, image))
        )

    def test_offset_differs(self) -> None:
        """A loop device on part of the file is another disk than one on all of it."""
        image = _make_image(self, 2 * SIZE)
        whole = self.identity(_losetup(self, image))
        part = self.identity(_losetup(self, image, "--offset", str(SIZE)))
        self.assertNotEqual(whole.split(b" file=")[1], part.split(b" file=")[1])

    def test_not_the_file(self) -> None:
        """A loop device is not its backing file's disk (their page caches differ)."""
        image = _make_image(self)
        device = _losetup(self, image)
        backing = FileBackend.open(image)
        self.addCleanup(backing.close)
        self.assertNotEqual(self.identity(device), backing.disk_identity())

    def shared_lun(self, device: str) -> Path:
        """Make a sysfs tree where ``device`` has a registered WWID; return its root."""
        rdev = os.stat(device).st_rdev
        node = Path(self.mktemp()) / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}"
        (node / "device").mkdir(parents=True)
        (node / "device" / "wwid").write_text("naa.60014055f1c5e0e1b0a4c7d2a9e3b6f1\n")
        return node.parent.parent.parent

    def test_shared_lun_with_direct(self) -> None:
        """With ``--direct`` a registered WWID alone is the identity: any host shares it."""
        device = _losetup(self, _make_image(self))
        sysfs = self.shared_lun(device)
        with open(device, "rb") as f:
            identity = block_device_identity(f.fileno(), direct=True, sysfs=sysfs)
        self.assertEqual(identity, b"wwid:naa.60014055f1c5e0e1b0a4c7d2a9e3b6f1")

    def test_shared_lun_cached(self) -> None:
        """Without ``--direct`` this host's page cache is in front: the identity is local."""
        device = _losetup(self, _make_image(self))
        sysfs = self.shared_lun(device)
        with open(device, "rb") as f:
            identity = block_device_identity(f.fileno(), direct=False, sysfs=sysfs)
        self.assertEqual(identity, host_local(b"wwid:naa.60014055f1c5e0e1b0a4c7d2a9e3b6f1"))

    def test_unknown_to_sysfs(self) -> None:
        """A device sysfs knows nothing of is named by its number and size, on this host."""
        device = _losetup(self, _make_image(self))
        rdev = os.stat(device).st_rdev
        with open(device, "rb") as f:
            identity = block_device_identity(f.fileno(), direct=True, sysfs=Path(self.mktemp()))
        self.assertEqual(
            identity,
            host_local(b"block dev=%d:%d size=%d" % (os.major(rdev), os.minor(rdev), SIZE)),
        )


class DeviceNameTests(SynchronousTestCase):
    """``device_name`` reads a block device's own name from its sysfs directory."""

    def node(self, **attributes: str) -> Path:
        """Make a sysfs-like device directory with ``attributes`` (``a__b`` is ``a/b``)."""
        node = Path(self.mktemp())
        node.mkdir()
        for name, value in attributes.items():
            path = node.joinpath(*name.split("__"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value + "\n")
        return node

    def test_dm_uuid(self) -> None:
        """A device-mapper UUID (LVM, multipath) names the disk on every host."""
        node = self.node(dm__uuid="LVM-abc123", device__wwid="t10.QEMU")
        self.assertEqual(device_name(node), (b"dm-uuid:LVM-abc123", True))

    def test_registered_wwids(self) -> None:
        """``naa.``, ``eui.``, ``uuid.`` and ``nvme.`` WWIDs are unique by construction."""
        for wwid in ("naa.5000c500a1b2c3d4", "eui.0025388b9150f8a1", "uuid.1-2", "nvme.8086-x"):
            with self.subTest(wwid=wwid):
                self.assertEqual(
                    device_name(self.node(device__wwid=wwid)), (b"wwid:" + wwid.encode(), True)
                )

    def test_namespace_wwid(self) -> None:
        """An NVMe namespace's ``wwid`` sits on the block device itself."""
        self.assertEqual(device_name(self.node(wwid="eui.1234")), (b"wwid:eui.1234", True))

    def test_t10_wwid_local(self) -> None:
        """A T10 vendor id (a virtual disk's default) is unique only on this host."""
        node = self.node(device__wwid="t10.QEMU     QEMU HARDDISK   drive-scsi0")
        self.assertEqual(device_name(node), (b"wwid:t10.QEMU QEMU HARDDISK drive-scsi0", False))

    def test_serial_local(self) -> None:
        """A serial number (virtio-blk's), with the model where there is one, is local."""
        self.assertEqual(device_name(self.node(serial="disk0")), (b"serial:/disk0", False))
        node = self.node(device__serial="S3Z9NB0K", device__model="Samsung SSD ")
        self.assertEqual(device_name(node), (b"serial:Samsung SSD/S3Z9NB0K", False))

    def test_partition(self) -> None:
        """A partition is its disk's name and its start sector."""
        disk = self.node(device__wwid="naa.5000c500a1b2c3d4")
        (disk / "sda1").mkdir()
        (disk / "sda1" / "partition").write_text("1\n")
        (disk / "sda1" / "start").write_text("2048\n")
        self.assertEqual(
            device_name(disk / "sda1"), (b"wwid:naa.5000c500a1b2c3d4 partition start=2048", True)
        )

    def test_nothing(self) -> None:
        """A device with no name of its own (a zram disk) has none; empty files do not count."""
        self.assertIsNone(device_name(self.node(size="2048", serial="")))


class IdentityHelperTests(SynchronousTestCase):
    """``host_local``, ``slice_identity`` and ``machine_id``: for slices and plugins."""

    def test_machine_id(self) -> None:
        """The machine id is this host's ``/etc/machine-id`` (or a host name), never empty."""
        self.assertTrue(machine_id())
        if os.path.exists("/etc/machine-id"):
            self.assertEqual(machine_id(), Path("/etc/machine-id").read_bytes().strip())

    def test_host_local(self) -> None:
        """``host_local`` prefixes this host's id: the same here, another on another host."""
        self.assertEqual(host_local(b"x"), b"host=" + machine_id() + b" x")

    def test_slices(self) -> None:
        """Two slices of one disk differ from each other and from the disk; one slice is stable."""
        first = slice_identity(b"disk", 0, 4096)
        self.assertNotEqual(first, slice_identity(b"disk", 4096, 4096))
        self.assertNotEqual(first, b"disk")
        self.assertEqual(first, slice_identity(b"disk", 0, 4096))
