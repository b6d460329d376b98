# -*- test-case-name: tests.test_backends -*-
"""
The ``IBackendFactory`` plugins for the built-in backends.

``twisted/plugins/aoe_twisted_backends.py`` instantiates these, so this module
is imported whenever Twisted scans for plugins: it imports nothing heavier
than the interfaces, and each ``open`` imports its backend module.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from aoe_twisted.interfaces import IBackendFactory, IBlockBackend, IDirectIOFactory

__all__ = [
    "BlockDeviceBackendFactory",
    "FileBackendFactory",
    "MemoryBackendFactory",
    "NBDPluginFactory",
    "RBDBackendFactory",
    "ThreadedBackendFactory",
]


@implementer(IBackendFactory, IPlugin)
class MemoryBackendFactory:
    """Opens ``memory:SIZE``, e.g. ``memory:64M``."""

    scheme = "memory"
    spec_format = "SIZE"
    description = "a disk in RAM, zeros at start, lost at exit; SIZE e.g. 64M, 2G, 1048576"

    def open(self, spec: str, read_only: bool = False) -> IBlockBackend:
        """Return a zero-filled ``MemoryBackend`` of the size ``spec`` names."""
        from aoe_twisted.backends.memory import MemoryBackend
        from aoe_twisted.units import parse_size

        return MemoryBackend(parse_size(spec), read_only=read_only)


@implementer(IDirectIOFactory, IPlugin)
class FileBackendFactory:
    """Opens ``file:PATH``, e.g. ``file:/srv/aoe/disk0.img``."""

    scheme = "file"
    spec_format = "PATH"
    description = "a disk image in a regular file, a whole multiple of 512 bytes long"

    def open(self, spec: str, read_only: bool = False, direct: bool = False) -> IBlockBackend:
        """Return a ``FileBackend`` on the file at ``spec``, ``O_DIRECT`` if ``direct``."""
        from aoe_twisted.backends.file import FileBackend

        return FileBackend.open(spec, read_only=read_only, direct=direct)


@implementer(IDirectIOFactory, IPlugin)
class BlockDeviceBackendFactory:
    """Opens ``block:/dev/XXX``, e.g. ``block:/dev/vg0/aoe0``."""

    scheme = "block"
    spec_format = "/dev/XXX"
    description = "a block device (disk, partition, LVM volume, loop device)"

    def open(self, spec: str, read_only: bool = False, direct: bool = False) -> IBlockBackend:
        """Return a ``BlockDeviceBackend`` on the device at ``spec``, ``O_DIRECT`` if ``direct``."""
        from aoe_twisted.backends.block import BlockDeviceBackend

        return BlockDeviceBackend.open(spec, read_only=read_only, direct=direct)


@implementer(IBackendFactory, IPlugin)
class ThreadedBackendFactory:
    """Opens ``thread:[N:]SCHEME:SPEC``: another disk, each call in a pool of N threads."""

    scheme = "thread"
    spec_format = "[N:]SCHEME:SPEC"
    description = (
        "another disk whose calls may block (a remote store), run in N threads (default 8) "
        "so that it never stalls the other targets"
    )

    def open(self, spec: str, read_only: bool = False) -> Any:
        """Open the wrapped disk and return it as a ``ThreadedBackend``."""
        from aoe_twisted.backends.threaded import ThreadedBackend, parse_threaded_spec
        from aoe_twisted.backendspec import open_backend
        from aoe_twisted.errors import BackendSpecError

        try:
            threads, inner = parse_threaded_spec(spec)
        except ValueError as e:
            raise BackendSpecError(str(e)) from None
        disk = open_backend(inner, read_only=read_only)
        if not IBlockBackend.providedBy(disk):
            disk.close()
            raise BackendSpecError(f"{inner} already answers later: no need for thread:")
        return ThreadedBackend(disk, threads)


@implementer(IBackendFactory, IPlugin)
class RBDBackendFactory:
    """Opens ``rbd:POOL/IMAGE[@SNAP][,conf=PATH][,id=NAME]``: a Ceph RBD image (python3-rbd)."""

    scheme = "rbd"
    spec_format = (
        "POOL/[NAMESPACE/]IMAGE[@SNAP][,conf=PATH][,id=NAME][,namespace=NS][,timeout=SECS]"
    )
    description = "a Ceph RBD image through librbd, its cache off (a snapshot is read-only)"

    def open(self, spec: str, read_only: bool = False) -> Any:
        """Connect to the cluster and open the image (blocks until connected or timed out)."""
        from aoe_twisted.backends.rbd import open_rbd

        return open_rbd(spec, read_only)


@implementer(IBackendFactory, IPlugin)
class NBDPluginFactory:
    """
    Opens ``nbd:unix:PATH[:EXPORT]`` or ``nbd:HOST:PORT[:EXPORT]``: a disk an NBD server exports.

    The plugin's light face: ``aoe_twisted.backends.nbd`` (its
    ``NBDBackendFactory``) is imported only by ``open``.
    """

    scheme = "nbd"
    spec_format = "unix:PATH[:EXPORT] or HOST:PORT[:EXPORT]"
    description = (
        "a disk an NBD server exports (qemu-nbd, nbdkit, nbd-server), through libnbd; "
        "needs python3-libnbd"
    )

    def open(self, spec: str, read_only: bool = False) -> Any:
        """Connect to the export (blocking, at most the connect timeout)."""
        from aoe_twisted.backends.nbd import NBDBackendFactory

        return NBDBackendFactory().open(spec, read_only)
