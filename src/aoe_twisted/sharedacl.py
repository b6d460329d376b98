# -*- test-case-name: tests.test_sharedacl -*-
"""
Target state shared by worker processes: an ``IACLStore`` in shared memory.

With ``--workers N`` every worker serves every target, so a reservation an
initiator makes through one worker must bind the frames that reach the
others, at once.  ``SharedState`` is one ``memfd`` the workers all map (the
parent creates it and passes the descriptor), with one fixed region per
target::

    0   generation   u64, bumped after every change
    8   length       u32, of the encoded state
    16  state        config string, mask list and reserve list (``_encode``)

Reading is the hot path (every ATA frame checks the mask and reserve
lists), so a ``SharedACLStore`` keeps the decoded state and compares one
shared integer, the generation, before each read; only when it moved does
it reload, under a shared ``lockf`` lock on the region, so it never sees a
half-written state.  A change is a transaction (``transaction()``): an
exclusive lock on the region, a reload, the target's decision on the fresh
state, then the write and the new generation, so two workers editing the
mask list at once cannot lose either edit.  ``lockf`` (POSIX record locks)
is per process, which is what makes it work between workers that share the
descriptor; ``flock`` would not.

With ``--state-dir`` each store also persists every change through its
``persist`` callable (the ``replace_state`` of an ``IStatePersister``, such
as ``FileACLStore``) before the shared state changes, so what the workers
see is always what is on disk.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from zope.interface import implementer

from aoe_twisted.core.acl import MASK_LIST_CEILING, RESERVE_LIST_LIMIT
from aoe_twisted.core.wire import MAX_CONFIG_STRING
from aoe_twisted.interfaces import ITransactionalACLStore

__all__ = ["REGION_SIZE", "SharedACLStore", "SharedState"]

_HEADER = struct.Struct("=QI4x")
_COUNT = struct.Struct("=H")
#: The largest encoded state: three counts, a full config string, two full MAC lists.
_MAX_STATE = 3 * _COUNT.size + MAX_CONFIG_STRING + 2 * 6 * 255
REGION_SIZE = 8192
"""Bytes of shared memory per target: the header and room for the largest state."""
assert _HEADER.size + _MAX_STATE <= REGION_SIZE

Persist = Callable[[bytes, tuple[bytes, ...], tuple[bytes, ...]], None]


def _encode(config: bytes, masks: tuple[bytes, ...], reserves: tuple[bytes, ...]) -> bytes:
    """Encode a state: each part a 16-bit count (bytes or MACs), then its bytes."""
    return b"".join(
        [
            _COUNT.pack(len(config)),
            config,
            _COUNT.pack(len(masks)),
            *masks,
            _COUNT.pack(len(reserves)),
            *reserves,
        ]
    )


def _decode(data: bytes) -> tuple[bytes, tuple[bytes, ...], tuple[bytes, ...]]:
    """Decode what ``_encode`` wrote."""
    (length,) = _COUNT.unpack_from(data, 0)
    at = _COUNT.size
    config = bytes(data[at : at + length])
    at += length
    lists = []
    for _ in range(2):
        (count,) = _COUNT.unpack_from(data, at)
        at += _COUNT.size
        lists.append(tuple(bytes(data[at + 6 * i : at + 6 * i + 6]) for i in range(count)))
        at += 6 * count
    return config, lists[0], lists[1]


class SharedState:
    """
    The shared memory of ``targets`` targets' stores: a ``memfd`` and its mapping.

    ``create`` makes it (the parent), ``adopt`` maps one passed by
    descriptor (a worker); ``fileno()`` is what to pass.
    """

    def __init__(self, fd: int, targets: int) -> None:
        self._fd = fd
        self.targets = targets
        self._map = mmap.mmap(fd, REGION_SIZE * targets)
        self._stores: list[SharedACLStore] = []

    @classmethod
    def create(cls, targets: int) -> SharedState:
        """Make zeroed shared memory for ``targets`` stores (every state empty)."""
        fd = os.memfd_create("aoe-twisted-state", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, REGION_SIZE * targets)
            return cls(fd, targets)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int, targets: int) -> SharedState:
        """Map the shared memory of ``targets`` stores that descriptor ``fd`` refers to."""
        return cls(fd, targets)

    def fileno(self) -> int:
        """The ``memfd``, for passing to a worker."""
        return self._fd

    def store(self, index: int, persist: Persist | None = None) -> SharedACLStore:
        """Return the store of target number ``index`` (0-based), persisting through ``persist``."""
        if not 0 <= index < self.targets:
            raise IndexError(f"no target {index} in shared state of {self.targets}")
        store = SharedACLStore(self._map, self._fd, index * REGION_SIZE, persist)
        self._stores.append(store)
        return store

    def index_of(self, store: SharedACLStore) -> int:
        """Return the region number of ``store`` (one this state gave out), for a worker."""
        return store._base // REGION_SIZE

    def free_index(self) -> int:
        """
        Return the number of a region no store uses, for a target added while serving.

        ``IndexError`` if every region is used: the state was made for
        fewer targets (``create``'s ``targets``, which ``--workers`` sizes
        with room to spare).
        """
        used = {store._base // REGION_SIZE for store in self._stores if not store.released}
        for index in range(self.targets):
            if index not in used:
                return index
        raise IndexError(f"no free region in shared state of {self.targets} targets")

    def close(self) -> None:
        """Unmap and close (the stores it gave out stop working)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            for store in self._stores:
                store._generation_view.release()
            self._map.close()
            os.close(fd)


@implementer(ITransactionalACLStore)
class SharedACLStore:
    """
    One target's ``ITransactionalACLStore`` in a ``SharedState`` region at byte ``base``.

    Reads are local unless another worker changed the state; ``set_*`` and
    ``transaction()`` write through to the shared region (and ``persist``).
    """

    def __init__(self, shared: mmap.mmap, fd: int, base: int, persist: Persist | None) -> None:
        self._map = shared
        self._fd = fd
        self._base = base
        self._persist = persist
        self._generation_view = memoryview(shared)[base : base + 8].cast("Q")
        self._generation = -1
        self._config = b""
        self._masks: tuple[bytes, ...] = ()
        self._reserves: tuple[bytes, ...] = ()
        self._depth = 0
        #: Set once its target is removed: its region may be given to another target.
        self.released = False

    # -- reading ------------------------------------------------------------

    @property
    def config_string(self) -> bytes:
        """The config string, as the last change by any worker left it."""
        if self._generation_view[0] != self._generation:
            self._reload()
        return self._config

    @property
    def mask_list(self) -> tuple[bytes, ...]:
        """The MAC mask list, as the last change by any worker left it."""
        if self._generation_view[0] != self._generation:
            self._reload()
        return self._masks

    @property
    def reserve_list(self) -> tuple[bytes, ...]:
        """The reserve list, as the last change by any worker left it."""
        if self._generation_view[0] != self._generation:
            self._reload()
        return self._reserves

    def _lock(self, kind: int) -> None:
        """Take a ``lockf`` lock of ``kind`` on this store's region (blocking)."""
        fcntl.lockf(self._fd, kind, REGION_SIZE, self._base, os.SEEK_SET)

    def _reload(self) -> None:
        """Read the state under a shared lock (a writer holds an exclusive one)."""
        if self._depth:
            # Inside our own transaction the region is ours and up to date.
            return
        self._lock(fcntl.LOCK_SH)
        try:
            self._read()
        finally:
            self._lock(fcntl.LOCK_UN)

    def _read(self) -> None:
        """Decode the region (the caller holds a lock on it)."""
        generation, length = _HEADER.unpack_from(self._map, self._base)
        start = self._base + _HEADER.size
        self._config, self._masks, self._reserves = (
            _decode(self._map[start : start + length]) if length else (b"", (), ())
        )
        self._generation = generation

    # -- changing -----------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """
        Hold the region exclusively while the body reads and changes the state.

        Every change made inside (``set_*``) is published when the body ends;
        workers see all of them or none.  Nested use joins the outer one.
        """
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._lock(fcntl.LOCK_EX)
        try:
            self._read()
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
        finally:
            self._lock(fcntl.LOCK_UN)

    def _change(
        self,
        config: bytes,
        masks: tuple[bytes, ...],
        reserves: tuple[bytes, ...],
        persist: bool = True,
    ) -> None:
        """
        Persist, then publish a new state (within a transaction, which the caller holds).

        A failed ``persist`` raises before anything is published, so the
        change is neither seen by any worker nor confirmed to the initiator.
        """
        if persist and self._persist is not None:
            self._persist(config, masks, reserves)
        data = _encode(config, masks, reserves)
        start = self._base + _HEADER.size
        self._map[start : start + len(data)] = data
        generation = self._generation + 1
        # Readers that see the new generation wait for our lock before reading.
        _HEADER.pack_into(self._map, self._base, generation, len(data))
        self._config, self._masks, self._reserves = config, masks, reserves
        self._generation = generation

    def publish(
        self, config: bytes, masks: Iterable[bytes] = (), reserves: Iterable[bytes] = ()
    ) -> None:
        """Make a state that is already stored (or needs no storing) every worker's, unpersisted."""
        with self.transaction():
            self._change(
                bytes(config), tuple(bytes(m) for m in masks), tuple(bytes(m) for m in reserves),
                persist=False,
            )

    def _set(
        self,
        config: bytes | None = None,
        masks: Iterable[bytes] | None = None,
        reserves: Iterable[bytes] | None = None,
    ) -> None:
        """Replace the parts given, in a transaction of its own unless one is open."""
        with self.transaction():
            self._change(
                self._config if config is None else bytes(config),
                self._masks if masks is None else tuple(bytes(m) for m in masks),
                self._reserves if reserves is None else tuple(bytes(m) for m in reserves),
            )

    def set_config_string(self, value: bytes) -> None:
        """Replace the config string for every worker."""
        if len(value) > MAX_CONFIG_STRING:
            raise ValueError(f"config string longer than {MAX_CONFIG_STRING} bytes")
        self._set(config=value)

    def set_mask_list(self, macs: tuple[bytes, ...]) -> None:
        """Replace the MAC mask list for every worker."""
        if len(macs) > MASK_LIST_CEILING:
            raise ValueError(f"a mask list holds at most {MASK_LIST_CEILING} MAC addresses")
        self._set(masks=macs)

    def set_reserve_list(self, macs: tuple[bytes, ...]) -> None:
        """Replace the reserve list for every worker."""
        if len(macs) > RESERVE_LIST_LIMIT:
            raise ValueError(f"a reserve list holds at most {RESERVE_LIST_LIMIT} MAC addresses")
        self._set(reserves=macs)

    def __repr__(self) -> str:
        return f"<SharedACLStore region at {self._base}, generation {self._generation}>"
