"""
Tests for ``aoe_twisted.interfaces``: every built-in class provides what it declares.

Optional abilities are declared interfaces, checked with ``providedBy``
where an object is accepted; these tests check that each built-in backend,
factory and ACL store declares exactly the abilities it has, and that
``verifyObject`` accepts it for each of them (the methods exist, with the
interface's signatures).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyObject

from aoe_twisted.backends.block import BlockDeviceBackend
from aoe_twisted.backends.factories import (
    BlockDeviceBackendFactory,
    FileBackendFactory,
    MemoryBackendFactory,
)
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.backends.shared_memory import SharedMemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.interfaces import (
    IACLStore,
    IBackendFactory,
    IBlockBackend,
    IDataSyncBackend,
    IDescriptorBackend,
    IDirectIOFactory,
    IDiskIdentity,
    IProcessShareableBackend,
    IStatePersister,
    ITransactionalACLStore,
    IZeroCopyBackend,
)
from aoe_twisted.sharedacl import SharedState
from aoe_twisted.statefile import FileACLStore
from tests.test_backends import SIZE, _losetup, _make_image

#: Every interface a built-in object may provide, ability or not.
_ALL = (
    IBlockBackend,
    IZeroCopyBackend,
    IDataSyncBackend,
    IDescriptorBackend,
    IProcessShareableBackend,
    IDiskIdentity,
    IBackendFactory,
    IDirectIOFactory,
    IACLStore,
    ITransactionalACLStore,
    IStatePersister,
)

_FD_BACKEND = (IBlockBackend, IZeroCopyBackend, IDataSyncBackend, IDescriptorBackend)

#: A file or block device: an ``_FD_BACKEND`` that can also name its disk.
_NAMED_FD_BACKEND = (*_FD_BACKEND, IDiskIdentity)


class _ProvidesMixin:
    """``assertProvidesExactly``: the interfaces an object provides, each verified."""

    def assertProvidesExactly(
        self: SynchronousTestCase, thing: object, interfaces: tuple[InterfaceClass, ...]
    ) -> None:
        """
        ``thing`` provides each of ``interfaces`` (``verifyObject`` agrees) and
        no other interface of ``_ALL``.
        """
        for interface in interfaces:
            self.assertTrue(verifyObject(interface, thing), interface)
        provided = {interface for interface in _ALL if interface.providedBy(thing)}
        self.assertEqual(provided, set(interfaces))


class BackendInterfacesTests(_ProvidesMixin, SynchronousTestCase):
    """Each built-in backend provides its abilities, read-write and read-only."""

    def check(
        self,
        open_backend: Callable[[bool], IBlockBackend],
        interfaces: tuple[InterfaceClass, ...],
    ) -> None:
        """Open the backend read-write and read-only; each provides exactly ``interfaces``."""
        for read_only in (False, True):
            backend = open_backend(read_only)
            self.addCleanup(backend.close)
            self.assertProvidesExactly(backend, interfaces)

    def test_memory(self) -> None:
        """
        A memory disk reads zero-copy, syncs for free and can move into shared
        memory; it has no identity (it is never shared).
        """
        self.check(
            lambda read_only: MemoryBackend(SIZE, read_only=read_only),
            (IBlockBackend, IZeroCopyBackend, IDataSyncBackend, IProcessShareableBackend),
        )

    def test_file(self) -> None:
        """
        A file disk is one descriptor: zero-copy, ``fdatasync``, handed to
        workers; and it names its disk (filesystem and inode).
        """
        path = _make_image(self)
        self.check(
            lambda read_only: FileBackend.open(path, read_only=read_only), _NAMED_FD_BACKEND
        )

    def test_block_device(self) -> None:
        """A block device (a loop device, root only) provides what a file does."""
        device = _losetup(self, _make_image(self))
        self.check(
            lambda read_only: BlockDeviceBackend.open(device, read_only=read_only),
            _NAMED_FD_BACKEND,
        )

    def test_shared_memory(self) -> None:
        """
        A shared memory disk is a ``memfd``: what a file provides but an
        identity, and no ``share``.
        """
        self.check(
            lambda read_only: SharedMemoryBackend.create(SIZE, read_only=read_only), _FD_BACKEND
        )


class FactoryInterfacesTests(_ProvidesMixin, SynchronousTestCase):
    """``file:`` and ``block:`` declare direct I/O; ``memory:`` does not."""

    def test_memory(self) -> None:
        self.assertProvidesExactly(MemoryBackendFactory(), (IBackendFactory,))

    def test_file(self) -> None:
        self.assertProvidesExactly(FileBackendFactory(), (IBackendFactory, IDirectIOFactory))

    def test_block(self) -> None:
        self.assertProvidesExactly(
            BlockDeviceBackendFactory(), (IBackendFactory, IDirectIOFactory)
        )


class ACLStoreInterfacesTests(_ProvidesMixin, SynchronousTestCase):
    """Each built-in ACL store provides ``IACLStore`` and its own ability."""

    def test_memory(self) -> None:
        """The in-memory store has no ability beyond ``IACLStore``."""
        self.assertProvidesExactly(MemoryACLStore(), (IACLStore,))

    def test_file(self) -> None:
        """The file-backed store can persist a whole state (``replace_state``)."""
        store = FileACLStore.open(Path(self.mktemp()), 0, 1)
        self.assertProvidesExactly(store, (IACLStore, IStatePersister))

    def test_shared(self) -> None:
        """The store in shared memory changes its state in transactions."""
        state = SharedState.create(1)
        self.addCleanup(state.close)
        self.assertProvidesExactly(state.store(0), (IACLStore, ITransactionalACLStore))
