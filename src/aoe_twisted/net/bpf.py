# -*- test-case-name: tests.test_bpf -*-
"""
A kernel filter for a packet socket: wake only for frames addressed to the targets served.

A packet socket bound to EtherType 0x88A2 gets every AoE frame on its
interface, whoever it is for.  With two servers on one interface (or one
server and a busy initiator's traffic to another), every request for the
other's targets wakes this one, to be read and thrown away: the idle server
of a pair used as much CPU as the busy one.  vblade avoids it with a
classic BPF socket filter (``SO_ATTACH_FILTER``); so do we.

``address_filter(addresses)`` builds the program: it accepts an AoE frame
whose major (shelf, bytes 16-17) is the broadcast 0xffff, whose minor (slot,
byte 18) is the broadcast 0xff, or whose shelf.slot is one of
``addresses``, and drops everything else.  It does not look at the
response flag: another server's reply for one of our addresses must still
reach us (it is how a duplicate address on the segment is noticed).
Majors are compared one after the other, each leading to a block that
compares the minors served on that shelf, so a frame costs at most one
comparison per shelf served plus one per slot on its own shelf.  A program
may have at most ``MAX_INSTRUCTIONS`` (``BPF_MAXINSNS``) instructions and a
conditional jump reaches at most 255 instructions ahead: the program
returns from "stations" (a reject and an accept instruction) placed in its
body wherever the last one is about to be out of reach, and skips a shelf's
block of more than 255 instructions with an unconditional long jump
(``BPF_JA``).  Any 1,300 addresses fit, and nearly 4,000 when shelves
hold many slots each; a set that does not fit gets ``catch_all_filter()``,
which accepts every AoE frame (``is_catch_all`` tells the caller, to log it).

Where the filter reads
    An ``AF_PACKET``/``SOCK_RAW`` socket's filter runs in ``packet_rcv`` (or
    ``tpacket_rcv`` with rings) after the kernel has pushed the link-layer
    header back (``skb_push(skb, skb->data - skb_mac_header(skb))``), so
    absolute offsets count from the destination MAC: the EtherType is at 12,
    the AoE header at 14.  A VLAN tag is never in the bytes the filter sees:
    the kernel moves it into the packet's metadata (by the NIC's offload or
    ``skb_vlan_untag``) before delivering the frame, to the VLAN device's
    sockets; a socket bound to 0x88A2 only ever gets frames whose EtherType,
    at offset 12, is AoE.  (The tag itself would be ``SKF_AD_VLAN_TAG``; the
    filter has no use for it.)  The fanout program of ``--workers``
    (``aoe_twisted.net.fanout``) runs elsewhere, before the header is pushed
    back, which is why it reads relative to ``SKF_NET_OFF`` instead.

With ``--workers`` (``PACKET_FANOUT``)
    In ``packet_rcv_fanout`` (``net/packet/af_packet.c``) the group's
    program picks one socket (``fanout_demux_bpf``) and the frame is handed
    to that socket's receive function (``po->prot_hook.func``), which only
    then runs *that socket's* filter (``run_filter``).  The filter therefore
    never changes which socket a frame goes to; it only decides whether the
    chosen socket keeps it.  Every socket of a group must carry the same
    filter, for the set of addresses the whole group serves: a frame for a
    served target dropped by the socket the hash chose is lost (no other
    socket gets a second chance; there is no rollover).  A filter belongs to
    the socket, not to a descriptor, so the parent, which opened the group's
    sockets and keeps them, attaches it to each; a worker's port, which
    adopted its socket (``socket_fd``), leaves it alone (see
    ``AoEPort.filter_addresses``), and a worker restarted on the same socket
    finds it still there.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Iterable, Sequence
from itertools import groupby

from twisted.python.components import registerAdapter
from zope.interface import Interface, implementer

from aoe_twisted.core.wire import BROADCAST_MAJOR, BROADCAST_MINOR, ETHERTYPE
from aoe_twisted.net.packetsystem import RealPacketSystem

__all__ = [
    "MAX_INSTRUCTIONS",
    "SNAP_LENGTH",
    "ISocketFilterSystem",
    "Instruction",
    "address_filter",
    "attach_filter",
    "catch_all_filter",
    "detach_filter",
    "encode",
    "is_catch_all",
]

Instruction = tuple[int, int, int, int]
"""One classic BPF instruction, as ``struct sock_filter``: ``(code, jt, jf, k)``."""

MAX_INSTRUCTIONS = 4096
"""The most instructions a classic program may have (``BPF_MAXINSNS``)."""

SNAP_LENGTH = 0x40000
"""What an accepting program returns: the bytes of the frame to keep, more than any frame has."""

#: Opcodes (``linux/bpf_common.h``, ``linux/filter.h``).
_LD_H_ABS = 0x28  # BPF_LD | BPF_H | BPF_ABS: A = halfword at k
_LD_B_ABS = 0x30  # BPF_LD | BPF_B | BPF_ABS: A = byte at k
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K: A == k ? jt : jf
_JA = 0x05  # BPF_JMP | BPF_JA: skip k instructions
_RET_K = 0x06  # BPF_RET | BPF_K: return k
_TAX = 0x07  # BPF_MISC | BPF_TAX: X = A
_TXA = 0x87  # BPF_MISC | BPF_TXA: A = X
#: Where the fields are, counted from the destination MAC.
_ETHERTYPE_AT = 12
_MAJOR_AT = 16
_MINOR_AT = 18
#: How far a conditional jump reaches (``jt``/``jf`` are 8 bits).
_MAX_JUMP = 255
#: Shelves whose block is longer than this are skipped with ``BPF_JA``: room for the
#: stations (3 instructions each) the block may hold.
_SHORT_BLOCK = _MAX_JUMP - 6
#: ``SO_ATTACH_FILTER`` and ``SO_DETACH_FILTER`` (``asm-generic/socket.h``).
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)
#: ``struct sock_filter``.
_INSTRUCTION = struct.Struct("=HBBI")
#: Symbolic jump targets, resolved to the next station.
_ACCEPT = "accept"
_REJECT = "reject"


class _SockFprog(ctypes.Structure):
    """``struct sock_fprog``: the number of instructions and where they are."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def catch_all_filter() -> list[Instruction]:
    """Return a program accepting every AoE frame: what a set too big to compare gets."""
    return [
        (_LD_H_ABS, 0, 0, _ETHERTYPE_AT),
        (_JEQ_K, 0, 1, ETHERTYPE),
        (_RET_K, 0, 0, SNAP_LENGTH),
        (_RET_K, 0, 0, 0),
    ]


def is_catch_all(program: Sequence[Instruction]) -> bool:
    """Whether ``program`` is ``catch_all_filter()``: ``address_filter`` could not fit the set."""
    return list(program) == catch_all_filter()


class _Assembler:
    """
    Classic BPF in forward jumps, with "accept" and "reject" as jump targets.

    Instructions are added in units (``emit``) that are never split.  A jump
    to ``_ACCEPT`` or ``_REJECT`` is resolved to the next station: a
    ``BPF_JA`` over it, ``ret #0`` and ``ret #SNAP_LENGTH``, placed before a
    unit whenever the oldest unresolved jump would otherwise end up out of
    reach.
    """

    def __init__(self) -> None:
        self.code: list[list[int | str]] = []
        #: ``(instruction index, 1 for jt / 2 for jf)`` of unresolved jumps, oldest first.
        self._pending: list[tuple[int, int]] = []

    def emit(self, *unit: tuple[int, int | str, int | str, int]) -> int:
        """Append ``unit`` (after a station if need be); return its first instruction's index."""
        if self._pending:
            oldest = self._pending[0][0]
            # After this unit, a station's accept would be at len + len(unit) + 2.
            if len(self.code) + len(unit) + 2 - oldest - 1 > _MAX_JUMP:
                self.station(fallthrough=True)
        start = len(self.code)
        for index, instruction in enumerate(unit, start):
            self.code.append(list(instruction))
            for field in (1, 2):
                if isinstance(instruction[field], str):
                    self._pending.append((index, field))
        return start

    def station(self, fallthrough: bool) -> None:
        """Place a reject and an accept here; resolve every pending jump to them."""
        if fallthrough:
            self.code.append([_JA, 0, 0, 2])
        reject = len(self.code)
        self.code.append([_RET_K, 0, 0, 0])
        self.code.append([_RET_K, 0, 0, SNAP_LENGTH])
        for index, field in self._pending:
            target = reject if self.code[index][field] == _REJECT else reject + 1
            self.code[index][field] = target - index - 1
        self._pending.clear()

    def program(self) -> list[Instruction]:
        """End with a station (falling into its reject) and return the instructions."""
        self.station(fallthrough=False)
        return [(int(c), int(jt), int(jf), int(k)) for c, jt, jf, k in self.code]


def address_filter(addresses: Iterable[tuple[int, int]]) -> list[Instruction]:
    """
    Return a program accepting AoE frames for ``addresses`` (``(major, minor)`` pairs) or broadcast.

    Accepted: an Ethernet frame of EtherType 0x88A2, at least 19 bytes long,
    whose major is 0xffff, or whose minor is 0xff, or whose ``(major,
    minor)`` is in ``addresses``; it returns ``SNAP_LENGTH`` (keep it
    whole).  Anything else returns 0 (drop).  If the program would be
    longer than ``MAX_INSTRUCTIONS``, ``catch_all_filter()`` is returned
    instead (see ``is_catch_all``).

    @raise ValueError: for a major outside 0..0xffff or a minor outside 0..0xff.
    """
    wanted = set()
    for major, minor in addresses:
        if not (0 <= major <= 0xFFFF and 0 <= minor <= 0xFF):
            raise ValueError(f"not an AoE address: {major}.{minor}")
        if major != BROADCAST_MAJOR and minor != BROADCAST_MINOR:
            wanted.add((major, minor))
    asm = _Assembler()
    asm.emit((_LD_H_ABS, 0, 0, _ETHERTYPE_AT))
    asm.emit((_JEQ_K, 0, _REJECT, ETHERTYPE))
    asm.emit((_LD_B_ABS, 0, 0, _MINOR_AT))
    asm.emit((_JEQ_K, _ACCEPT, 0, BROADCAST_MINOR))
    asm.emit((_TAX, 0, 0, 0))  # X = minor
    asm.emit((_LD_H_ABS, 0, 0, _MAJOR_AT))  # A = major
    asm.emit((_JEQ_K, _ACCEPT, 0, BROADCAST_MAJOR))
    for major, pairs in groupby(sorted(wanted), key=lambda pair: pair[0]):
        minors = [minor for _, minor in pairs]
        if len(minors) + 1 <= _SHORT_BLOCK:
            header = asm.emit((_JEQ_K, 0, 0, major))  # jf: past the block, below
            skip = header
        else:
            header = asm.emit((_JEQ_K, 1, 0, major), (_JA, 0, 0, 0))  # k: past the block
            skip = header + 1
        asm.emit((_TXA, 0, 0, 0))  # A = minor
        for minor in minors[:-1]:
            asm.emit((_JEQ_K, _ACCEPT, 0, minor))
        asm.emit((_JEQ_K, _ACCEPT, _REJECT, minors[-1]))
        distance = len(asm.code) - skip - 1
        if skip == header:
            assert distance <= _MAX_JUMP, "a short shelf block grew out of a jump's reach"
            asm.code[header][2] = distance
        else:
            asm.code[skip][3] = distance
        if len(asm.code) > MAX_INSTRUCTIONS:
            return catch_all_filter()
    program = asm.program()
    if len(program) > MAX_INSTRUCTIONS:
        return catch_all_filter()
    return program


def encode(program: Sequence[Instruction]) -> bytes:
    """Return ``program`` as the kernel takes it: an array of ``struct sock_filter``."""
    return b"".join(_INSTRUCTION.pack(code, jt, jf, k) for code, jt, jf, k in program)


def attach_filter(fd: int, program: Sequence[Instruction]) -> None:
    """
    Attach ``program`` to the socket ``fd`` names (``SO_ATTACH_FILTER``), replacing any filter.

    The kernel swaps the old program for the new one at once: no frame is
    seen by neither.  Frames already queued stay queued.  The filter
    belongs to the socket, so it applies to every descriptor of it (a
    ``dup``, a worker that inherited it).

    @raise ValueError: if ``program`` is empty or longer than ``MAX_INSTRUCTIONS``.
    @raise OSError: if the kernel refuses it (``EINVAL`` for a malformed
        program, ``ENOMEM`` if it exceeds ``net.core.optmem_max``, ``ENOTSOCK``).
    """
    if not 0 < len(program) <= MAX_INSTRUCTIONS:
        raise ValueError(f"a classic BPF program has 1..{MAX_INSTRUCTIONS} instructions")
    code = encode(program)
    # The instructions must stay alive (referenced here) until setsockopt returns:
    # the kernel copies them from this address during the call.
    instructions = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(program), ctypes.addressof(instructions))
    with socket.fromfd(fd, socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(fprog))
    del instructions


def detach_filter(fd: int) -> None:
    """Remove the socket's filter (``SO_DETACH_FILTER``); a socket without one is left as it is."""
    with socket.fromfd(fd, socket.AF_PACKET, socket.SOCK_RAW) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


class ISocketFilterSystem(Interface):
    """
    A packet system (``IPacketSystem``) whose sockets can carry a kernel filter.

    ``AoEPort`` adapts its system to this interface (``ISocketFilterSystem(system,
    None)``): ``RealPacketSystem`` is adapted to the kernel's own
    ``SO_ATTACH_FILTER`` here; a system that neither provides it nor has an
    adapter (the in-memory fake) has no filter, and the port simply does
    without: it drops frames for others itself.
    """

    def attach_filter(fd: int, program: Sequence[Instruction]) -> None:  # noqa: N805
        """Attach ``program`` to socket ``fd``, replacing any filter (as ``attach_filter``)."""

    def detach_filter(fd: int) -> None:  # noqa: N805
        """Remove socket ``fd``'s filter, if it has one (as ``detach_filter``)."""


@implementer(ISocketFilterSystem)
class _KernelSocketFilters:
    """``RealPacketSystem``'s sockets are the kernel's: filter them by descriptor."""

    def __init__(self, system: RealPacketSystem) -> None:
        self.system = system

    def attach_filter(self, fd: int, program: Sequence[Instruction]) -> None:
        """``SO_ATTACH_FILTER`` on ``fd`` (see ``attach_filter``)."""
        attach_filter(fd, program)

    def detach_filter(self, fd: int) -> None:
        """``SO_DETACH_FILTER`` on ``fd`` (see ``detach_filter``)."""
        detach_filter(fd)


registerAdapter(_KernelSocketFilters, RealPacketSystem, ISocketFilterSystem)
