# -*- test-case-name: tests.test_lane_mapped -*-
"""
Mapped I/O in the compiled lane: file and block disks copied through a shared mapping.

The lane's answers on mapped disks are compared with the Python lane's by
``tests.test_lane`` (the ``file`` kinds; ``pread`` kinds keep the
``pread``/``pwrite`` path covered).  Here: which disks are mapped, that the
copies really go through the mapping, and what a fault in the mapping
(``SIGBUS``: the file shrank, no space left) does to a request and to the
process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.slice import SliceBackend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import MIN_FRAME_SIZE, SECTOR_SIZE, ATACmdStatus, ATAError
from aoe_twisted.lane import describe
from aoe_twisted.lane.storage import LANE_IO_VARIABLE, LaneStorage, mapped_io
from aoe_twisted.lane.table import build_table
from aoe_twisted.testing import ata_request, ethernet_frame
from tests.test_lane import (
    CONTENTS,
    SECTORS,
    _NativeCase,
    direct_problem,
    lane_module,
    one_frame_lane,
)

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_HERE), "src")


class _MappedCase(_NativeCase):
    """Image files and the frames to read and write them through the lane."""

    def image(self, sectors: int = SECTORS) -> str:
        """Return the path of a new image of ``sectors`` sectors holding ``CONTENTS``."""
        path = tempfile.mktemp(dir=self.directory)
        with open(path, "wb") as f:
            f.write(CONTENTS[: sectors * SECTOR_SIZE])
        return path

    def table(self, backend: Any) -> Any:
        """Return the lane's table serving ``backend`` as e1.0, closing the disk at the end."""
        self.addCleanup(backend.close)
        with lane_module(self.native):
            table = build_table([Target(1, 0, backend, max_sectors=4)])
        self.assertIsNotNone(table)
        return table

    def read(self, table: Any, lba: int, count: int) -> bytes:
        """Answer a read of ``count`` sectors at ``lba``; return the whole reply."""
        buffer = bytearray(36 + count * SECTOR_SIZE)
        frame = ethernet_frame(ata_request(0x24, count=count, lba=lba))
        length = one_frame_lane(self.native).answer(table, frame, buffer)
        return bytes(buffer[:length])

    def write(self, table: Any, lba: int, data: bytes) -> bytes:
        """Answer a write of ``data`` at ``lba``; return the reply."""
        buffer = bytearray(MIN_FRAME_SIZE)
        frame = ethernet_frame(ata_request(0x34, count=len(data) // SECTOR_SIZE, lba=lba,
                                           data=data))  # fmt: skip
        length = one_frame_lane(self.native).answer(table, frame, buffer)
        return bytes(buffer[:length])


class WhichDisksTests(_MappedCase):
    """``FDBackend.lane_storage``: a writable, buffered disk is mapped; others are not."""

    def test_writable_file_mapped(self) -> None:
        """A writable file: a shared mapping of the whole disk, made once, beside its descriptor."""
        backend = FileBackend.open(self.image())
        self.addCleanup(backend.close)
        storage = backend.lane_storage()
        self.assertEqual(storage.fd, backend.fileno())
        self.assertIsNone(storage.buffer)
        self.assertEqual(len(storage.mapping), SECTORS * SECTOR_SIZE)
        self.assertIs(backend.lane_storage().mapping, storage.mapping)
        self.assertEqual(storage.mapping[:SECTOR_SIZE], CONTENTS[:SECTOR_SIZE])

    def test_slice_of_mapped(self) -> None:
        """A slice keeps its disk's mapping and its own offset in it."""
        backend = FileBackend.open(self.image())
        self.addCleanup(backend.close)
        storage = SliceBackend(backend, 3 * SECTOR_SIZE, 8 * SECTOR_SIZE).lane_storage()
        self.assertIs(storage.mapping, backend.lane_storage().mapping)
        self.assertEqual(storage.offset, 3 * SECTOR_SIZE)

    def test_not_mapped(self) -> None:
        """Read-only, ``O_DIRECT``, and made with ``AOE_TWISTED_LANE_IO=pread``: no mapping."""
        read_only = FileBackend.open(self.image(), read_only=True)
        self.addCleanup(read_only.close)
        self.assertIsNone(read_only.lane_storage().mapping)
        problem = direct_problem(self.directory)
        if problem is None:
            direct = FileBackend.open(self.image(), direct=True)
            self.addCleanup(direct.close)
            self.assertIsNone(direct.lane_storage().mapping)
        os.environ[LANE_IO_VARIABLE] = "pread"
        try:
            told = FileBackend.open(self.image())
        finally:
            del os.environ[LANE_IO_VARIABLE]
        self.addCleanup(told.close)
        self.assertFalse(told.mappable)
        self.assertIsNone(told.lane_storage().mapping)
        self.assertTrue(FileBackend.open(self.image()).mappable)

    def test_cannot_map(self) -> None:
        """
        A file already shorter than the disk cannot be mapped: said once, served with
        ``pread``/``pwrite``, and not tried again.
        """
        backend = FileBackend.open(self.image())
        self.addCleanup(backend.close)
        os.truncate(backend.path, SECTOR_SIZE)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            first = backend.lane_storage()
            second = backend.lane_storage()
        finally:
            globalLogPublisher.removeObserver(events.append)
        lines = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"file {backend.path}: cannot be mapped into memory", lines[0])
        self.assertIsNone(first.mapping)
        self.assertIsNone(second.mapping)
        self.assertFalse(backend.mappable)

    def test_storage_refuses(self) -> None:
        """A mapping needs the descriptor it maps, and is never an ``O_DIRECT`` one."""
        self.assertRaises(ValueError, LaneStorage, buffer=bytearray(512), mapping=bytearray(512))
        self.assertRaises(ValueError, LaneStorage, fd=0, direct=True, mapping=bytearray(512))
        self.assertIsNotNone(LaneStorage(fd=0, mapping=bytearray(512)).mapping)

    def test_close(self) -> None:
        """
        ``close`` unmaps the disk; while a lane table holds the mapping it goes with the
        table, which still answers from it.
        """
        backend = FileBackend.open(self.image())
        mapping = backend.lane_storage().mapping
        backend.close()
        self.assertTrue(mapping.closed)
        backend.close()

        backend = FileBackend.open(self.image())
        table = self.table(backend)
        mapping = backend.lane_storage().mapping
        backend.close()
        self.assertFalse(mapping.closed)
        reply = self.read(table, 2, 1)
        self.assertEqual(reply[27], int(ATACmdStatus.READY_STATUS))
        self.assertEqual(reply[36:], CONTENTS[2 * SECTOR_SIZE:3 * SECTOR_SIZE])


class CopiesTests(_MappedCase):
    """The lane copies through the mapping, and a fault in it fails only that request."""

    def test_through_the_mapping(self) -> None:
        """
        A table entry with a descriptor and a buffer standing in for its mapping: the lane
        reads and writes the buffer, not the file (so the mapping is what it uses).
        """
        path = self.image()
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.addCleanup(os.close, fd)
        backend = FileBackend(path=path, size=SECTORS * SECTOR_SIZE, read_only=False, fd=fd)
        stand_in = bytearray(b"\x5a" * (SECTORS * SECTOR_SIZE))
        target = Target(1, 0, backend, max_sectors=4)
        table = self.native.Table([(1, 0, 4, SECTORS, fd, stand_in, 0, False, 512,
                                    self.native.WRITES_SENT, target, backend,
                                    target.stats.tally)])  # fmt: skip
        self.assertEqual(self.read(table, 4, 2)[36:], b"\x5a" * (2 * SECTOR_SIZE))
        data = bytes(range(256)) * 4
        self.assertEqual(self.write(table, 9, data)[27], int(ATACmdStatus.READY_STATUS))
        self.assertEqual(bytes(stand_in[9 * SECTOR_SIZE:11 * SECTOR_SIZE]), data)
        self.assertEqual(os.pread(fd, 2 * SECTOR_SIZE, 9 * SECTOR_SIZE),
                         CONTENTS[9 * SECTOR_SIZE:11 * SECTOR_SIZE])  # fmt: skip

    def test_mapped_writes_are_the_file(self) -> None:
        """What the lane writes through the mapping is what ``pread`` reads, at once."""
        backend = FileBackend.open(self.image())
        table = self.table(backend)
        data = os.urandom(4 * SECTOR_SIZE)
        self.assertEqual(self.write(table, 60, data)[27], int(ATACmdStatus.READY_STATUS))
        self.assertEqual(backend.read(60 * SECTOR_SIZE, 4 * SECTOR_SIZE), data)
        backend.write(0, data)
        self.assertEqual(self.read(table, 0, 4)[36:], data)

    def test_file_shrinks(self) -> None:
        """
        The file is truncated after it was mapped: a read past its new end faults in the
        mapping and fails as ``pread`` fails it (``EIO``, answered ``UNC``); a write there
        is done by ``pwrite``, which can, and the process goes on serving.
        """
        backend = FileBackend.open(self.image())
        table = self.table(backend)
        os.truncate(backend.path, 2 * SECTOR_SIZE)
        reply = self.read(table, 10, 1)
        self.assertEqual(reply[25:28], bytes([int(ATAError.UNC), 1, 0x41]))
        self.assertEqual(self.read(table, 1, 1)[36:], CONTENTS[SECTOR_SIZE:2 * SECTOR_SIZE])
        data = os.urandom(SECTOR_SIZE)
        self.assertEqual(self.write(table, 12, data)[27], int(ATACmdStatus.READY_STATUS))
        self.assertEqual(backend.read(12 * SECTOR_SIZE, SECTOR_SIZE), data)


_SCRIPT = """
import faulthandler, mmap, os, sys
sys.path.insert(0, {src!r})
if {faulthandler!r}:
    faulthandler.enable()
from aoe_twisted import lane
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.core.target import Target
from aoe_twisted.lane.table import build_table
from aoe_twisted.testing import ata_request, ethernet_frame

path = {path!r}
backend = FileBackend.open(path)
table = build_table([Target(1, 0, backend, max_sectors=2)])
assert backend.lane_storage().mapping is not None
os.truncate(path, 512)
lane_ = lane.native.Lane(bytearray(4096), [0], 2048, [2048], 2048, b"\\x02" * 6, 9014, False)
reply = bytearray(600)
lane_.answer(table, ethernet_frame(ata_request(0x24, count=1, lba=10), dst=b"\\x02" * 6), reply)
print("guarded", reply[25], flush=True)
os.truncate(path, 8192)
other = mmap.mmap(os.open(path, os.O_RDWR), 8192)
os.truncate(path, 0)
other[5000]
print("survived", flush=True)
"""


class ProcessTests(_MappedCase):
    """The ``SIGBUS`` handler: a fault in a guarded copy is caught, any other is still fatal."""

    def run_script(self, faulthandler: bool) -> subprocess.CompletedProcess[str]:
        """Run ``_SCRIPT``: a guarded fault, then one of Python's own mappings faulting."""
        path = self.image()
        code = textwrap.dedent(_SCRIPT).format(src=_SRC, path=path, faulthandler=faulthandler)
        env = dict(os.environ)
        env.pop(LANE_IO_VARIABLE, None)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env=env, check=False)  # fmt: skip

    def test_other_faults_fatal(self) -> None:
        """
        After the lane's guarded copy survived its fault (``UNC``), a fault anywhere else ends
        the process with ``SIGBUS`` as it would have without the lane.
        """
        done = self.run_script(faulthandler=False)
        self.assertIn(f"guarded {int(ATAError.UNC)}", done.stdout, done.stderr)
        self.assertNotIn("survived", done.stdout)
        self.assertEqual(done.returncode, -signal.SIGBUS, done.stderr)

    def test_with_faulthandler(self) -> None:
        """
        With Python's ``faulthandler`` on first: the guarded copy is still caught, and the
        other fault still goes to ``faulthandler``, which reports it and ends the process.
        """
        done = self.run_script(faulthandler=True)
        self.assertIn(f"guarded {int(ATAError.UNC)}", done.stdout, done.stderr)
        self.assertNotIn("survived", done.stdout)
        self.assertIn("Bus error", done.stderr)
        self.assertEqual(done.returncode, -signal.SIGBUS, done.stderr)



class DescribeTests(_MappedCase):
    """The log line at start says how the compiled lane reaches file and block disks."""

    def test_mapped(self) -> None:
        """By default: mapped into memory."""
        os.environ.pop(LANE_IO_VARIABLE, None)
        self.assertTrue(mapped_io())
        self.assertTrue(describe().endswith("; file and block disks mapped into memory)"))

    def test_pread(self) -> None:
        """``AOE_TWISTED_LANE_IO=pread`` (any case, spaces around): ``pread``/``pwrite``."""
        for value in ("pread", " PREAD "):
            os.environ[LANE_IO_VARIABLE] = value
            try:
                self.assertFalse(mapped_io())
                self.assertTrue(describe().endswith(
                    "; file and block disks with pread/pwrite, AOE_TWISTED_LANE_IO=pread is set)"
                ))
            finally:
                del os.environ[LANE_IO_VARIABLE]
