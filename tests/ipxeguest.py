# -*- test-case-name: tests.test_ipxe -*-
"""
Boot Debian's iPXE in QEMU, ``sanboot`` an AoE disk and run a boot sector that tests INT 13h.

iPXE (package ``ipxe``, ``/usr/lib/ipxe/ipxe.lkrn``) is started as a Linux
kernel with an iPXE script as its initrd, which it runs as an embedded
script.  The script opens the NIC and runs ``sanboot aoe:eS.N``: iPXE finds
the target with a config query, reads its size with IDENTIFY, hooks INT 13h
as BIOS drive 0x80, reads the disk's first sector to 0:7C00 and jumps there.

That first sector is ``boot_sector(plan)``, 16-bit real-mode code assembled
here (``_Asm``, a few hand-encoded instructions, no assembler needed).
Through the INT 13h extensions (AH=41h check, AH=48h drive parameters,
AH=42h extended read, AH=43h extended write) it reads one sector, several
sectors in one call and one sector at an LBA past 2^28, writes one sector
and reads it back, and prints one line per step on COM2::

    @@AOEBOOT READ1 S=0000 N=0001 C=1a2b@@

``S`` is AH (the INT 13h status) and CF in the low byte, ``N`` the count
the BIOS reports back, ``C`` ``checksum()`` of the buffer.  It ends with
``@@AOEBOOT DONE@@`` and an ``out`` to QEMU's ``isa-debug-exit`` port, which
ends QEMU at once.  ``run_ipxe`` collects those lines as ``IpxeResult.reports``.

iPXE writes its own console through the BIOS; QEMU's ``graphics=off``
machine option makes SeaBIOS copy that to COM1, so the console (iPXE's
messages, the script's ``echo`` lines) is in ``IpxeResult.console``.  The
reports go to COM2 instead, a file of their own: SeaBIOS copies the screen
to COM1 late, in bursts, and the tail of iPXE's last message would land in
the middle of a report.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import unittest
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tests import linuxguest

__all__ = [
    "IPXE_ENV",
    "REPORTS",
    "BootPlan",
    "IpxeResult",
    "boot_sector",
    "checksum",
    "ipxe_image",
    "pattern",
    "run_ipxe",
    "sanboot_script",
    "skip_unless_available",
    "unavailable_reason",
]

IPXE_ENV = "AOE_TWISTED_IPXE"
"""Environment variable naming another ``ipxe.lkrn`` to boot."""

DEFAULT_IPXE = Path("/usr/lib/ipxe/ipxe.lkrn")
DEFAULT_MAC = "52:54:00:a0:e1:01"
SECTOR = 512
NICS = {"e1000": "e1000", "virtio": "virtio-net-pci"}
"""Our NIC names and the QEMU device models behind them."""

#: The port of QEMU's ``isa-debug-exit`` device; writing V there exits QEMU with 2V+1.
DEBUG_EXIT_PORT = 0xF4

_REPORT_RE = re.compile(r"@@AOEBOOT (\w+)((?: \w+=[0-9a-f]+)*)@@")
_SCRIPT_MARK_RE = re.compile(r"@@IPXE-(\w+)(?: ([^@]*))?@@")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f]")


def ipxe_image() -> Path:
    """Return the ``ipxe.lkrn`` to boot (``$AOE_TWISTED_IPXE`` or Debian's)."""
    return Path(os.environ.get(IPXE_ENV) or DEFAULT_IPXE)


@functools.cache
def unavailable_reason() -> str | None:
    """Say why iPXE cannot be booted here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tap devices)"
    for tool in (linuxguest.QEMU, "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install qemu-system-x86 iproute2)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun missing"
    if not ipxe_image().is_file():
        return f"{ipxe_image()} missing (apt-get install ipxe)"
    return None


def skip_unless_available(case: unittest.TestCase) -> None:
    """Skip ``case`` if iPXE cannot run; fail instead under ``AOE_TWISTED_REQUIRE_INTEROP=1``."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get(linuxguest.REQUIRE_ENV) == "1":
        case.fail(f"{linuxguest.REQUIRE_ENV}=1 but iPXE unavailable: {reason}")
    raise unittest.SkipTest(reason)


# --------------------------------------------------------------------------
# A tiny 16-bit assembler: raw opcodes, labels and their fix-ups.


class _Asm:
    """Bytes of 16-bit code at ``origin``, with labels resolved when ``assemble`` is called.

    Every instruction is written as its encoding (``emit``), with a comment
    in the caller saying which instruction it is; only jumps, calls and
    label addresses need the helpers below.
    """

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        # (position of the field, label, kind): kind "rel8", "rel16" or "abs16".
        self.fixups: list[tuple[int, str, str]] = []

    def here(self) -> int:
        """The address of the next byte."""
        return self.origin + len(self.code)

    def emit(self, *parts: int | bytes) -> None:
        """Append bytes (ints are single bytes)."""
        for part in parts:
            self.code += part if isinstance(part, bytes) else bytes([part])

    def imm16(self, value: int) -> bytes:
        """A 16-bit little-endian immediate."""
        return struct.pack("<H", value & 0xFFFF)

    def label(self, name: str) -> None:
        """Define ``name`` at the current address."""
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = self.here()

    def short(self, opcode: int, target: str) -> None:
        """A jump with an 8-bit displacement: ``jmp short`` (EB), ``jcc`` (7x), ``loop`` (E2)."""
        self.emit(opcode, 0)
        self.fixups.append((len(self.code) - 1, target, "rel8"))

    def call(self, target: str) -> None:
        """``call near rel16`` (E8)."""
        self.emit(0xE8, 0, 0)
        self.fixups.append((len(self.code) - 2, target, "rel16"))

    def address(self, opcode: bytes, target: str) -> None:
        """An instruction ending in a label's 16-bit address (``mov si, label``: BE)."""
        self.emit(opcode, 0, 0)
        self.fixups.append((len(self.code) - 2, target, "abs16"))

    def assemble(self) -> bytes:
        """Resolve every fix-up and return the code."""
        code = bytearray(self.code)
        for pos, name, kind in self.fixups:
            target = self.labels[name]
            if kind == "abs16":
                code[pos : pos + 2] = self.imm16(target)
            elif kind == "rel16":
                code[pos : pos + 2] = self.imm16(target - (self.origin + pos + 2))
            else:
                rel = target - (self.origin + pos + 1)
                if not -128 <= rel <= 127:
                    raise ValueError(f"short jump to {name} out of range ({rel})")
                code[pos] = rel & 0xFF
        return bytes(code)


# --------------------------------------------------------------------------
# The boot sector


@dataclass(frozen=True)
class BootPlan:
    """What the boot sector reads and writes (LBAs), and how much.

    ``read1`` is read alone, ``multi_count`` sectors from ``multi`` in one
    call, ``high`` alone (put it past 2^28 on a disk larger than 128 GiB),
    and one sector of ``pattern(write_seed)`` is written at ``write`` and
    read back.
    """

    read1: int
    multi: int
    multi_count: int
    high: int
    write: int
    write_seed: int = 0x5A


_ORIGIN = 0x7C00
_BUFFER = 0x8000  # 0:8000, room for 64 sectors below 0:10000
_WRITE_BUFFER = 0x7000  # one sector below the boot sector; the stack starts under it
_PARAMS = 0x7E00  # AH=48h result buffer, right after the boot sector
_COM2 = 0x2F8  # the second serial port: the reports' own, see the module docstring


def checksum(data: bytes) -> int:
    """The 16-bit checksum the boot sector prints: Fletcher's second sum, modulo 2^16.

    ``a`` sums the bytes and ``b`` sums the successive ``a``, so the order
    of the bytes counts: a sector read from the wrong place, or two sectors
    swapped, changes it.
    """
    a = b = 0
    for byte in data:
        a = (a + byte) & 0xFFFF
        b = (b + a) & 0xFFFF
    return b


def pattern(seed: int) -> bytes:
    """The sector the boot sector writes: byte 0 is ``seed``, then each is (prev + 0x3B) rol 1."""
    out = bytearray()
    value = seed & 0xFF
    for _ in range(SECTOR):
        out.append(value)
        value = (value + 0x3B) & 0xFF
        value = ((value << 1) | (value >> 7)) & 0xFF
    return bytes(out)


def _dap(count: int, buffer: int, lba: int) -> bytes:
    """An INT 13h disk address packet: size 16, count, buffer offset:segment (0), 64-bit LBA."""
    return struct.pack("<BBHHHQ", 0x10, 0, count, buffer, 0, lba)


_TRANSFERS = (("READ1", 0x42), ("MULTI", 0x42), ("HIGH", 0x42), ("WRITE", 0x43), ("READBACK", 0x42))
"""The transfers the boot sector makes, in order, with their INT 13h function."""

REPORTS = tuple(name for name, _ in _TRANSFERS)
"""The names of the transfer reports, in the order the boot sector prints them."""


def boot_sector(plan: BootPlan) -> bytes:
    """Assemble the 512-byte boot sector that runs ``plan`` (see the module docstring)."""
    if plan.multi_count * SECTOR > 0x10000 - _BUFFER:
        raise ValueError("the multi-sector read does not fit below 0:10000")
    a = _Asm(_ORIGIN)
    mov_si = bytes([0xBE])  # mov si, imm16
    mov_dl_mem = bytes([0x8A, 0x16])  # mov dl, [addr]

    # --- start: flat segments, a stack under the write buffer, remember DL.
    a.emit(0xFA)  # cli
    a.emit(0x31, 0xC0)  # xor ax, ax
    a.emit(0x8E, 0xD8)  # mov ds, ax
    a.emit(0x8E, 0xC0)  # mov es, ax
    a.emit(0x8E, 0xD0)  # mov ss, ax
    a.emit(0xBC, a.imm16(_WRITE_BUFFER))  # mov sp, WRITE_BUFFER
    a.emit(0xFB)  # sti
    a.emit(0xFC)  # cld
    a.address(bytes([0x88, 0x16]), "drive")  # mov [drive], dl
    # --- AH=41h: are the extensions there?  "@@AOEBOOT EXT S=<AH,CF> B=<BX>@@"
    # This first line also says that iPXE has loaded this sector and jumped to it.
    a.address(mov_si, "s_ext")
    a.call("report")
    a.emit(0xB4, 0x41)  # mov ah, 41h
    a.emit(0xBB, a.imm16(0x55AA))  # mov bx, 55AAh
    a.address(mov_dl_mem, "drive")  # mov dl, [drive]
    a.emit(0xCD, 0x13)  # int 13h
    a.emit(0xB0, 0x00)  # mov al, 0   (flags untouched)
    a.emit(0x14, 0x00)  # adc al, 0   (AL = CF, AH = status)
    a.emit(0x53)  # push bx (AA55h when the extensions are there)
    a.call("hex16")
    a.address(mov_si, "s_b")  # " B="
    a.call("puts")
    a.emit(0x58)  # pop ax
    a.call("hex16")
    a.call("endline")

    # --- AH=48h: drive parameters.  "@@AOEBOOT PARAMS S=<AH,CF> Q=<64-bit sector count>@@"
    a.address(mov_si, "s_params")
    a.call("report")
    a.emit(0xC7, 0x06, a.imm16(_PARAMS), a.imm16(0x1A))  # mov word [PARAMS], 1Ah (its size)
    a.emit(0xB4, 0x48)  # mov ah, 48h
    a.address(mov_dl_mem, "drive")  # mov dl, [drive]
    a.emit(0xBE, a.imm16(_PARAMS))  # mov si, PARAMS
    a.emit(0xCD, 0x13)  # int 13h
    a.emit(0xB0, 0x00)  # mov al, 0
    a.emit(0x14, 0x00)  # adc al, 0
    a.call("hex16")
    a.address(mov_si, "s_q")  # " Q="
    a.call("puts")
    for offset in (22, 20, 18, 16):  # the total sector count, high word first
        a.emit(0xA1, a.imm16(_PARAMS + offset))  # mov ax, [PARAMS+offset]
        a.call("hex16")
    a.call("endline")

    # --- fill the write buffer with pattern(seed)
    a.emit(0xBF, a.imm16(_WRITE_BUFFER))  # mov di, WRITE_BUFFER
    a.emit(0xB9, a.imm16(SECTOR))  # mov cx, 512
    a.emit(0xB0, plan.write_seed & 0xFF)  # mov al, seed
    a.label("fill")
    a.emit(0xAA)  # stosb
    a.emit(0x04, 0x3B)  # add al, 3Bh
    a.emit(0xD0, 0xC0)  # rol al, 1
    a.short(0xE2, "fill")  # loop fill

    # --- the transfers, from a table of entries: function byte, name, DAP.
    # Each prints "@@AOEBOOT NAME S=<AH,CF> N=<count after> C=<checksum>@@".
    a.address(mov_si, "table")
    a.label("next")
    a.emit(0xAC)  # lodsb: the function (0 ends the table)
    a.emit(0x84, 0xC0)  # test al, al
    a.short(0x74, "finished")  # jz finished
    a.emit(0x50)  # push ax
    a.call("report")  # the name; SI is left on the DAP
    a.emit(0x58)  # pop ax
    a.emit(0x88, 0xC4)  # mov ah, al
    a.call("transfer")  # SI is left on the next entry
    a.short(0xEB, "next")  # jmp next
    a.label("finished")
    a.address(mov_si, "s_done")
    a.call("report")
    a.call("endline")
    a.emit(0xB0, 0x00)  # mov al, 0
    a.emit(0xE6, DEBUG_EXIT_PORT)  # out F4h, al: QEMU exits (status 1)
    a.label("halt")
    a.emit(0xFA)  # cli
    a.emit(0xF4)  # hlt
    a.short(0xEB, "halt")  # jmp halt

    # --- transfer: SI = DAP, AH = function; returns SI = DAP + 16.
    a.label("transfer")
    a.emit(0x56)  # push si
    a.emit(0xB0, 0x00)  # mov al, 0 (for AH=43h: write without verify)
    a.address(mov_dl_mem, "drive")  # mov dl, [drive]
    a.emit(0xCD, 0x13)  # int 13h
    a.emit(0xB0, 0x00)  # mov al, 0
    a.emit(0x14, 0x00)  # adc al, 0
    a.address(mov_si, "s_s")  # "S="
    a.call("puts")
    a.call("hex16")
    a.address(mov_si, "s_n")  # " N="
    a.call("puts")
    a.emit(0x5E)  # pop si
    a.emit(0x8B, 0x44, 0x02)  # mov ax, [si+2]  (blocks transferred, as the BIOS left it)
    a.emit(0x8B, 0x5C, 0x04)  # mov bx, [si+4]  (buffer offset)
    a.emit(0x89, 0xC1)  # mov cx, ax
    a.emit(0xC1, 0xE1, 0x09)  # shl cx, 9  (bytes)
    a.call("hex16")
    a.emit(0x56)  # push si
    a.address(mov_si, "s_c")  # " C="
    a.call("puts")
    a.emit(0x89, 0xDE)  # mov si, bx
    a.emit(0x31, 0xC0)  # xor ax, ax   (first sum)
    a.emit(0x31, 0xD2)  # xor dx, dx   (second sum)
    a.emit(0x31, 0xDB)  # xor bx, bx
    a.short(0xE3, "sum_done")  # jcxz sum_done (nothing transferred: C=0000)
    a.label("sum")
    a.emit(0x8A, 0x1C)  # mov bl, [si]
    a.emit(0x01, 0xD8)  # add ax, bx
    a.emit(0x01, 0xC2)  # add dx, ax
    a.emit(0x46)  # inc si
    a.short(0xE2, "sum")  # loop sum
    a.label("sum_done")
    a.emit(0x89, 0xD0)  # mov ax, dx
    a.call("hex16")
    a.call("endline")
    a.emit(0x5E)  # pop si
    a.emit(0x83, 0xC6, 0x10)  # add si, 16
    a.emit(0xC3)  # ret

    # --- report: "@@AOEBOOT " then the string at SI (left after its NUL).
    a.label("report")
    a.emit(0x56)  # push si
    a.address(mov_si, "s_prefix")
    a.call("puts")
    a.emit(0x5E)  # pop si
    a.short(0xEB, "puts")  # jmp puts
    # --- endline: "@@" and a line break.
    a.label("endline")
    a.address(mov_si, "s_end")  # then falls through into puts
    # --- puts: print the zero-terminated string at SI.
    a.label("puts")
    a.emit(0xAC)  # lodsb
    a.emit(0x84, 0xC0)  # test al, al
    a.short(0x74, "puts_done")  # jz puts_done
    a.call("putc")
    a.short(0xEB, "puts")  # jmp puts
    a.label("puts_done")
    a.emit(0xC3)  # ret

    # --- hex16: print AX as four lower-case hex digits.
    a.label("hex16")
    a.emit(0x51)  # push cx
    a.emit(0xB9, a.imm16(4))  # mov cx, 4
    a.label("hex_loop")
    a.emit(0xC1, 0xC0, 0x04)  # rol ax, 4
    a.emit(0x50)  # push ax
    a.emit(0x24, 0x0F)  # and al, 0Fh
    a.emit(0x04, 0x30)  # add al, '0'
    a.emit(0x3C, 0x39)  # cmp al, '9'
    a.short(0x76, "hex_digit")  # jbe hex_digit
    a.emit(0x04, 0x27)  # add al, 'a' - '0' - 10
    a.label("hex_digit")
    a.call("putc")
    a.emit(0x58)  # pop ax
    a.short(0xE2, "hex_loop")  # loop hex_loop
    a.emit(0x59)  # pop cx
    a.emit(0xC3)  # ret

    # --- putc: AL to COM2, once its transmit holding register is empty.
    a.label("putc")
    a.emit(0x52)  # push dx
    a.emit(0x50)  # push ax
    a.emit(0xBA, a.imm16(_COM2 + 5))  # mov dx, 2FDh (line status register)
    a.label("putc_wait")
    a.emit(0xEC)  # in al, dx
    a.emit(0xA8, 0x20)  # test al, 20h
    a.short(0x74, "putc_wait")  # jz putc_wait
    a.emit(0x58)  # pop ax
    a.emit(0xBA, a.imm16(_COM2))  # mov dx, 2F8h
    a.emit(0xEE)  # out dx, al
    a.emit(0x5A)  # pop dx
    a.emit(0xC3)  # ret

    # --- data
    a.label("drive")
    a.emit(0x80)
    a.label("table")
    daps = {
        "READ1": _dap(1, _BUFFER, plan.read1),
        "MULTI": _dap(plan.multi_count, _BUFFER, plan.multi),
        "HIGH": _dap(1, _BUFFER, plan.high),
        "WRITE": _dap(1, _WRITE_BUFFER, plan.write),
        "READBACK": _dap(1, _BUFFER, plan.write),
    }
    for name, function in _TRANSFERS:
        a.emit(function, f"{name} ".encode(), 0, daps[name])
    a.emit(0)
    strings = {
        "s_prefix": "@@AOEBOOT ",
        "s_ext": "EXT S=",
        "s_params": "PARAMS S=",
        "s_done": "DONE",
        "s_s": "S=",
        "s_b": " B=",
        "s_c": " C=",
        "s_n": " N=",
        "s_q": " Q=",
        "s_end": "@@\r\n",
    }
    for label, text in strings.items():
        a.label(label)
        a.emit(text.encode(), 0)
    code = a.assemble()
    if len(code) > 510:
        raise ValueError(f"boot sector code is {len(code)} bytes, more than 510")
    return code.ljust(510, b"\0") + b"\x55\xaa"


# --------------------------------------------------------------------------
# Booting


def sanboot_script(shelf: int, slot: int) -> str:
    """The iPXE script: open the NIC, ``sanboot aoe:eSHELF.SLOT``; say so if that fails.

    ``aoe:`` URIs name no interface: iPXE uses the one opened last.
    """
    return (
        "#!ipxe\n"
        "echo @@IPXE-SCRIPT@@\n"
        "ifopen net0 || goto failed\n"
        "echo @@IPXE-OPENED ${net0/mac}@@\n"
        f"sanboot aoe:e{shelf}.{slot} || goto failed\n"
        ":failed\n"
        "echo @@IPXE-FAILED ${errno}@@\n"
    )


@dataclass
class IpxeResult:
    """What one iPXE boot produced.

    ``console`` is COM1 (iPXE's console) with terminal escapes removed, and
    ``report_text`` is COM2 (the boot sector's reports); ``reports`` maps
    each ``@@AOEBOOT NAME k=v ...@@`` line's NAME to its fields, ``marks``
    each ``@@IPXE-NAME text@@`` line of the iPXE script to its text.  Times
    are host seconds from QEMU's start: to the script's first line
    (``script_seconds``), to the boot sector's first report
    (``sanboot_seconds``, to within 0.1 s), to its last (``done_seconds``,
    likewise), and QEMU's whole life (``total_seconds``).
    """

    console: str
    report_text: str = ""
    reports: dict[str, dict[str, str]] = field(default_factory=dict)
    marks: dict[str, str] = field(default_factory=dict)
    timed_out: bool = False
    qemu_returncode: int | None = None
    qemu_stderr: str = ""
    script_seconds: float | None = None
    sanboot_seconds: float | None = None
    done_seconds: float | None = None
    total_seconds: float = 0.0

    @property
    def done(self) -> bool:
        """Whether the boot sector ran to its end."""
        return "DONE" in self.reports

    def describe(self) -> str:
        """A summary for failure messages: how it ended, the reports and the console's tail."""
        tail = "\n".join(self.console.splitlines()[-40:])
        return (
            f"timed_out={self.timed_out} qemu rc={self.qemu_returncode} marks={self.marks}\n"
            f"reports:\n{self.report_text}\nconsole tail:\n{tail}\n{self.qemu_stderr}"
        ).rstrip()


def _clean(line: str) -> str:
    """``line`` without terminal escapes and control characters."""
    return _ANSI_RE.sub("", line)


def run_ipxe(
    network: linuxguest.GuestNetwork,
    script: str,
    *,
    nic: str = "virtio",
    mac: str = DEFAULT_MAC,
    timeout: float = 60.0,
    memory_mib: int = 128,
    console_log: Path | None = None,
) -> IpxeResult:
    """Boot ``ipxe.lkrn`` with ``script`` on ``network.tap`` with a ``nic`` NIC (``NICS``).

    Returns when the boot sector has reported ``DONE`` (and QEMU exited
    through ``isa-debug-exit``), when the script reported a failure, or after
    ``timeout`` seconds (``timed_out``).  The NIC has no option ROM
    (``romfile=``): iPXE brings its own drivers.  With 64 MiB of memory iPXE
    silently ignores its initrd (it starts, runs no script and exits to the
    BIOS); 128 MiB works.  ``console_log`` receives both serial ports.
    """
    device = NICS[nic]
    nic_options = f"{device},netdev=n0,mac={mac},romfile="
    if nic == "virtio":
        nic_options += f",host_mtu={network.mtu}"
    with tempfile.TemporaryDirectory(prefix="aoe-ipxe-") as work:
        script_path = Path(work) / "boot.ipxe"
        script_path.write_text(script)
        reports_path = Path(work) / "com2.txt"
        argv = [
            linuxguest.QEMU, "-accel", "tcg", "-m", str(memory_mib),
            "-machine", "graphics=off",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-serial", f"file:{reports_path}", "-no-reboot",
            "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=1",
            "-kernel", str(ipxe_image()), "-initrd", str(script_path),
            "-netdev", f"tap,id=n0,ifname={network.tap},script=no,downscript=no",
            "-device", nic_options,
        ]  # fmt: skip
        with (Path(work) / "qemu.stderr").open("w+b") as stderr:
            result = _run_qemu(network.command(argv), reports_path, timeout, stderr)
            stderr.seek(0)
            result.qemu_stderr = stderr.read().decode(errors="replace")
    if console_log is not None:
        console_log.write_text(
            f"{result.console}\n--- COM2 ---\n{result.report_text}\n{result.qemu_stderr}"
        )
    return result


def _parse_reports(text: str) -> dict[str, dict[str, str]]:
    """Return the ``@@AOEBOOT NAME k=v ...@@`` lines of ``text``: NAME -> fields."""
    return {
        match.group(1): dict(item.split("=", 1) for item in match.group(2).split())
        for match in _REPORT_RE.finditer(text)
    }


def _run_qemu(
    argv: Sequence[str], reports_path: Path, timeout: float, stderr: BinaryIO
) -> IpxeResult:
    """Run QEMU until the boot sector is done, the script failed, or ``timeout``."""
    result = IpxeResult(console="")
    lines: list[str] = []
    failed = threading.Event()
    start = time.monotonic()
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
    )

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _clean(raw.decode(errors="replace"))
            lines.append(line)
            for mark in _SCRIPT_MARK_RE.finditer(line):
                result.marks[mark.group(1)] = (mark.group(2) or "").strip()
                if mark.group(1) == "SCRIPT":
                    result.script_seconds = time.monotonic() - start
                if mark.group(1) == "FAILED":
                    failed.set()

    def poll_reports() -> None:
        with contextlib.suppress(FileNotFoundError):
            result.report_text = reports_path.read_text(errors="replace")
        result.reports = _parse_reports(result.report_text)
        now = time.monotonic() - start
        if result.reports and result.sanboot_seconds is None:
            result.sanboot_seconds = now
        if result.done and result.done_seconds is None:
            result.done_seconds = now

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        deadline = start + timeout
        while proc.poll() is None and time.monotonic() < deadline and not failed.is_set():
            poll_reports()
            if result.done:
                # The boot sector has written to isa-debug-exit: QEMU is on its way out.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2.0)
                break
            time.sleep(0.1)
        result.timed_out = proc.poll() is None and not failed.is_set() and not result.done
    finally:
        linuxguest.terminate(proc, grace=2.0)
        thread.join(5.0)
    poll_reports()
    result.console = "\n".join(lines)
    result.qemu_returncode = proc.returncode
    result.total_seconds = time.monotonic() - start
    return result
