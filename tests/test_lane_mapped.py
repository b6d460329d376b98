# -*- test-case-name: tests.test_lane_mapped -*-
"""
Mapped writes in the compiled lane: file and block disks written through a mapping.

The lane's answers on such disks are compared with the Python lane's by
``tests.test_lane`` (the ``file`` kinds; the ``pwrite`` kinds keep the
``pwrite`` path covered) and by the lane fuzz target.  Here: which disks are
mapped, that writes really go through the mapping, that its page tables are
bounded, and what a fault in it (``SIGBUS``: the file shrank, no space
left) does to a request and to the process.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest

import aoe_twisted
from aoe_twisted.backends.block import BlockDeviceBackend
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.slice import SliceBackend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import MIN_FRAME_SIZE, SECTOR_SIZE, ATACmdStatus
from aoe_twisted.lane import describe
from aoe_twisted.lane.storage import MAPPED_WRITES_VARIABLE, LaneStorage, mapped_writes
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

#: Where this process imports ``aoe_twisted`` from: the child processes import the same.
_SRC = os.path.dirname(os.path.dirname(os.path.abspath(aoe_twisted.__file__)))


class _MappedCase(_NativeCase):
    """Image files, and frames to read and write them through the lane."""

    def setUp(self) -> None:
        super().setUp()
        saved = os.environ.pop(MAPPED_WRITES_VARIABLE, None)
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, MAPPED_WRITES_VARIABLE, saved)

    def image(self, sectors: int = SECTORS) -> str:
        """Return the path of a new image of ``sectors`` sectors holding ``CONTENTS``."""
        path = tempfile.mktemp(dir=self.directory)
        with open(path, "wb") as f:
            f.write(CONTENTS[: sectors * SECTOR_SIZE])
        return path

    def opened(self, *args: Any, **kwargs: Any) -> FileBackend:
        """``FileBackend.open``, closed at the end of the test."""
        backend = FileBackend.open(*args, **kwargs)
        self.addCleanup(backend.close)
        return backend

    def table(self, *backends: Any) -> Any:
        """Return the lane's table serving ``backends`` as e1.0, e1.1 ..."""
        with lane_module(self.native):
            table = build_table([Target(1, slot, backend, max_sectors=4)
                                 for slot, backend in enumerate(backends)])  # fmt: skip
        self.assertIsNotNone(table)
        return table

    def write(self, table: Any, lba: int, data: bytes, slot: int = 0) -> bytes:
        """Answer a write of ``data`` at ``lba``; return the reply."""
        buffer = bytearray(MIN_FRAME_SIZE)
        frame = ethernet_frame(ata_request(0x34, count=len(data) // SECTOR_SIZE, lba=lba,
                                           data=data, slot=slot))  # fmt: skip
        length = one_frame_lane(self.native).answer(table, frame, buffer)
        self.assertEqual(length, MIN_FRAME_SIZE)
        return bytes(buffer[:length])

    def assertWritten(self, reply: bytes) -> None:
        """Check ``reply`` is a successful ATA reply (``DRDY``)."""
        self.assertEqual(reply[27], int(ATACmdStatus.READY_STATUS), reply[:36].hex())


class WhichDisksTests(_MappedCase):
    """``FDBackend.lane_storage`` and the table: a writable, buffered disk is mapped."""

    def test_writable_file(self) -> None:
        """A writable file is ``mapped``; the table maps it, and a slice of it."""
        backend = self.opened(self.image())
        storage = backend.lane_storage()
        self.assertTrue(storage.mapped)
        self.assertEqual(storage.fd, backend.fileno())
        sliced = SliceBackend(backend, 3 * SECTOR_SIZE, 8 * SECTOR_SIZE)
        self.assertTrue(sliced.lane_storage().mapped)
        table = self.table(backend, sliced)
        self.assertEqual(table.mapped(), 2)
        self.assertEqual(table.unmapped(), [])

    def test_not_mapped(self) -> None:
        """Read-only, ``O_DIRECT``, and made with ``AOE_TWISTED_MAPPED_WRITES=0``: not mapped."""
        disks = [self.opened(self.image(), read_only=True)]
        if direct_problem(self.directory) is None:
            disks.append(self.opened(self.image(), direct=True))
        os.environ[MAPPED_WRITES_VARIABLE] = "0"
        try:
            told = self.opened(self.image())
        finally:
            del os.environ[MAPPED_WRITES_VARIABLE]
        disks.append(told)
        self.assertFalse(told.mappable)
        self.assertTrue(self.opened(self.image()).mappable)
        for disk in disks:
            self.assertFalse(disk.lane_storage().mapped, disk)
        self.assertEqual(self.table(*disks).mapped(), 0)

    def test_not_under_group_commit(self) -> None:
        """
        Writes held for group commit (``--sync``, a target's ``sync``) go with ``pwrite``:
        each commit would write-protect the mapped pages again.
        """
        backend = self.opened(self.image())
        with lane_module(self.native):
            held = build_table([Target(1, 0, backend)], hold_writes=True)
            synced = build_table([Target(1, 0, backend, sync=True)])
            plain = build_table([Target(1, 0, backend)])
        self.assertEqual((held.mapped(), synced.mapped(), plain.mapped()), (0, 0, 1))
        self.assertEqual(held.unmapped(), [])

    def test_file_shorter(self) -> None:
        """
        A file already shorter than its disk is not mapped (a write past its end inside its
        last page would not fault, and would be dropped): said once, written with ``pwrite``.
        """
        path = self.image()
        backend = self.opened(path)
        os.truncate(path, 1000)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            table = self.table(backend)
        finally:
            globalLogPublisher.removeObserver(events.append)
        self.assertEqual(table.mapped(), 0)
        lines = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("(the file is shorter than the disk)", lines[0])
        data = os.urandom(SECTOR_SIZE)
        self.assertWritten(self.write(table, 1, data))
        self.assertEqual(backend.read(SECTOR_SIZE, SECTOR_SIZE), data)

    def test_cannot_map(self) -> None:
        """
        A descriptor the kernel will not map for writing (open read-only behind a disk said
        to be writable): written with ``pwrite``, said once however often the table is built.
        """
        path = self.image()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.addCleanup(os.close, fd)
        backend = FileBackend(path=path, size=SECTORS * SECTOR_SIZE, read_only=False, fd=fd)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            first = self.table(backend)
            self.table(backend)
        finally:
            globalLogPublisher.removeObserver(events.append)
        self.assertEqual(first.mapped(), 0)
        self.assertEqual([(t.backend, e) for t, e in first.unmapped()], [(backend, errno.EACCES)])
        lines = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("e1.0", lines[0])
        self.assertIn("cannot be written through a mapping (Permission denied)", lines[0])

    def test_refused(self) -> None:
        """Only a descriptor that is not ``O_DIRECT`` is mapped; a table takes None or True."""
        self.assertRaises(ValueError, LaneStorage, buffer=bytearray(512), mapped=True)
        self.assertRaises(ValueError, LaneStorage, fd=0, direct=True, mapped=True)
        self.assertTrue(LaneStorage(fd=0, mapped=True).mapped)
        backend = self.opened(self.image())
        target = Target(1, 0, backend)
        for buffer, error in ((bytearray(SECTORS * SECTOR_SIZE), TypeError), (1, TypeError)):
            entry = (1, 0, 2, SECTORS, backend.fileno(), buffer, 0, False, 512,
                     self.native.WRITES_SENT, target, backend, target.stats.tally)  # fmt: skip
            self.assertRaises(error, self.native.Table, [entry])
        entry = (1, 0, 2, SECTORS, backend.fileno(), True, 0, True, 512,
                 self.native.WRITES_SENT, target, backend, target.stats.tally)  # fmt: skip
        self.assertRaises(ValueError, self.native.Table, [entry])


class CopiesTests(_MappedCase):
    """Writes go through the mapping; a fault in it fails nothing that ``pwrite`` would do."""

    def append_only(self, mappable: bool) -> tuple[FileBackend, int]:
        """A disk on an ``O_APPEND`` descriptor: ``pwrite`` appends, a mapping writes in place."""
        path = self.image()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self.addCleanup(os.close, fd)
        backend = FileBackend(path=path, size=SECTORS * SECTOR_SIZE, read_only=False, fd=fd,
                              mappable=mappable)  # fmt: skip
        return backend, fd

    def test_through_the_mapping(self) -> None:
        """
        On an ``O_APPEND`` descriptor, where ``pwrite`` would append: the lane's write lands
        in place, so it went through the mapping; not mapped, it is appended.
        """
        data = bytes(range(256)) * 4
        backend, fd = self.append_only(mappable=True)
        self.assertWritten(self.write(self.table(backend), 9, data))
        self.assertEqual(os.pread(fd, len(data), 9 * SECTOR_SIZE), data)
        self.assertEqual(os.fstat(fd).st_size, SECTORS * SECTOR_SIZE)

        backend, fd = self.append_only(mappable=False)
        self.assertWritten(self.write(self.table(backend), 9, data))
        self.assertEqual(os.pread(fd, len(data), 9 * SECTOR_SIZE),
                         CONTENTS[9 * SECTOR_SIZE:11 * SECTOR_SIZE])  # fmt: skip
        self.assertEqual(os.fstat(fd).st_size, SECTORS * SECTOR_SIZE + len(data))

    def test_slice(self) -> None:
        """A slice off a page boundary writes its own sectors through its disk's file."""
        backend = self.opened(self.image())
        sliced = SliceBackend(backend, 3 * SECTOR_SIZE, 16 * SECTOR_SIZE)
        table = self.table(sliced)
        self.assertEqual(table.mapped(), 1)
        data = os.urandom(2 * SECTOR_SIZE)
        self.assertWritten(self.write(table, 14, data))
        self.assertEqual(backend.read(17 * SECTOR_SIZE, 2 * SECTOR_SIZE), data)
        self.assertEqual(backend.read(16 * SECTOR_SIZE, SECTOR_SIZE),
                         CONTENTS[16 * SECTOR_SIZE:17 * SECTOR_SIZE])  # fmt: skip

    def test_file_shrinks(self) -> None:
        """
        The file is cut to 2 sectors after it was mapped: a write past its new end faults in
        the mapping and is done again with ``pwrite``, which succeeds, as it would have.
        """
        backend = self.opened(self.image())
        table = self.table(backend)
        os.truncate(backend.path, 2 * SECTOR_SIZE)
        data = os.urandom(SECTOR_SIZE)
        self.assertWritten(self.write(table, 12, data))
        self.assertEqual(backend.read(12 * SECTOR_SIZE, SECTOR_SIZE), data)
        self.assertEqual(os.stat(backend.path).st_size, 13 * SECTOR_SIZE)
        self.assertWritten(self.write(table, 1, data))
        self.assertEqual(backend.read(SECTOR_SIZE, SECTOR_SIZE), data)

    def test_truncated_inside_a_page(self) -> None:
        """
        The file is cut to 1000 bytes, inside a page, after a write through the mapping: the
        next write, into that page past the new end (which does not fault, and which the
        kernel would drop), is done again with ``pwrite``, so it is kept and the file
        extended, and the disk is written with ``pwrite`` from then on.
        """
        backend = self.opened(self.image())
        table = self.table(backend)
        self.assertWritten(self.write(table, 0, b"\x11" * SECTOR_SIZE))
        self.assertEqual(table.mapped(), 1)
        os.truncate(backend.path, 1000)
        data = b"\x5a" * SECTOR_SIZE
        self.assertWritten(self.write(table, 2, data))
        self.assertEqual(table.mapped(), 0)
        self.assertEqual(os.stat(backend.path).st_size, 3 * SECTOR_SIZE)
        self.assertEqual(backend.read(2 * SECTOR_SIZE, SECTOR_SIZE), data)
        self.assertEqual(backend.read(0, SECTOR_SIZE), b"\x11" * SECTOR_SIZE)
        self.assertWritten(self.write(table, 5, data))
        self.assertEqual(backend.read(5 * SECTOR_SIZE, SECTOR_SIZE), data)

    def test_block_device_shrinks(self) -> None:
        """
        A loop device shrunk to 2 sectors after a write through its mapping: a write to its
        third sector, inside the page of its new end (which does not fault), is not
        acknowledged: it is done again with ``pwrite``, which fails past the end.
        """
        if shutil.which("losetup") is None:
            raise SkipTest("needs losetup (util-linux)")
        path = self.image()
        try:
            device = subprocess.run(["losetup", "--find", "--show", path], check=True,
                                    capture_output=True, text=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as e:
            raise SkipTest(f"cannot attach a loop device: {e}") from None
        self.addCleanup(subprocess.run, ["losetup", "--detach", device], check=False)
        backend = BlockDeviceBackend.open(device)
        self.addCleanup(backend.close)
        table = self.table(backend)
        self.assertEqual(table.mapped(), 1)
        self.assertWritten(self.write(table, 0, b"\x11" * SECTOR_SIZE))
        os.truncate(path, 2 * SECTOR_SIZE)
        subprocess.run(["losetup", "--set-capacity", device], check=True, capture_output=True)
        reply = self.write(table, 2, b"\x5a" * SECTOR_SIZE)
        self.assertEqual(reply[27], 0x41, "ERR|DRDY: the write past the new end failed")
        self.assertEqual(table.mapped(), 0)

    def test_mapped_again(self) -> None:
        """
        After writes in 2048 regions of 2 MiB the disk is mapped afresh (its page tables
        freed); every write before and after is on the disk.
        """
        path = tempfile.mktemp(dir=self.directory)
        regions = 2100
        with open(path, "wb") as f:
            f.truncate(regions << 21)
        backend = self.opened(path)
        table = self.table(backend)

        def mappings() -> set[str]:
            with open("/proc/self/maps") as f:
                return {line.split()[0] for line in f if line.rstrip().endswith(path)}

        first = mappings()
        self.assertEqual(len(first), 1)
        for region in range(regions):
            data = region.to_bytes(4, "big") * (SECTOR_SIZE // 4)
            self.assertWritten(self.write(table, (region << 21) // SECTOR_SIZE + 1, data))
            if region == 2046:
                self.assertEqual(mappings(), first)
        after = mappings()
        self.assertEqual(len(after), 1)
        self.assertNotEqual(after, first)
        for region in (0, 2047, 2048, regions - 1):
            self.assertEqual(backend.read((region << 21) + SECTOR_SIZE, 4),
                             region.to_bytes(4, "big"))  # fmt: skip


_SCRIPT = """
import faulthandler, mmap, os, signal, sys
sys.path.insert(0, {src!r})
from aoe_twisted import lane
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.core.target import Target
from aoe_twisted.lane.table import build_table
from aoe_twisted.testing import ata_request, ethernet_frame

MAC = b"\\x02" * 6
path, other, steps = {path!r}, {other!r}, {steps!r}
if "ignore" in steps:
    signal.signal(signal.SIGBUS, signal.SIG_IGN)
backend = FileBackend.open(path)
table = build_table([Target(1, 0, backend, max_sectors=2)])
assert table.mapped() == 1
if "faulthandler" in steps:
    faulthandler.enable()
if "kill" in steps:
    os.kill(os.getpid(), signal.SIGBUS)
    print("killed and alive", flush=True)
if "kernel" in steps:
    # A SIGBUS as the kernel sends one that is not a fault (si_code SI_KERNEL), queued to
    # this process with rt_sigqueueinfo: not the lane's, so it ends the process.
    import ctypes
    class Info(ctypes.Structure):
        _fields_ = [("signo", ctypes.c_int), ("errno", ctypes.c_int), ("code", ctypes.c_int),
                    ("rest", ctypes.c_byte * 116)]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(129, os.getpid(), signal.SIGBUS, ctypes.byref(Info(signal.SIGBUS, 0, 0x80)))
    print("survived", flush=True)
    sys.exit(0)
lane_ = lane.native.Lane(bytearray(4096), [0], 2048, [2048], 2048, MAC, 9014, False)
reply = bytearray(60)
with open(other, "r+b") as f:
    f.truncate(8192)
    mapped = mmap.mmap(f.fileno(), 8192)
if "source" in steps:
    # A frame whose sectors lie in a page that faults: the copy faults reading them,
    # outside the range it writes, so the fault is not the lane's to catch.
    frame = ethernet_frame(ata_request(0x34, count=1, lba=3, data=b"\\x77" * 512), dst=MAC)
    mapped[4096 - 36:4096 + 512] = frame
    os.truncate(other, 4096)
    print("reading a frame that faults", flush=True)
    lane_.answer(table, memoryview(mapped)[4096 - 36:4096 + 512], reply)
    print("survived", flush=True)
    sys.exit(0)
# A first write through the mapping, then one past the new end, a page on: it faults and
# is done again with pwrite.
lane_.answer(table, ethernet_frame(ata_request(0x34, count=1, lba=0, data=bytes(512)), dst=MAC),
             reply)
os.truncate(path, 512)
frame = ethernet_frame(ata_request(0x34, count=1, lba=10, data=b"\\x5a" * 512), dst=MAC)
lane_.answer(table, frame, reply)
print("guarded", reply[27], os.path.getsize(path), table.mapped(), flush=True)
os.truncate(other, 0)
mapped[5000]
print("survived", flush=True)
"""


class ProcessTests(_MappedCase):
    """
    The ``SIGBUS`` handler, in a child process: a fault in the lane's copy is caught,
    any other is still fatal, whatever other handler there is.
    """

    def run_script(self, *steps: str) -> subprocess.CompletedProcess[str]:
        """Run ``_SCRIPT``: a guarded fault, then ``steps``, then a fault that is not ours."""
        code = textwrap.dedent(_SCRIPT).format(
            src=_SRC, path=self.image(), other=self.image(1), steps=steps
        )
        env = {k: v for k, v in os.environ.items()
               if k not in (MAPPED_WRITES_VARIABLE, "PYTHONFAULTHANDLER")}  # fmt: skip
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env=env, check=False)  # fmt: skip

    def assertGuarded(self, done: subprocess.CompletedProcess[str]) -> None:
        """The lane's write past the end faulted, was done again with ``pwrite``, and held."""
        ready = int(ATACmdStatus.READY_STATUS)
        self.assertIn(f"guarded {ready} {11 * SECTOR_SIZE} 1", done.stdout, done.stderr)

    def assertDiedOfSigbus(self, done: subprocess.CompletedProcess[str]) -> None:
        """The other fault ended the process, with ``SIGBUS``."""
        self.assertNotIn("survived", done.stdout)
        self.assertEqual(done.returncode, -signal.SIGBUS, done.stderr)

    def test_other_faults_fatal(self) -> None:
        """A fault of Python's own mapping ends the process with ``SIGBUS``, as it would."""
        done = self.run_script()
        self.assertGuarded(done)
        self.assertDiedOfSigbus(done)

    def test_fault_reading_the_frame(self) -> None:
        """
        A fault in the lane's own copy, but reading the frame rather than writing the disk:
        not caught (it is outside the range written), so the process ends with ``SIGBUS``.
        """
        done = self.run_script("source")
        self.assertIn("reading a frame that faults", done.stdout, done.stderr)
        self.assertDiedOfSigbus(done)

    def test_faulthandler_after(self) -> None:
        """
        ``faulthandler`` enabled after the table was made: the lane puts its handler back
        before it writes, so its fault is still caught, and the other fault still reaches
        ``faulthandler``, which reports it once, and the process ends with ``SIGBUS``.
        """
        done = self.run_script("faulthandler")
        self.assertGuarded(done)
        self.assertEqual(done.stderr.count("Fatal Python error: Bus error"), 1, done.stderr)
        self.assertDiedOfSigbus(done)

    def test_kernel_sent(self) -> None:
        """
        A ``SIGBUS`` the kernel sends without a fault (``SI_KERNEL``) is not the lane's: it
        is handed back to the default disposition and ends the process.
        """
        if platform.machine() != "x86_64":
            raise SkipTest("rt_sigqueueinfo is system call 129 on x86_64 only")
        done = self.run_script("kernel")
        self.assertDiedOfSigbus(done)

    def test_ignored_and_sent(self) -> None:
        """
        ``SIGBUS`` ignored before the lane's handler, then sent with ``kill``: still ignored
        (the process goes on), and the lane's next fault is still caught.
        """
        done = self.run_script("ignore", "kill")
        self.assertIn("killed and alive", done.stdout, done.stderr)
        self.assertGuarded(done)


class DescribeTests(_MappedCase):
    """The log line at start says how the compiled lane writes file and block disks."""

    def test_mapped(self) -> None:
        """By default: through a mapping."""
        self.assertTrue(mapped_writes())
        self.assertTrue(describe().endswith("; file and block disks written through a mapping)"))

    def test_pwrite(self) -> None:
        """``AOE_TWISTED_MAPPED_WRITES=0`` (spaces around too): with ``pwrite``."""
        for value in ("0", " 0 "):
            os.environ[MAPPED_WRITES_VARIABLE] = value
            try:
                self.assertFalse(mapped_writes())
                self.assertTrue(describe().endswith(
                    "; file and block disks written with pwrite, "
                    "AOE_TWISTED_MAPPED_WRITES=0 is set)"
                ))
            finally:
                del os.environ[MAPPED_WRITES_VARIABLE]
        for value in ("", "1", "yes"):
            os.environ[MAPPED_WRITES_VARIABLE] = value
            try:
                self.assertTrue(mapped_writes(), value)
            finally:
                del os.environ[MAPPED_WRITES_VARIABLE]
