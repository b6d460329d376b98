# -*- test-case-name: tests.test_e2e_mapped -*-
"""
End to end: a file disk the compiled lane writes through a mapping, failing under it.

A real server on a veth pair in its own namespaces, a peer on the other
end, the disk a sparse file on a 256 KiB ``tmpfs``.  What fails in the
mapping (``SIGBUS``) must be what fails with ``pread``/``pwrite``: an ATA
error for that request, counted under its errno, and the server serving the
next request as before.  Run with both data lanes (the Python lane never
maps, and must answer the same).
"""

from __future__ import annotations

import os

from twisted.internet import defer

from aoe_twisted.backends.file import FileBackend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import SECTOR_SIZE, ATAError
from tests.test_e2e import EndToEndCase, Gen
from tests.test_lane import fill_filesystem, small_tmpfs

#: The disk: 1024 sectors, sparse, on a filesystem the test then fills.
SECTORS = 1024


class MappedDiskFailureTests(EndToEndCase):
    """A mapped file disk that runs out of space, then shrinks, while it is served."""

    compiled = False

    def disk(self) -> FileBackend:
        """Return a sparse 1024-sector file disk (sector 0 written) on a small tmpfs."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.mount = small_tmpfs(self, directory, "256k")
        path = os.path.join(self.mount, "disk.img")
        with open(path, "wb") as f:
            f.write(b"\x11" * SECTOR_SIZE)
            f.truncate(SECTORS * SECTOR_SIZE)
        backend = FileBackend.open(path)
        self.addCleanup(backend.close)
        return backend

    @defer.inlineCallbacks
    def test_full_then_shrunk(self) -> Gen:
        """
        Writes to holes of a full filesystem fail ``ABRT`` (``ENOSPC``); reads and writes
        where the file has its pages still succeed; after the file is cut to 8 sectors a
        read past it fails ``UNC`` (``EIO``); the server answers every request.
        """
        backend = self.disk()
        target = Target(1, 0, backend)
        self.serve([target])
        if self.compiled:
            lane_table = self.service.protocol.laneTable()  # type: ignore[union-attr]
            self.assertEqual(lane_table.mapped(), 1, "the lane writes the disk through a mapping")
        self.ata_ok((yield self.peer.read(self.server, 1, 0, 0)), b"\x11" * SECTOR_SIZE)
        fill_filesystem(self.mount)
        hole = 700
        for _ in range(3):
            self.ata_failed((yield self.peer.write(self.server, 1, 0, hole, b"\x22" * 512)),
                            ATAError.ABRT)  # fmt: skip
        self.ata_ok((yield self.peer.write(self.server, 1, 0, 0, b"\x33" * SECTOR_SIZE)))
        self.ata_ok((yield self.peer.read(self.server, 1, 0, 0)), b"\x33" * SECTOR_SIZE)
        os.truncate(backend.path, 8 * SECTOR_SIZE)
        self.ata_failed((yield self.peer.read(self.server, 1, 0, 100)), ATAError.UNC)
        self.ata_ok((yield self.peer.read(self.server, 1, 0, 0)), b"\x33" * SECTOR_SIZE)
        stats = target.stats
        stats.absorb()
        self.assertEqual(stats.backend_errors, {"ENOSPC": 3, "EIO": 1})
        self.assertEqual(stats.ata_errors, 4)
        self.assertEqual(backend.read(0, SECTOR_SIZE), b"\x33" * SECTOR_SIZE)


class CompiledLaneMappedDiskFailureTests(MappedDiskFailureTests):
    """``MappedDiskFailureTests`` with the compiled lane, which writes through a mapping."""

    compiled = True
