# -*- test-case-name: tests.test_interfaces -*-
"""The zope interfaces that the target dispatches through.

An AoE target is a disk (``IBlockBackend``), an optional source of ATA
IDENTIFY data (``IIdentifier``) and the per-target state the protocol lets
initiators change (``IACLStore``).  Backends are found as Twisted plugins
that provide ``IBackendFactory``.

The sans-IO core (``aoe_twisted.core``) never calls a backend itself: it
asks for a read, a write or a sync as an ``aoe_twisted.core.operations``
value, and the Twisted layer carries it out on the backend and hands the
result back.  Every ``IBlockBackend`` method is synchronous, so the built-in
backends are carried out inline; the reply is built only after the call
returned.  That is what makes "a write is acknowledged only after it reached
the backend" hold.

Optional abilities are interfaces of their own, each extending the one it
refines, declared with ``@implementer`` and checked once with
``providedBy`` when the object is accepted (never per frame):

- ``IZeroCopyBackend``: reads straight into the reply's buffer, writes from
  the request's buffer (the data path of the ``PACKET_MMAP`` rings);
- ``ILaneBackend``: the disk's bytes are in a file descriptor or a buffer
  of this process, which the compiled data lane (``aoe_twisted.lane``)
  reads and writes without calling Python;
- ``IDataSyncBackend``: a cheaper sync than ``flush`` for ``--sync``;
- ``IDescriptorBackend``: the disk is one open file descriptor, which
  ``--workers`` hands to its worker processes;
- ``IProcessShareableBackend``: a disk that can move somewhere other
  processes reach (``memory:`` into a memfd) before ``--workers`` starts;
- ``IDiskIdentity``: the disk can name itself, the same wherever and whenever
  it is served: IDENTIFY's serial number and world-wide name come from it,
  and a second server of the same disk is a second path, not a duplicate;
- ``IDirectIOFactory``: a factory that can bypass the page cache (``--direct``);
- ``IAsyncBlockBackend`` is not an ability but the other kind of disk: one
  whose operations return ``Deferred`` s (``nbd:``, ``rbd:``, ``thread:``);
- ``ITransactionalACLStore``: a store that several processes change together;
- ``IStatePersister``: a store that can persist another store's whole state.

A plugin that provides none of them works exactly as one that does, only
without what each brings.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface

__all__ = [
    "IACLStore",
    "IAsyncBlockBackend",
    "IBackendFactory",
    "IBlockBackend",
    "IDataSyncBackend",
    "IDescriptorBackend",
    "IDirectIOFactory",
    "IDiskIdentity",
    "IIdentifier",
    "ILaneBackend",
    "IProcessShareableBackend",
    "IStatePersister",
    "ITransactionalACLStore",
    "IZeroCopyBackend",
]


class IBlockBackend(Interface):
    """
    A disk of 512-byte sectors, addressed in bytes.

    The core checks every range against ``size`` before it calls ``read`` or
    ``write``, and never calls ``write`` when ``read_only`` is true.
    """

    size = Attribute("The disk's size in bytes (int), a whole multiple of 512.")
    read_only = Attribute("True if the disk refuses writes (bool).")

    def read(offset: int, length: int) -> bytes:
        """
        Return exactly ``length`` bytes starting at byte ``offset``.

        Raise ``OSError`` if the bytes cannot be read; the target then answers
        with an ATA error instead of data.
        """

    def write(offset: int, data: bytes) -> None:
        """
        Write all of ``data`` at byte ``offset``.

        When this returns the data has reached the backend (for a file: the
        kernel's page cache), so the target may acknowledge it.  Raise
        ``OSError`` on failure.
        """

    def flush() -> None:
        """
        Make every completed write durable (``fsync`` for files and devices).

        Raise ``OSError`` on failure.  ``--sync`` calls this once per group
        of writes before acknowledging them, unless the backend provides
        ``IDataSyncBackend``.
        """

    def close() -> None:
        """Release the backend's resources; no call follows this one."""


class IZeroCopyBackend(IBlockBackend):
    """
    A backend that reads into, and writes from, buffers it does not own.

    The fast path gives such a backend a ``memoryview`` of the reply's
    transmit ring slot to read into, and a ``memoryview`` of the request's
    receive ring slot to write from; both slots are reused as soon as the
    call returns.  Provide it only if both promises below hold: a backend
    that queues the data it is given (to write it later, or from another
    thread) must not, or it would write whatever the next frame put in the
    slot.
    """

    def read_into(offset: int, view: memoryview) -> int:
        """
        Copy ``len(view)`` bytes from byte ``offset`` into ``view``; return how many.

        Raise ``OSError`` as ``read`` does.  Keep no reference to ``view``.
        """

    def write(offset: int, data: bytes | memoryview) -> None:
        """
        As ``IBlockBackend.write``, for any bytes-like ``data``.

        The promise this interface adds: when ``write`` returns (or raises)
        the backend holds no reference to ``data`` and has copied what it
        needs; ``data`` may be a view of a ring slot that is reused at once.
        """


class ILaneBackend(IZeroCopyBackend):
    """
    A disk the compiled data lane can read and write itself, without calling Python.

    The lane (``aoe_twisted.lane``) answers plain reads and writes in C:
    ``pread``/``pwrite`` between the ring slots and a descriptor, or a copy
    to and from a buffer.  A backend that provides this says where its
    bytes are; one that does not is served by the Python path, as always.
    The built-in ``file:``, ``block:`` and ``memory:`` disks provide it, and
    so does a slice (``offset``/``length``) of one.

    The promise is the one ``read``/``write`` keep: reading the range
    ``storage.offset + offset`` of ``storage.fd`` (with ``pread``, whole
    aligned blocks if ``storage.direct``), or of ``storage.buffer``, gives
    what ``read(offset, length)`` would, and writing there is what
    ``write`` does, with nothing else to do (no cache of the backend's own,
    no bookkeeping in Python); ``flush``/``sync_data`` then make it durable.
    """

    def lane_storage() -> Any:
        """
        Return where the disk's bytes are, as an ``aoe_twisted.lane.LaneStorage``.

        Asked when the target is served (not per frame); the descriptor or
        buffer must stay valid as long as the backend is open.
        """


class IDataSyncBackend(IBlockBackend):
    """A backend with a cheaper way than ``flush`` to make completed writes durable."""

    def sync_data() -> None:
        """
        Make every completed write durable, as cheaply as the backend can.

        The same promise as ``flush`` (``fdatasync`` where ``flush`` is
        ``fsync`` for the built-in file and block backends: the data and what
        reading it back needs, not the modification time).  ``--sync`` calls
        it once per group of writes before acknowledging them.  Raise
        ``OSError`` on failure; the writes of the group are then refused.
        """


class IDescriptorBackend(IBlockBackend):
    """
    A disk kept in one open file descriptor (a file, a block device, a memfd).

    ``--workers`` passes the descriptor to each worker process, which builds
    an equivalent backend on it with ``adopt``: every process then reads and
    writes the same disk, with no copy and no second ``open``.
    """

    def fileno() -> int:
        """Return the descriptor the disk is read and written through."""

    def handoff() -> dict[str, Any]:
        """
        Return what another process needs, besides the descriptor, to adopt this disk.

        A JSON-serialisable dict; ``adopt`` of the same class takes it back.
        """

    def adopt(fd: int, handoff: dict[str, Any]) -> IDescriptorBackend:
        """
        Build an equivalent backend on ``fd`` (inherited from the process that
        called ``handoff``).  A class method: it is called on the class.
        """


class IProcessShareableBackend(IBlockBackend):
    """
    A disk that lives in this process's memory but can move where other processes reach it.

    ``--workers`` calls ``share`` once, before the server starts, and serves
    what it returns (an ``IDescriptorBackend``) in every process.
    """

    def share() -> IDescriptorBackend:
        """
        Return a backend with the same size, contents and read-only flag in
        memory other processes can map, and close this one.
        """


class IDiskIdentity(Interface):
    """
    A disk that can name itself: one identity for this disk, wherever and whenever it is served.

    The target turns the identity into IDENTIFY's serial number (words
    10-19) and world-wide name (words 108-111) with
    ``aoe_twisted.core.identify.disk_serial`` and ``disk_wwn``.  Two servers
    that present the same identity for one shelf.slot are two paths to one
    disk (AoE multipath); two that present different identities, or none,
    are a duplicate address, which is refused.  So the identity is a
    promise, in both directions:

    - the same disk gets the same identity in every process, on every host
      and after every restart (a file's filesystem and inode, a LUN's WWN, a
      network disk's id such as an RBD image id with its cluster's fsid);
    - two backends get the same identity only if every write made through
      one is seen at once by a read through the other.  A backend with a
      cache of its own that other hosts cannot see (the page cache of a
      block device opened without ``O_DIRECT``, librbd's write-back cache)
      must make its identity local to the host
      (``aoe_twisted.backends.identity.host_local``).

    A backend that does not provide this keeps the serial ``shelf.slot``
    and no world-wide name, and is never taken for a second path.
    """

    def disk_identity() -> bytes | None:
        """
        Return this disk's identity, or ``None`` if it has none that lasts.

        Opaque bytes of any length (the target hashes them), computed once
        when the backend is opened, not per call: ``b"rbd fsid=... image=..."``.
        ``None`` gives the same page as a backend without the interface.
        """


class IAsyncBlockBackend(Interface):
    """
    A disk whose operations complete later: each returns a ``Deferred`` (network storage).

    Beside ``IBlockBackend``, not an extension of it: a backend provides one
    of the two.  The server starts an operation and goes on serving; when
    the ``Deferred`` fires (in the reactor thread) the request is answered.
    The rules that hold for synchronous disks hold here:

    - a write is acknowledged only once its ``Deferred`` has fired: the
      backend has the data (as a disk does: durable after ``flush``);
    - a failure is an ``OSError`` (with its errno: ``EIO``, ``ENOTCONN``,
      ``ETIMEDOUT``...), answered with an ATA error (``UNC`` for a read,
      ``ABRT`` for a write or a flush), never acknowledged;
    - many operations may be in flight (an initiator's window on each
      target) and they may complete in any order: the server guarantees no
      ordering between requests in flight, as a disk does not;
    - an operation that does not complete within the server's deadline
      (``--backend-timeout``, default 30 s) is answered with an ATA error and
      its ``Deferred`` cancelled: the backend should release what it holds
      for it then, or when it completes.

    The compiled lane and zero copy serve synchronous disks only; an
    asynchronous disk's plain reads and writes are decoded by the fast
    path (``fastpath.fast_pending``) and started through ``read``/``write``
    as the general path would start them.  ``--sync`` group commit calls
    ``flush`` once per disk per group of writes.
    """

    size = Attribute("The disk's size in bytes (int), a whole multiple of 512.")
    read_only = Attribute("True if the disk refuses writes (bool).")

    def read(offset: int, length: int) -> Any:
        """Return a ``Deferred`` firing with exactly ``length`` bytes at ``offset``."""

    def write(offset: int, data: bytes) -> Any:
        """Return a ``Deferred`` firing (with ``None``) once the backend has ``data``."""

    def flush() -> Any:
        """Return a ``Deferred`` firing once every completed write is durable."""

    def close() -> Any:
        """Release the disk; may return a ``Deferred`` that fires once it is released."""


class IIdentifier(Interface):
    """A source of ATA IDENTIFY DEVICE data for one disk."""

    def identify() -> bytes:
        """Return the 512-byte IDENTIFY DEVICE page, words little-endian."""


class IACLStore(Interface):
    """
    The state an initiator may change on a target: AoEr11 sections 3.2-3.4.

    Reading is cheap.  Each ``set_*`` call returns only once the new value is
    stored as durably as the store promises (a file-backed store fsyncs), so
    the target can confirm the change in its reply.  MAC addresses are 6-byte
    ``bytes``.

    A store that several processes share provides ``ITransactionalACLStore``
    as well.  A ``set_*`` that raises ``OSError`` leaves the state as it was;
    the target then answers AoE error ``DEVICE_UNAVAILABLE`` and the server
    logs the error.
    """

    config_string = Attribute("The config string (bytes, at most 1024).")
    mask_list = Attribute(
        "The MAC mask list (tuple of 6-byte bytes); empty means every host may "
        "talk to the target."
    )
    reserve_list = Attribute(
        "The reserve list (tuple of 6-byte bytes); empty means unreserved."
    )

    def set_config_string(value: bytes) -> None:
        """Replace the config string."""

    def set_mask_list(macs: tuple[bytes, ...]) -> None:
        """Replace the MAC mask list."""

    def set_reserve_list(macs: tuple[bytes, ...]) -> None:
        """Replace the reserve list."""


class ITransactionalACLStore(IACLStore):
    """
    A store that several processes share and change (``aoe_twisted.sharedacl``).

    The target reads, decides and changes the state of each config, mask
    and reserve request inside ``transaction()``, so that no other process
    changes it in between.
    """

    def transaction() -> AbstractContextManager[None]:
        """Return a context manager holding the store's lock and its latest state."""


class IStatePersister(IACLStore):
    """A store that can write a whole state at once (``aoe_twisted.statefile.FileACLStore``)."""

    def replace_state(
        config_string: bytes, mask_list: tuple[bytes, ...], reserve_list: tuple[bytes, ...]
    ) -> None:
        """
        Replace all three parts of the state, durably, in one write.

        What a store shared between processes persists through, since any of
        them may have changed any part.  Raise ``OSError`` on failure.
        """


class IBackendFactory(IPlugin):
    """
    A plugin that opens one kind of backend from a ``SCHEME:SPEC`` string.

    Ship a module-level instance in a ``twisted/plugins/`` module; the server
    finds it with ``twisted.plugin.getPlugins(IBackendFactory)``.
    """

    scheme = Attribute(
        "The name before the colon in --backend (str, unique, lower case, "
        "letters, digits and '-'), e.g. 'file'."
    )
    description = Attribute("One line saying what the backend is (str).")
    spec_format = Attribute("What follows the colon, for --help (str), e.g. 'PATH'.")

    def open(spec: str, read_only: bool = False) -> IBlockBackend:
        """
        Open the backend that ``spec`` (the text after the colon) names.

        With ``read_only`` the backend must refuse writes.  Raise
        ``aoe_twisted.errors.BackendSpecError`` with a one-line message that
        names the problem if ``spec`` is wrong or the backend cannot be opened.
        """


class IDirectIOFactory(IBackendFactory):
    """
    A backend factory that can bypass the page cache (``--direct``).

    ``open_backend`` refuses ``--direct`` for a factory that does not
    provide this.
    """

    def open(spec: str, read_only: bool = False, direct: bool = False) -> IBlockBackend:
        """
        As ``IBackendFactory.open``; with ``direct`` the backend does its I/O
        without the page cache (``O_DIRECT``), or the factory raises
        ``BackendSpecError`` saying why it cannot.
        """
