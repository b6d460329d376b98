# -*- test-case-name: tests.test_ata -*-
"""
The ATA engine: one AoE Issue ATA Command request in, its reply out.

``plan_ata`` decides what a request needs without touching the disk: its
reply at once, or a ``BackendIO`` (``aoe_twisted.core.operations``) to carry
out first, whose result ``finish_ata`` turns into the reply.  ``serve_ata``
is the seed's ``ServeATA``: both steps with the operation carried out
synchronously in between (``operations.perform``).
It serves what AoE initiators send (the Linux driver only IDENTIFY DEVICE and
READ/WRITE SECTORS (EXT); iPXE and others also FLUSH CACHE and CHECK POWER
MODE) and aborts everything else.

ATA failures are ATA status, not AoE errors: the reply carries ``ERR|DRDY`` in
its status register and ``ABRT``, ``IDNF`` or ``UNC`` in its error register,
with the AoE error flag clear, as a real disk would answer.  Every check runs
before the backend is touched, so a refused command changes no byte of the disk.

This runs once per Ethernet frame that the fast path does not answer: the
opcode picks a handler from a dict, the checks are integer comparisons, a
read costs the backend's one ``bytes`` and a write passes the request's data
on without copying it (unless Ethernet padding has to be cut off).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial

from aoe_twisted.core.identify import IDENTIFY_SIZE, DefaultIdentifier
from aoe_twisted.core.operations import BackendIO, IOKind, perform
from aoe_twisted.core.wire import (
    SECTOR_SIZE,
    VERSION,
    ATAArg,
    ATACmdStatus,
    ATAError,
    Command,
    Header,
)
from aoe_twisted.interfaces import IBlockBackend, IIdentifier

__all__ = ["finish_ata", "plan_ata", "serve_ata"]

_DRDY = int(ATACmdStatus.READY_STATUS)
_ERR_DRDY = int(ATACmdStatus.ERR_STATUS) | _DRDY
_ABRT = int(ATAError.ABRT)
_IDNF = int(ATAError.IDNF)
_UNC = int(ATAError.UNC)

_MASK28 = (1 << 28) - 1
_MASK48 = (1 << 48) - 1
#: CHECK POWER MODE's answer in the sector count register: active or idle.
_POWER_ACTIVE = 0xFF


def _reply(
    request: ATAArg, status: int, error: int, count: int, lba: int, data: bytes = b""
) -> ATAArg:
    """Return a reply argument echoing the request's AFlags, with these registers and data."""
    return ATAArg(
        request.flag_lba48_extended,
        request.flag_ata_device_head_register,
        request.flag_asynchronous,
        request.flag_write,
        error,
        count,
        status,
        lba,
        data,
    )


def aborted(request: ATAArg) -> ATAArg:
    """Return the ``ERR|DRDY``/``ABRT`` answer to ``request``: the command was not carried out."""
    return _failed(request, _ABRT)


def _failed(request: ATAArg, error: int) -> ATAArg:
    """Return ``ERR|DRDY`` with ``error``, the request's count and LBA left as they were."""
    return _reply(request, _ERR_DRDY, error, request.sector_count, request.lba)


def _done(request: ATAArg, data: bytes = b"") -> ATAArg:
    """
    Return the success of a transfer, with the sectors read if it was a read.

    The sector count is what remains to transfer, 0, and the LBA is the
    request's: that is what vblade puts on the wire (it advances the LBA only
    in its own copy of the registers).  The Linux initiator ignores both.
    """
    return _reply(request, _DRDY, 0, 0, request.lba, data)


def _transfer(
    write: bool,
    extended: bool,
    request: ATAArg,
    backend: IBlockBackend,
    identifier: IIdentifier | None,
    max_sectors: int,
) -> ATAArg | BackendIO:
    """
    READ or WRITE SECTORS (``extended``: EXT) of the LBA the request holds.

    The plain commands address 28 bits whatever the E flag says; the EXT
    commands address 48 bits when the E flag says the registers hold them.
    Return the ``BackendIO`` the transfer needs, or the ``ERR|DRDY`` reply if
    a check refuses it.  Every check runs before any I/O is asked for.
    """
    count = request.sector_count
    # A count of 0 means 256 (65536 for EXT) in ATA: more than any target advertises.
    if request.flag_write != write or not 0 < count <= max_sectors:
        return _failed(request, _ABRT)
    length = count * SECTOR_SIZE
    if write:
        if backend.read_only:
            return _failed(request, _ABRT)
        data = request.data
        if len(data) < length:
            return _failed(request, _ABRT)
    lba = request.lba & (_MASK48 if extended and request.flag_lba48_extended else _MASK28)
    if lba + count > backend.size // SECTOR_SIZE:
        return _failed(request, _IDNF)
    if not write:
        return BackendIO(IOKind.READ, lba * SECTOR_SIZE, length)
    if len(data) != length:
        # Ethernet padding after the sectors: keep it off the disk.
        data = data[:length]
    return BackendIO(IOKind.WRITE, lba * SECTOR_SIZE, length, data)


@lru_cache(maxsize=16)
def _default_page(sectors: int) -> bytes:
    """The default IDENTIFY page of a disk of ``sectors`` sectors, built once per size."""
    return DefaultIdentifier(sectors).identify()


def _identify(
    request: ATAArg, backend: IBlockBackend, identifier: IIdentifier | None, max_sectors: int
) -> ATAArg:
    """IDENTIFY DEVICE (0xEC): the identifier's page, or the default one for the disk's size."""
    try:
        if identifier is None:
            page = _default_page(backend.size // SECTOR_SIZE)
        else:
            page = identifier.identify()
    except OSError:
        return _failed(request, _ABRT)
    if len(page) != IDENTIFY_SIZE:
        # Linux drops a short page as a runt and would wait for nothing.
        return _failed(request, _ABRT)
    return _done(request, page)


_FLUSH_IO = BackendIO(IOKind.FLUSH)


def _flush(
    request: ATAArg, backend: IBlockBackend, identifier: IIdentifier | None, max_sectors: int
) -> BackendIO:
    """FLUSH CACHE (EXT) (0xE7, 0xEA): make every acknowledged write durable."""
    return _FLUSH_IO


def _check_power(
    request: ATAArg, backend: IBlockBackend, identifier: IIdentifier | None, max_sectors: int
) -> ATAArg:
    """CHECK POWER MODE (0xE5): always active (0xFF in the sector count)."""
    return _reply(request, _DRDY, 0, _POWER_ACTIVE, request.lba)


_Handler = Callable[[ATAArg, IBlockBackend, "IIdentifier | None", int], "ATAArg | BackendIO"]

_HANDLERS: dict[int, _Handler] = {
    # (write, extended) bound positionally: the cheapest partial to call.
    int(ATACmdStatus.READ_28BIT): partial(_transfer, False, False),
    int(ATACmdStatus.READ_48BIT): partial(_transfer, False, True),
    int(ATACmdStatus.WRITE_28BIT): partial(_transfer, True, False),
    int(ATACmdStatus.WRITE_48BIT): partial(_transfer, True, True),
    int(ATACmdStatus.IDENTIFY): _identify,
    int(ATACmdStatus.FLUSH): _flush,
    int(ATACmdStatus.FLUSH_EXT): _flush,
    int(ATACmdStatus.CHECK_POWER): _check_power,
}


def _unknown(
    request: ATAArg, backend: IBlockBackend, identifier: IIdentifier | None, max_sectors: int
) -> ATAArg:
    """Any other ATA command: aborted, as a disk aborts what it does not implement."""
    return _failed(request, _ABRT)


def plan_ata(
    request: ATAArg,
    backend: IBlockBackend,
    identifier: IIdentifier | None = None,
    max_sectors: int = 255,
) -> ATAArg | BackendIO:
    """
    Decide what the ATA command ``request`` needs: its reply now, or a disk operation first.

    An ``ATAArg`` is the whole answer (every refusal, IDENTIFY, CHECK POWER
    MODE); a ``BackendIO`` is the read, write or flush to carry out, whose
    result ``finish_ata`` turns into the reply.  Only ``backend.size`` and
    ``backend.read_only`` are looked at: no I/O happens here.
    """
    return _HANDLERS.get(request.cmd_status, _unknown)(request, backend, identifier, max_sectors)


def finish_ata(
    request: ATAArg, io: BackendIO, result: bytes | None, error: OSError | None = None
) -> ATAArg:
    """
    Return the reply to ``request`` once ``io`` (from ``plan_ata``) was carried out.

    ``result`` is what the operation gave (the bytes read, or ``None``);
    ``error`` the ``OSError`` it raised instead.  A failed or short read is
    ``UNC``; a failed write or flush is ``ABRT``: never acknowledged.
    """
    kind = io.kind
    if kind is IOKind.READ:
        if error is not None or result is None or len(result) != io.length:
            # The initiator fails a short read reply anyway; say why.
            return _failed(request, _UNC)
        return _done(request, result)
    if error is not None:
        return _failed(request, _ABRT)
    if kind is IOKind.WRITE:
        return _done(request)
    return _reply(request, _DRDY, 0, request.sector_count, request.lba)


def serve_ata(
    request: Header,
    backend: IBlockBackend,
    identifier: IIdentifier | None = None,
    *,
    max_sectors: int = 255,
    major: int | None = None,
    minor: int | None = None,
) -> Header:
    """
    Perform the ATA command ``request`` carries on ``backend`` and return the reply.

    The reply is an AoE response (version 1, response flag, no AoE error) with
    the request's command and tag, ``major``.``minor`` (by default the
    request's), and an ``ATAArg`` echoing the request's AFlags whose status is
    ``DRDY`` on success and ``ERR|DRDY`` on failure, with the error register
    set to:

    - ``ABRT`` for an unknown command, a read with the W flag or a write
      without it, a sector count of 0 or above ``max_sectors``, a write whose
      data is shorter than its sectors, a write to a read-only backend, a
      failed write or flush, or an identifier that fails;
    - ``IDNF`` for sectors past the end of the disk;
    - ``UNC`` for a failed read.

    READ/WRITE SECTORS (0x20, 0x30) address 28 bits: the Linux initiator puts
    0xE0 into the fourth LBA byte.  The EXT commands (0x24, 0x34) address 48
    bits when the E flag is set, as the Linux initiator sends them, and 28 bits
    when it is clear.  Write data beyond the sectors (Ethernet padding) is not
    written.  IDENTIFY answers ``identifier``'s page, or without one a
    ``DefaultIdentifier`` page built from the backend's size.

    @param max_sectors: the sector count this target advertises in its config
        replies; larger requests are aborted.
    @raise ValueError: if ``request`` is not an Issue ATA Command with an
        ``ATAArg``; the caller routes only those here.
    """
    arg = request.arg
    if request.command != Command.ISSUE_ATA_COMMAND or not isinstance(arg, ATAArg):
        raise ValueError(
            f"serve_ata needs an Issue ATA Command with an ATAArg, not command "
            f"{request.command} with {type(arg).__name__}"
        )
    reply = plan_ata(arg, backend, identifier, max_sectors)
    if isinstance(reply, BackendIO):
        try:
            result = perform(reply, backend)
        except OSError as e:
            reply = finish_ata(arg, reply, None, e)
        else:
            reply = finish_ata(arg, reply, result)
    return Header(
        VERSION,
        True,
        False,
        0,
        request.major if major is None else major,
        request.minor if minor is None else minor,
        request.command,
        request.tag,
        reply,
    )
