# -*- test-case-name: tests.test_fanout -*-
"""
Spread one interface's AoE frames over several packet sockets: ``PACKET_FANOUT``.

``--workers N`` runs N processes, each with its own ``AF_PACKET`` socket on
the same interface.  Joined to one fanout group, the sockets share the
interface's frames: the kernel gives each frame to exactly one of them.
Which one is decided by a classic BPF program (``PACKET_FANOUT_CBPF``) that
hashes the frame's source MAC address with its AoE shelf and slot, so all
frames of one initiator for one target reach the same worker, in order,
while different initiators (or targets) spread over the workers.
``fanout_index`` is the same hash in Python, for tests and for reasoning.

The kernel hashes only the generic flow of a frame for ``PACKET_FANOUT_HASH``,
which for a non-IP EtherType such as AoE's sends everything to one socket;
hence the program.  It reads the source MAC relative to the link-layer
header (``SKF_LL_OFF``) and shelf and slot relative to the AoE header
(``SKF_NET_OFF``), so it does not depend on where the kernel's packet
pointer happens to be.  A frame too short to hold a field ends the program
with 0: the kernel then uses the first socket.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

from aoe_twisted.net.ring import (
    PACKET_FANOUT,
    PACKET_FANOUT_CBPF,
    PACKET_FANOUT_DATA,
    PACKET_FANOUT_FLAG_UNIQUEID,
    SOL_PACKET,
)

__all__ = [
    "FANOUT_HASH_MULTIPLIER",
    "MAX_WORKERS",
    "FanoutError",
    "fanout_index",
    "fanout_program",
    "join_fanout",
]

#: Classic BPF opcodes (``linux/filter.h``) the program uses.
_LD_W_ABS = 0x20
_LD_H_ABS = 0x28
_LD_B_ABS = 0x30
_TAX = 0x07
_ALU_XOR_X = 0xAC
_ALU_LSH_K = 0x64
_ALU_MUL_K = 0x24
_ALU_RSH_K = 0x74
_RET_A = 0x16
_RET_K = 0x06
_JMP_JSET_K = 0x45
#: The response flag in the AoE version-and-flags byte.
_RESPONSE_FLAG = 0x08
#: Negative offsets that address the link-layer and network headers (``SKF_LL_OFF``...).
_SKF_NET_OFF = -0x100000
_SKF_LL_OFF = -0x200000

MAX_WORKERS = 64
"""The most sockets (``--workers``) one group spreads an interface over; more would only contend."""

FANOUT_HASH_MULTIPLIER = 0x9E3779B1
"""Knuth's multiplicative hash constant: spreads neighbouring MACs over the workers."""

_INSTRUCTION = struct.Struct("=HBBI")
#: ``struct sock_fprog``: a 16-bit length, padding, and a pointer to the instructions.
_FPROG = struct.Struct("=H6xQ")
_INT = struct.Struct("=i")


class FanoutError(Exception):
    """A socket could not join a fanout group; ``str()`` is one line naming why."""


def _insn(code: int, k: int = 0) -> bytes:
    """Encode one classic BPF instruction that does not jump."""
    return _INSTRUCTION.pack(code, 0, 0, k & 0xFFFFFFFF)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    """Encode one conditional jump: ``jt``/``jf`` instructions ahead if true/false."""
    return _INSTRUCTION.pack(code, jt, jf, k & 0xFFFFFFFF)


def fanout_program() -> bytes:
    """
    Return the classic BPF program that picks a frame's socket (``sock_filter`` array).

    ``A = ((src[2:6] ^ src[0:2]) ^ shelf << 8 ^ slot) * FANOUT_HASH_MULTIPLIER >> 16``;
    the kernel takes it modulo the number of sockets in the group.  A
    response (another server's reply or announcement: the R flag) goes to
    the first socket, the parent's: it alone watches the segment for
    duplicate addresses.
    """
    return b"".join(
        [
            _insn(_LD_B_ABS, _SKF_NET_OFF),  # A = AoE version and flags
            _jump(_JMP_JSET_K, _RESPONSE_FLAG, 0, 1),  # a response: next, else skip it
            _insn(_RET_K, 0),
            _insn(_LD_W_ABS, _SKF_LL_OFF + 8),  # A = source MAC bytes 2..5
            _insn(_TAX),
            _insn(_LD_H_ABS, _SKF_LL_OFF + 6),  # A = source MAC bytes 0..1
            _insn(_ALU_XOR_X),
            _insn(_TAX),
            _insn(_LD_H_ABS, _SKF_NET_OFF + 2),  # A = AoE major (shelf)
            _insn(_ALU_LSH_K, 8),
            _insn(_ALU_XOR_X),
            _insn(_TAX),
            _insn(_LD_B_ABS, _SKF_NET_OFF + 4),  # A = AoE minor (slot)
            _insn(_ALU_XOR_X),
            _insn(_ALU_MUL_K, FANOUT_HASH_MULTIPLIER),
            _insn(_ALU_RSH_K, 16),
            _insn(_RET_A),
        ]
    )


def fanout_index(
    src: bytes, shelf: int, slot: int, sockets: int, response: bool = False
) -> int:
    """Return which of ``sockets`` sockets the program sends a frame to (as the kernel does)."""
    if response:
        return 0
    value = int.from_bytes(src[2:6], "big") ^ int.from_bytes(src[0:2], "big")
    value ^= (shelf << 8) & 0xFFFFFFFF
    value ^= slot
    value = (value * FANOUT_HASH_MULTIPLIER) & 0xFFFFFFFF
    return (value >> 16) % sockets


def join_fanout(sock: socket.socket, group: int | None = None) -> int:
    """
    Join ``sock`` (a bound ``AF_PACKET`` socket) to fanout group ``group``; return the group id.

    With ``group=None`` the kernel picks an unused id (``PACKET_FANOUT_FLAG_UNIQUEID``)
    and the program is installed; the other sockets then join with that id
    and share the group's program.  Frames queued on the socket before it
    joined (seen by every socket alike) are discarded, so none is answered
    twice.

    @raise FanoutError: if the kernel refuses (too old, or a group id in use).
    """
    mode = PACKET_FANOUT_CBPF
    try:
        if group is None:
            sock.setsockopt(
                SOL_PACKET, PACKET_FANOUT, mode << 16 | PACKET_FANOUT_FLAG_UNIQUEID << 16
            )
            group = _INT.unpack(sock.getsockopt(SOL_PACKET, PACKET_FANOUT, _INT.size))[0]
            group &= 0xFFFF
            _set_program(sock, fanout_program())
        else:
            sock.setsockopt(SOL_PACKET, PACKET_FANOUT, mode << 16 | group)
    except OSError as e:
        raise FanoutError(f"cannot join a PACKET_FANOUT group: {e.strerror or e}") from None
    _discard_queued(sock)
    return group


def _set_program(sock: socket.socket, program: bytes) -> None:
    """Install ``program`` as the group's socket selector (``PACKET_FANOUT_DATA``)."""
    instructions = ctypes.create_string_buffer(program, len(program))
    fprog = _FPROG.pack(len(program) // _INSTRUCTION.size, ctypes.addressof(instructions))
    # The kernel copies the instructions during the call; the buffer may go afterwards.
    sock.setsockopt(SOL_PACKET, PACKET_FANOUT_DATA, fprog)


def _discard_queued(sock: socket.socket) -> None:
    """Read and drop whatever the socket received before it joined its group."""
    while True:
        try:
            sock.recv(65536, socket.MSG_DONTWAIT)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            if e.errno == errno.EINTR:
                continue
            raise
