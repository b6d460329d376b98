# -*- test-case-name: tests.test_cli -*-
"""
``aoe-twisted``: find, inspect, read, write and benchmark AoE targets from a shell.

The command is the user-space initiator of ``aoe_twisted.initiator.client`` with a
command line around it, so a target can be checked without the Linux
``aoe`` module::

    aoe-twisted discover -i eth0
    aoe-twisted info e1.0 -i eth0
    aoe-twisted read e1.0 -i eth0 --offset 1M --length 4K -o part.bin
    aoe-twisted write e1.0 -i eth0 --offset 1M part.bin
    aoe-twisted bench e1.0 -i eth0 [--write]
    aoe-twisted read e1.0 -i eth0 -i eth1 -o disk.img     (several paths)
    aoe-twisted config e1.0 -i eth0 [--test STR | --set STR | --force-set STR ...]
    aoe-twisted mask e1.0 -i eth0 [--add MAC ... | --delete MAC ...]
    aoe-twisted reserve e1.0 -i eth0 [--set MAC ... | --release ...]
    aoe-twisted serve --iface eth0 --backend memory:64M     (twistd -n aoe ...)
    aoe-twisted ctl list|stats|initiators|add|remove|set|reload  (aoe_twisted.control.ctl)

Every command but ``serve`` and ``ctl`` opens a raw socket, so it needs root or
``CAP_NET_RAW``; ``--netns NAME`` opens it inside network namespace NAME
(as made by ``ip netns add``).  A failure is one line on standard error and
exit status 1; a usage error is one line and status 2.  Long transfers show
a progress bar on standard error when it is a terminal.  Ctrl-C (SIGINT)
cancels the command: one line says how far a transfer got (bytes received
and written out, or acknowledged by the target) and the status is 130.
``config``, ``mask`` and ``reserve`` read and change a target's config
string, MAC mask list and reserve list (AoEr11 sections 3.2-3.4), as
``aoecfg`` does for the first; ``docs/cli.md`` describes every command.

``-i`` may be repeated (or given a comma-separated list): the client then
listens on every interface, uses every server MAC that answers on each as a
path, spreads frames over the paths and routes around one that stops
answering (``aoe_twisted.initiator.client``).  ``info`` lists the paths;
``read``, ``write`` and ``bench`` name them, and what each carried, when
there is more than one.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

from twisted.internet.defer import CancelledError, Deferred, FirstError, gatherResults

from aoe_twisted import __version__
from aoe_twisted.core.wire import MAX_CONFIG_STRING, SECTOR_SIZE, format_mac, parse_mac
from aoe_twisted.units import parse_address, parse_byte_count

if TYPE_CHECKING:
    from aoe_twisted.initiator.client import AoEClient, RemoteDisk, TargetInfo

__all__ = ["build_parser", "main", "twistd_command"]

PROG = "aoe-twisted"
_T = TypeVar("_T")

#: Transfers are done in pieces of this many bytes, two at a time, so that a
#: long one neither holds the whole disk in memory nor lets the window drain.
SEGMENT = 4 << 20
#: Transfers shorter than this finish too fast for a progress bar to help.
_PROGRESS_THRESHOLD = 1 << 20



class UsageError(Exception):
    """The command line is wrong: reported in one line with exit status 2."""


class CommandError(Exception):
    """The command failed: reported in one line with exit status 1."""


class Interrupted(Exception):
    """
    The user interrupted the command (SIGINT): ``str()`` is the line to print, status 130.

    Raised by a command that was transferring data, to say how far it got.
    """


#: The exit status of a command interrupted by SIGINT (128 + 2), as a shell reports it.
INTERRUPTED_STATUS = 130
#: A reserve list's length is one byte.
MAX_RESERVE_MACS = 255
#: The word that stands for the MAC of the interface a request leaves from.
SELF = "self"


# -- argument types ------------------------------------------------------------


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap ``parse`` so argparse reports its ``ValueError`` message as it is."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be positive, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, not {text}")
    return value


def _mac(text: str) -> bytes | None:
    """A MAC address (``aa:bb:cc:dd:ee:ff``, dashes or none), or ``self`` (``None``)."""
    if text.lower() == SELF:
        return None
    return parse_mac(text)


def _config_string(text: str) -> bytes:
    """A config string: the argument's UTF-8 bytes, at most 1024 of them."""
    value = os.fsencode(text)
    if len(value) > MAX_CONFIG_STRING:
        raise ValueError(f"a config string is at most {MAX_CONFIG_STRING} bytes, "
                         f"not {len(value)}")
    return value


class _MaskEdits(argparse.Action):
    """``--add``/``--delete``: append ``(add, MAC or None for self)`` pairs in the order given."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        edits = list(getattr(namespace, self.dest, None) or [])
        edits += [(self.const, mac) for mac in values]
        setattr(namespace, self.dest, edits)


class _Interfaces(argparse.Action):
    """
    ``-i`` repeated or comma-separated: ``iface`` is the first interface, ``ifaces`` all.

    ``iface`` stays a string so that one interface reads as it always did.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        names = [name for name in str(values).split(",") if name]
        if not names:
            raise argparse.ArgumentError(self, "needs an interface name")
        known = list(getattr(namespace, "ifaces", None) or [])
        known += [name for name in names if name not in known]
        namespace.ifaces = known
        setattr(namespace, self.dest, known[0])


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, raised rather than printed."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the whole command line."""
    parser = _Parser(
        prog=PROG,
        description="An ATA over Ethernet (AoEr11) initiator in user space: find targets, "
        "read and write them, measure them.  Needs root or CAP_NET_RAW.",
        epilog="Sizes and offsets are bytes, decimal or 0x hex, optionally followed by K, M, G "
        "or T (powers of 1024; KiB or KB too) or s (512-byte sectors): 4096, 64M, 8s.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    common = _Parser(add_help=False)
    net = common.add_argument_group("network")
    net.add_argument("-i", "--iface", required=True, metavar="IFACE", action=_Interfaces,
                     help="the Ethernet interface the targets are on; repeat it (or give "
                     "IFACE,IFACE) to use several paths")
    net.add_argument("--netns", metavar="NAME",
                     help="open the socket in network namespace NAME (ip netns)")
    net.add_argument("--timeout", type=_argtype(_positive_float), default=0.5, metavar="SECONDS",
                     help="wait this long for a reply before sending again, doubling each "
                     "time up to 8 times as long (default 0.5)")
    net.add_argument("--retries", type=_argtype(_count), default=4, metavar="N",
                     help="send a request again at most N times (default 4)")
    net.add_argument("-v", "--verbose", action="store_true",
                     help="log every retransmission and port event to standard error")
    target_arg: dict[str, Any] = {
        "type": _argtype(parse_address), "metavar": "TARGET",
        "help": "the target, as eSHELF.SLOT (e.g. e1.0)",
    }
    progress = _Parser(add_help=False)
    progress.add_argument("--no-progress", action="store_true",
                          help="no progress bar, even on a terminal")

    discover = commands.add_parser(
        "discover", parents=[common], help="list the targets that answer on an interface",
        description="Broadcast a config query and list every target that answers.")
    discover.add_argument("--wait", type=_argtype(_positive_float), default=1.0,
                          metavar="SECONDS", help="collect answers this long (default 1)")

    info = commands.add_parser(
        "info", parents=[common], help="show what one target says about itself",
        description="Show a target's address, size, limits, config string and identity.")
    info.add_argument("target", **target_arg)

    read = commands.add_parser(
        "read", parents=[common, progress], help="read bytes from a target",
        description="Read bytes from a target to a file or standard output.")
    read.add_argument("target", **target_arg)
    read.add_argument("--offset", type=_argtype(parse_byte_count), default=0, metavar="BYTES",
                      help="where to start (default 0)")
    read.add_argument("--length", type=_argtype(parse_byte_count), metavar="BYTES",
                      help="how much to read (default: to the end of the disk)")
    read.add_argument("-o", "--output", metavar="FILE",
                      help="write to FILE instead of standard output")
    read.add_argument("--hexdump", action="store_true",
                      help="print a hex dump instead of the raw bytes")

    write = commands.add_parser(
        "write", parents=[common, progress], help="write a file to a target",
        description="Write a file (or standard input, '-') to a target, then flush it.")
    write.add_argument("target", **target_arg)
    write.add_argument("file", metavar="FILE", help="what to write ('-' for standard input)")
    write.add_argument("--offset", type=_argtype(parse_byte_count), default=0, metavar="BYTES",
                       help="where to write it (default 0)")
    write.add_argument("--no-flush", action="store_true",
                       help="do not send FLUSH CACHE after the write")

    bench = commands.add_parser(
        "bench", parents=[common], help="measure a target's throughput and IOPS",
        description="Sequential reads of SIZE bytes, then random reads of 1 sector and of "
        "one frame's worth, each for DURATION seconds (or COUNT operations), within the "
        "first SIZE bytes.  With --write, the same with writes: this destroys that data.")
    bench.add_argument("target", **target_arg)
    bench.add_argument("--size", type=_argtype(parse_byte_count), default=16 << 20,
                       metavar="BYTES",
                       help="the sequential transfer, and the region of the random ones "
                       "(default 16M)")
    bench.add_argument("--duration", type=_argtype(_positive_float), default=2.0,
                       metavar="SECONDS", help="how long each random test runs (default 2)")
    bench.add_argument("--count", type=_argtype(_positive_int), metavar="N",
                       help="run each random test for N operations instead")
    bench.add_argument("--depth", type=_argtype(_positive_int), metavar="N",
                       help="random operations in flight (default: the target's window)")
    bench.add_argument("--write", action="store_true",
                       help="also measure writes (overwrites the first SIZE bytes)")
    bench.add_argument("--seed", type=int, help="seed the random offsets")

    json_arg: dict[str, Any] = {
        "action": "store_true", "help": "print the result as one JSON object (for scripts)",
    }
    config = commands.add_parser(
        "config", parents=[common], help="read, test or set a target's config string",
        description="Read, test or set a target's config string (AoEr11 section 3.2), as "
        "aoecfg does.  The target is found with a config query; the request then goes to "
        "the MAC that answered.  --test and --test-prefix print the config string and exit 0 "
        "on a match; on a mismatch the target stays silent (AoEr11), so they print nothing "
        "and exit 1 once the timeout and every retry have passed.",
        epilog="STR is taken as UTF-8 bytes, at most 1024.  --force-set '' clears the string.")
    config.add_argument("target", **target_arg)
    config_action = config.add_mutually_exclusive_group()
    config_action.add_argument("--read", action="store_const", dest="ccmd", const="read",
                               help="print the config string (the default)")
    for flag, name, text in (
        ("--test", "test", "exit 0 if the config string is exactly STR, else 1 (silently)"),
        ("--test-prefix", "test-prefix", "exit 0 if the config string starts with STR, else 1"),
        ("--set", "set", "set the config string to STR unless another one is set"),
        ("--force-set", "force-set", "set the config string to STR whatever it was"),
    ):
        config_action.add_argument(flag, type=_argtype(_config_string), metavar="STR",
                                   dest=name.replace("-", "_"), help=text)
    config.add_argument("--json", **json_arg)

    mask = commands.add_parser(
        "mask", parents=[common], help="read or edit a target's MAC mask list",
        description="Read or edit a target's MAC mask list (AoEr11 section 3.3): while it is "
        "not empty, the target answers only the hosts on it.  --add and --delete may be "
        "combined and repeated; the changes go in one request, in command-line order, up "
        "to the first the target refuses, and the new list is printed.",
        epilog="MAC is aa:bb:cc:dd:ee:ff (or with dashes, or without separators); 'self' "
        "is the MAC of the interface the request leaves from.  A list that leaves this host "
        "out makes the target stop answering it: the command warns when it does.")
    mask.add_argument("target", **target_arg)
    mask.add_argument("--read", action="store_true", help="print the list (the default)")
    mask.add_argument("--add", nargs="+", metavar="MAC", type=_argtype(_mac), dest="edits",
                      action=_MaskEdits, const=True, help="add MACs to the list")
    mask.add_argument("--delete", nargs="+", metavar="MAC", type=_argtype(_mac),
                      dest="edits", action=_MaskEdits, const=False,
                      help="delete MACs from the list")
    mask.add_argument("--json", **json_arg)

    reserve = commands.add_parser(
        "reserve", parents=[common], help="read, set or release a target's reserve list",
        description="Read, set or release a target's reserve list (AoEr11 section 3.4): "
        "while it is not empty, only the hosts on it may read and write.  --set and "
        "--release are refused unless the list is empty or holds this host; --force-set "
        "and --force-release are not.",
        epilog="MAC is aa:bb:cc:dd:ee:ff (or with dashes, or without separators); 'self' "
        "is the MAC of the interface the request leaves from.")
    reserve.add_argument("target", **target_arg)
    reserve_action = reserve.add_mutually_exclusive_group()
    reserve_action.add_argument("--read", action="store_true",
                                help="print the list (the default)")
    reserve_action.add_argument("--set", nargs="+", metavar="MAC", type=_argtype(_mac),
                                dest="set_macs", help="reserve the target for these hosts")
    reserve_action.add_argument("--force-set", nargs="+", metavar="MAC",
                                type=_argtype(_mac), dest="force_macs",
                                help="the same, even if other hosts hold it")
    reserve_action.add_argument("--release", action="store_true",
                                help="empty the list (only a host on it may)")
    reserve_action.add_argument("--force-release", action="store_true",
                                help="empty the list whoever holds it")
    reserve.add_argument("--json", **json_arg)

    commands.add_parser(
        "ctl", add_help=False, help="control a running server through its control socket",
        description="List, add, remove and change the targets of a running 'twistd aoe', "
        "and show its stats (see 'aoe-twisted ctl --help').")
    commands.add_parser(
        "serve", add_help=False, help="serve a target: runs 'twistd -n aoe ARGS'",
        description="Run the AoE target in the foreground: 'twistd -n aoe' with the "
        "arguments that follow (see 'twistd aoe --help'); --netns NAME first runs it "
        "in that network namespace.")
    return parser


# -- output helpers --------------------------------------------------------------


def human(size: float) -> str:
    """Return ``size`` bytes as ``64.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _config_text(config: bytes) -> str:
    """Show a config string readably: ``-`` when empty, escapes for binary bytes."""
    if not config:
        return "-"
    return repr(config.decode("utf-8", "backslashreplace"))


def format_targets(targets: Sequence[TargetInfo], interfaces: bool = False) -> str:
    """Return the table ``discover`` prints (with an IFACE column if ``interfaces``)."""
    rows = [("TARGET", "MAC", *(("IFACE",) if interfaces else ()), "SIZE", "BUFFERS", "SECTORS",
             "FIRMWARE", "CONFIG")]
    for t in targets:
        rows.append((
            t.name,
            format_mac(t.mac),
            *((t.interface or "?",) if interfaces else ()),
            "?" if t.size is None else human(t.size),
            str(t.buffer_count),
            str(t.sector_count),
            f"0x{t.firmware_version:04x}",
            _config_text(t.config_string),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  " + row[-1]
        for row in rows
    )


def hexdump(data: bytes, start: int = 0) -> Iterator[str]:
    """Yield ``hexdump -C`` lines of ``data``, offsets counted from ``start``."""
    for i in range(0, len(data), 16):
        line = data[i : i + 16]
        hexes = " ".join(f"{b:02x}" for b in line[:8]) + "  " + " ".join(
            f"{b:02x}" for b in line[8:]
        )
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in line)
        yield f"{start + i:08x}  {hexes:<48}  |{text}|"


class Progress:
    """
    A one-line progress bar on a terminal: bytes done, percent, rate.

    Disabled (every method does nothing) unless ``enabled``; redrawn at most
    ten times a second so that it costs nothing next to the transfer.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        stream: IO[str],
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.clock = clock
        self.done = 0
        self.started = clock()
        self._drawn = float("-inf")
        self._width = 0

    def advance(self, count: int) -> None:
        """Count ``count`` more bytes done, redrawing if it is time."""
        self.done += count
        if self.enabled and self.clock() - self._drawn >= 0.1:
            self._draw()

    def _draw(self) -> None:
        now = self.clock()
        self._drawn = now
        elapsed = max(now - self.started, 1e-9)
        rate = f"{self.done / elapsed / 1e6:.1f} MB/s"
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            bar = "#" * int(fraction * 30)
            line = (f"{self.label} [{bar:<30}] {fraction * 100:5.1f}% "
                    f"{human(self.done)} / {human(self.total)}  {rate}")
        else:
            line = f"{self.label} {human(self.done)}  {rate}"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def _progress(args: argparse.Namespace, label: str, total: int | None) -> Progress:
    """A progress bar for a transfer, enabled on a terminal for long transfers."""
    enabled = (
        not getattr(args, "no_progress", False)
        and sys.stderr.isatty()
        and (total is None or total >= _PROGRESS_THRESHOLD)
    )
    return Progress(label, total, sys.stderr, enabled)


# -- the commands -----------------------------------------------------------------


def _open_client(reactor: Any, args: argparse.Namespace) -> AoEClient:
    """Open the raw socket the command works through."""
    from aoe_twisted.initiator.client import AoEClient, RetryPolicy

    retry = RetryPolicy(args.timeout, args.timeout * 8, args.retries)
    interfaces = getattr(args, "ifaces", None) or [args.iface]
    return AoEClient.listen(interfaces, reactor=reactor, netns=args.netns, retry=retry)


def _where(args: argparse.Namespace) -> str:
    """The interfaces (and namespace) of the command line, for messages."""
    interfaces = ", ".join(getattr(args, "ifaces", None) or [args.iface])
    return interfaces + (f" in {args.netns}" if args.netns else "")


def _several(client: AoEClient, disk: RemoteDisk) -> bool:
    """Whether to speak of paths: more than one interface or more than one path."""
    return len(client.links) > 1 or len(disk.paths.paths) > 1


async def _open_disk(client: AoEClient, args: argparse.Namespace) -> RemoteDisk:
    shelf, slot = args.target
    disk = await client.open(shelf, slot)
    if _several(client, disk) and args.command in ("read", "write"):
        paths = ", ".join(p.describe() for p in disk.paths.paths)
        _note(f"{disk.name}: {len(disk.paths.paths)} path(s): {paths}")
    return disk


def _path_report(client: AoEClient, disk: RemoteDisk) -> None:
    """After a transfer over several paths, say what each carried (standard error)."""
    if not _several(client, disk):
        return
    for path in disk.paths.paths:
        _note(f"  path {path.state()}")


async def cmd_discover(reactor: Any, client: AoEClient, args: argparse.Namespace) -> int:
    """Print the table of targets that answer; exit 1 if none does."""
    targets = await client.discover(args.wait)
    if not targets:
        _error(f"no AoE target answered on {_where(args)} within {args.wait:g} s")
        return 1
    print(format_targets(targets, interfaces=len(client.links) > 1))
    return 0


async def cmd_info(reactor: Any, client: AoEClient, args: argparse.Namespace) -> int:
    """Print everything the target says about itself, one field a line."""
    disk = await _open_disk(client, args)
    info = disk.info
    size = "unknown" if info.size is None else (
        f"{info.size} bytes ({human(info.size)}, {info.size // SECTOR_SIZE} sectors)"
    )
    fields = [
        ("target", info.name),
        ("mac", format_mac(info.mac)),
        ("size", size),
        ("lba48", "yes" if info.lba48 else "no (28-bit commands)"),
        ("buffer count", str(info.buffer_count)),
        ("sector count", str(info.sector_count)),
        ("sectors per frame", f"{disk.sectors_per_frame} (MTU {client.protocol.mtu})"),
        ("window", f"{disk.window} requests in flight"),
        ("firmware version", f"0x{info.firmware_version:04x}"),
        ("config string", _config_text(info.config_string)),
        ("model", info.model or "-"),
        ("serial", info.serial or "-"),
        ("firmware", info.firmware or "-"),
    ]
    if _several(client, disk):
        fields.append(("interfaces", ", ".join(client.interfaces)))
    for path in disk.paths.paths:
        fields.append((
            "path",
            f"{path.interface} -> {format_mac(path.mac)} (buffer count {path.buffer_count}, "
            f"sector count {path.sector_count}, MTU {path.protocol.mtu})",
        ))
    for name, value in fields:
        print(f"{name + ':':<19}{value}")
    return 0


def _check_span(disk: RemoteDisk, offset: int, length: int) -> None:
    """Refuse a byte range that does not lie on the disk, before any frame is sent."""
    size = disk.size
    if size is not None and offset + length > size:
        raise CommandError(
            f"{disk.name}: {human(length)} at offset {offset} runs past the end of the disk "
            f"({size} bytes)"
        )


def _segments(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """
    Split ``length`` bytes at ``offset`` into pieces ending on ``SEGMENT`` boundaries.

    Only the first piece can start, and only the last can end, inside a
    sector: two pieces in flight at once never share a sector.
    """
    end = offset + length
    while offset < end:
        stop = min(end, (offset // SEGMENT + 1) * SEGMENT)
        yield offset, stop - offset
        offset = stop


async def _pipelined(operations: Iterator[Deferred[_T]], consume: Callable[[_T], object]) -> None:
    """
    Run ``operations`` two at a time, handing their results to ``consume`` in order.

    Two pieces in flight keep the disk's window full across the gap between
    them.  The iterator is advanced only when a piece can start, so it may
    read its input lazily.  If one fails, the other is cancelled and the
    failure raised.
    """
    pending: deque[Deferred[_T]] = deque()
    try:
        for operation in operations:
            pending.append(operation)
            if len(pending) == 2:
                consume(await pending.popleft())
        while pending:
            consume(await pending.popleft())
    finally:
        for d in pending:
            d.addErrback(lambda _: None)
            d.cancel()


async def cmd_read(reactor: Any, client: AoEClient, args: argparse.Namespace) -> int:
    """Read a byte range to a file, to standard output or as a hex dump."""
    to_stdout = args.output in (None, "-")
    if to_stdout and not args.hexdump and sys.stdout.isatty():
        raise UsageError(f"{PROG} read: refusing to write binary data to a terminal; "
                         "use -o FILE or --hexdump")
    disk = await _open_disk(client, args)
    offset = args.offset
    size = disk.size
    if args.length is not None:
        length = args.length
    elif size is None:
        raise CommandError(f"{disk.name}: the disk's size is unknown; give --length")
    else:
        length = max(0, size - offset)
    _check_span(disk, offset, length)
    out: IO[bytes]
    if to_stdout:
        out = sys.stdout.buffer
    else:
        try:
            out = open(args.output, "wb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise CommandError(f"cannot open {args.output}: {e.strerror}") from None
    progress = _progress(args, f"read {disk.name}", length)
    position = offset
    received = 0

    def emit(data: bytes) -> None:
        nonlocal position
        if args.hexdump:
            out.write(("\n".join(hexdump(data, position)) + "\n").encode("ascii"))
        else:
            out.write(data)
        position += len(data)

    def arrived(count: int) -> None:
        nonlocal received
        received += count
        progress.advance(count)

    try:
        try:
            await _pipelined(
                (disk.read_at(o, n, arrived) for o, n in _segments(offset, length)), emit
            )
        except CancelledError:
            out.flush()
            where = "standard output" if to_stdout else args.output
            raise Interrupted(
                f"interrupted: {received} of {length} bytes read from {disk.name} "
                f"({human(received)}); the {position - offset} bytes from offset {offset} "
                f"to {position} are written to {where}"
            ) from None
        out.flush()
    finally:
        progress.close()
        if not to_stdout:
            out.close()
    _path_report(client, disk)
    return 0


async def cmd_write(reactor: Any, client: AoEClient, args: argparse.Namespace) -> int:
    """Write a file or standard input at an offset, then flush."""
    source: IO[bytes]
    if args.file == "-":
        source = sys.stdin.buffer
        total = None
    else:
        try:
            source = open(args.file, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise CommandError(f"cannot open {args.file}: {e.strerror}") from None
        total = os.fstat(source.fileno()).st_size
    try:
        disk = await _open_disk(client, args)
        if total is not None:
            _check_span(disk, args.offset, total)
        progress = _progress(args, f"write {disk.name}", total)
        written = 0
        acknowledged = 0
        # The pieces in flight, in order; everything before ``complete`` is acknowledged.
        pieces: deque[int] = deque()
        complete = args.offset

        def acked(count: int) -> None:
            nonlocal acknowledged
            acknowledged += count
            progress.advance(count)

        def finished(_: object) -> None:
            nonlocal complete
            complete += pieces.popleft()

        def writes() -> Iterator[Deferred[None]]:
            # Pieces end on SEGMENT boundaries (see _segments), read as they are needed.
            nonlocal written
            offset = args.offset
            while data := source.read((offset // SEGMENT + 1) * SEGMENT - offset):
                if disk.size is not None and offset + len(data) > disk.size:
                    raise CommandError(
                        f"{disk.name}: the data runs past the end of the disk at byte "
                        f"{disk.size}"
                    )
                pieces.append(len(data))
                yield disk.write_at(offset, data, acked)
                offset += len(data)
                written += len(data)

        try:
            try:
                await _pipelined(writes(), finished)
                if not args.no_flush:
                    await disk.flush()
            except CancelledError:
                of = "" if total is None else f" of {total}"
                before = (f"the {complete - args.offset} bytes from offset {args.offset} to "
                          f"{complete} are all written" if complete > args.offset
                          else "no piece is known to be written whole")
                raise Interrupted(
                    f"interrupted: {acknowledged}{of} bytes acknowledged by {disk.name} "
                    f"({human(acknowledged)}); {before}; not flushed"
                ) from None
        finally:
            progress.close()
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    flushed = "" if args.no_flush else ", flushed"
    _note(f"wrote {written} bytes to {disk.name} at offset {args.offset}{flushed}")
    _path_report(client, disk)
    return 0


async def _timed(reactor: Any, run: Callable[[], Deferred[Any]]) -> float:
    start = reactor.seconds()
    await run()
    return float(reactor.seconds() - start)


async def _random_io(
    reactor: Any,
    disk: RemoteDisk,
    sectors: int,
    region: int,
    write: bool,
    args: argparse.Namespace,
    rng: random.Random,
    done: dict[str, int] | None = None,
) -> tuple[int, float]:
    """
    Run random single-frame operations of ``sectors`` sectors; return (ops, seconds).

    ``done["read"]``/``done["write"]`` count the bytes of each operation answered.
    """
    depth = args.depth or disk.window
    payload = os.urandom(sectors * SECTOR_SIZE)
    last = region // SECTOR_SIZE - sectors
    start = reactor.seconds()
    deadline = None if args.count else start + args.duration
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while (args.count and issued < args.count) or (
            deadline is not None and reactor.seconds() < deadline
        ):
            issued += 1
            lba = rng.randint(0, last)
            if write:
                await disk.write(lba, payload)
            else:
                await disk.read(lba, sectors)
            if done is not None:
                done["write" if write else "read"] += len(payload)

    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(depth)],
                        consumeErrors=True)
    return issued, float(reactor.seconds() - start)


async def cmd_bench(reactor: Any, client: AoEClient, args: argparse.Namespace) -> int:
    """Measure sequential MB/s and random IOPS, printing a table."""
    disk = await _open_disk(client, args)
    size = disk.size if disk.size is not None else args.size
    region = min(args.size, size) // SECTOR_SIZE * SECTOR_SIZE
    per = disk.sectors_per_frame
    if region < per * SECTOR_SIZE:
        raise CommandError(f"{disk.name}: --size {args.size} is smaller than one frame")
    rng = random.Random(args.seed)
    print(f"bench {disk.name} on {', '.join(client.interfaces)}: first {human(region)}, "
          f"{per} sectors per frame, window {disk.window}, "
          f"{args.depth or disk.window} random operations in flight")
    print(f"{'test':<28}{'ops':>9}{'MiB':>10}{'seconds':>10}{'MB/s':>10}{'IOPS':>10}"
          f"{'CPU us/op':>11}")
    # This process's CPU per operation: near 100 % of a CPU, the figures are
    # bench's own ceiling rather than the target's (docs/cli.md).
    cpu = [time.process_time()]

    def report(label: str, ops: int, nbytes: int, seconds: float) -> None:
        now = time.process_time()
        used, cpu[0] = now - cpu[0], now
        seconds = max(seconds, 1e-9)
        print(f"{label:<28}{ops:>9}{nbytes / (1 << 20):>10.1f}{seconds:>10.3f}"
              f"{nbytes / seconds / 1e6:>10.2f}{ops / seconds:>10.0f}"
              f"{used / max(ops, 1) * 1e6:>11.1f}")

    frames = -(-region // (per * SECTOR_SIZE))
    done = {"read": 0, "write": 0}
    current = ["sequential read"]

    def counter(kind: str) -> Callable[[int], None]:
        def count(n: int) -> None:
            done[kind] += n

        return count

    async def sequential(write: bool, data: bytes = b"") -> None:
        pieces = _segments(0, region)
        await _pipelined(
            (disk.write(o // SECTOR_SIZE, data[o : o + n], counter("write")) if write
             else disk.read(o // SECTOR_SIZE, n // SECTOR_SIZE, counter("read"))
             for o, n in pieces),
            lambda _: None,
        )

    try:
        try:
            seconds = await _timed(reactor, lambda: Deferred.fromCoroutine(sequential(False)))
            report("sequential read", frames, region, seconds)
            if args.write:
                current[0] = "sequential write"
                data = os.urandom(region)  # made before the clocks start: not measured
                cpu[0] = time.process_time()
                seconds = await _timed(
                    reactor, lambda: Deferred.fromCoroutine(sequential(True, data))
                )
                report("sequential write", frames, region, seconds)
            tests = [(f"random read {n} sector{'s' if n > 1 else ''}", n, False)
                     for n in dict.fromkeys((1, per))]
            if args.write:
                tests += [(f"random write {n} sector{'s' if n > 1 else ''}", n, True)
                          for n in dict.fromkeys((1, per))]
            for label, n, write in tests:
                current[0] = label
                cpu[0] = time.process_time()
                ops, seconds = await _random_io(reactor, disk, n, region, write, args, rng,
                                                done)
                report(label, ops, ops * n * SECTOR_SIZE, seconds)
        except FirstError as e:
            e.subFailure.raiseException()
    except CancelledError:
        raise Interrupted(
            f"interrupted during {current[0]}: {disk.name} acknowledged "
            f"{done['read']} bytes read and {done['write']} bytes written"
        ) from None
    if _several(client, disk):
        for path in disk.paths.paths:
            print(f"path {path.state()}")
    return 0


# -- config string, mask list, reserve list ---------------------------------------


def _check_control_args(args: argparse.Namespace) -> None:
    """Refuse what argparse cannot: ``mask --read`` with edits, too many MACs at once."""
    if args.command == "mask":
        from aoe_twisted.initiator.client import MAX_MASK_EDITS

        edits = args.edits or []
        if args.read and edits:
            raise UsageError(f"{PROG} mask: --read cannot be combined with --add or --delete")
        if len(edits) > MAX_MASK_EDITS:
            raise UsageError(f"{PROG} mask: at most {MAX_MASK_EDITS} changes in one request, "
                             f"not {len(edits)}")
    elif args.command == "reserve":
        macs = args.set_macs or args.force_macs or []
        if len(macs) > MAX_RESERVE_MACS:
            raise UsageError(f"{PROG} reserve: a reserve list holds at most "
                             f"{MAX_RESERVE_MACS} MACs, not {len(macs)}")


async def _control(client: AoEClient, args: argparse.Namespace) -> Any:
    """Find the target for a config, mask or reserve request (a ``TargetControl``)."""
    from aoe_twisted.initiator.client import TargetNotFound

    shelf, slot = args.target
    try:
        return await client.control(shelf, slot)
    except TargetNotFound as e:
        # A mask list without us on it makes the target as silent as a missing one.
        raise CommandError(f"{e} (or its mask list leaves this host out)") from None


def _resolve(macs: Sequence[bytes | None], own: bytes) -> tuple[bytes, ...]:
    """Replace ``self`` (``None``) by this host's MAC; keep the order, drop repeats."""
    return tuple(dict.fromkeys(own if mac is None else mac for mac in macs))


def _json_line(value: dict[str, Any]) -> None:
    import json

    print(json.dumps(value, sort_keys=True))


def _where_json(control: Any) -> dict[str, Any]:
    info = control.info
    return {"target": info.name, "mac": format_mac(info.mac), "interface": info.interface}


def _print_list(name: str, what: str, macs: Sequence[bytes], empty: str, meaning: str) -> None:
    """Print a MAC list: a heading naming what it means, then one MAC a line."""
    if not macs:
        print(f"{name} {what}: empty ({empty})")
        return
    plural = "MAC" if len(macs) == 1 else "MACs"
    print(f"{name} {what}: {len(macs)} {plural} ({meaning})")
    for mac in macs:
        print(f"  {format_mac(mac)}")


async def cmd_config(reactor: Any, client: AoEClient, args: argparse.Namespace) -> int:
    """Read, test or set the config string; print it (or, on a test mismatch, nothing)."""
    from aoe_twisted.core.wire import ConfigCommand
    from aoe_twisted.initiator.client import ConfigMismatch, ConfigStringPresent

    command, string = ConfigCommand.READ, b""
    for name, value in (("test", ConfigCommand.TEST), ("test_prefix", ConfigCommand.TEST_PREFIX),
                        ("set", ConfigCommand.SET), ("force_set", ConfigCommand.FORCE_SET)):
        if getattr(args, name) is not None:
            command, string = value, getattr(args, name)
    control = await _control(client, args)
    before = control.info.config_string
    try:
        info = await control.config(command, string)
    except ConfigMismatch as e:
        # The target's silence is the answer: nothing to print, like test(1).
        if args.verbose:
            _error(str(e))
        return 1
    except ConfigStringPresent as e:
        raise CommandError(f"{e} (use --force-set)") from None
    changed = command in (ConfigCommand.SET, ConfigCommand.FORCE_SET)
    if args.json:
        value = _where_json(control)
        value["config_string"] = info.config_string.decode("utf-8", "backslashreplace")
        value["config_string_hex"] = info.config_string.hex()
        value["buffer_count"] = info.buffer_count
        value["sector_count"] = info.sector_count
        value["firmware_version"] = info.firmware_version
        if changed:
            value["changed"] = info.config_string != before
        _json_line(value)
        return 0
    text = _config_text(info.config_string) if info.config_string else "(empty)"
    if not changed:
        print(f"{info.name} config string: {text}")
    elif info.config_string == before:
        print(f"{info.name} config string: {text} (unchanged)")
    else:
        was = _config_text(before) if before else "(empty)"
        print(f"{info.name} config string set: {text} (was {was})")
    return 0


async def cmd_mask(reactor: Any, client: AoEClient, args: argparse.Namespace) -> int:
    """Read or edit the MAC mask list; print the list; warn if it now leaves this host out."""
    from aoe_twisted.initiator.client import MaskEdit

    control = await _control(client, args)
    own = control.local_mac
    edits = [MaskEdit(add, own if mac is None else mac) for add, mac in args.edits or []]
    macs = await (control.edit_mask(edits) if edits else control.mask_list())
    if args.json:
        _json_line({**_where_json(control), "mask_list": [format_mac(m) for m in macs]})
    else:
        _print_list(control.name, "mask list", macs, "every host gets answers",
                    "only these hosts get answers")
    if edits and macs and own not in macs:
        _error(f"warning: this host ({format_mac(own)}) is not on {control.name}'s mask list: "
               "the target no longer answers it")
    return 0


async def cmd_reserve(reactor: Any, client: AoEClient, args: argparse.Namespace) -> int:
    """Read, set or release the reserve list; print the list."""
    from aoe_twisted.initiator.client import TargetReserved

    control = await _control(client, args)
    own = control.local_mac
    force = bool(args.force_macs or args.force_release)
    try:
        if args.set_macs or args.force_macs:
            macs = await control.set_reserve(_resolve(args.set_macs or args.force_macs, own),
                                             force=force)
        elif args.release or args.force_release:
            macs = await control.set_reserve((), force=force)
        else:
            macs = await control.reserve_list()
    except TargetReserved as e:
        flag = "--force-release" if args.release else "--force-set"
        raise CommandError(f"{e} (use {flag})") from None
    if args.json:
        _json_line({**_where_json(control), "reserve_list": [format_mac(m) for m in macs]})
    else:
        _print_list(control.name, "reserve list", macs, "not reserved",
                    "only these hosts may read and write")
    return 0


_COMMANDS: dict[str, Callable[[Any, AoEClient, argparse.Namespace], Any]] = {
    "discover": cmd_discover,
    "info": cmd_info,
    "read": cmd_read,
    "write": cmd_write,
    "bench": cmd_bench,
    "config": cmd_config,
    "mask": cmd_mask,
    "reserve": cmd_reserve,
}


# -- running -----------------------------------------------------------------------


def _error(message: str) -> None:
    """Print one error line to standard error."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def _note(message: str) -> None:
    """Print one informational line to standard error (standard output may be data)."""
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


def _start_logging(verbose: bool) -> None:
    """
    Send log events to standard error: everything with ``-v``, else warnings and worse.

    Each event is one line, prefixed with the program's name.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        formatEvent,
        globalLogBeginner,
    )

    def observer(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += ": " + failure.getErrorMessage()
            if verbose:
                text += "\n" + failure.getTraceback()
        sys.stderr.write(f"{PROG}: {text}\n")

    level = LogLevel.debug if verbose else LogLevel.warn
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])],
        redirectStandardIO=False,
    )


async def run_command(reactor: Any, args: argparse.Namespace) -> int:
    """
    Run one parsed command on ``reactor``; return the exit status.

    Expected failures (no interface, no permission, no such target, timeout,
    ATA or AoE error, bad file) become one line on standard error and 1.
    Cancelling the command (``main`` does on SIGINT) is one line, saying how
    far a transfer got, and ``INTERRUPTED_STATUS`` (130).
    """
    from twisted.internet.error import CannotListenError

    from aoe_twisted.initiator.client import AoEClientError

    handler = _COMMANDS[args.command]
    try:
        _check_control_args(args)
        client = _open_client(reactor, args)
        try:
            status: int = await Deferred.fromCoroutine(handler(reactor, client, args))
        finally:
            await client.close()
    except Interrupted as e:
        _error(str(e))
        return INTERRUPTED_STATUS
    except CancelledError:
        _error("interrupted")
        return INTERRUPTED_STATUS
    except (CommandError, AoEClientError, CannotListenError) as e:
        # CannotOpenInterface (no interface, namespace or permission) is a
        # CannotListenError whose str() is one line.
        _error(str(e))
        return 1
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        return 2
    except ValueError as e:
        _error(str(e))
        return 1
    except BrokenPipeError:
        # The reader of standard output went away (e.g. "| head"): not an error.  Point
        # standard output at /dev/null so that the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    return status


#: Runs twistd in this interpreter.  ``python -m twisted.scripts.twistd`` does not:
#: that module has no ``__main__`` block, so it exits 0 having done nothing
#: (Twisted 26.10), and ``python -m twisted`` is ``twist``, not ``twistd``.
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def twistd_argv(python: str | None = None) -> list[str]:
    """
    Return the argv that runs ``twistd`` with ``python`` (default: this interpreter).

    ``python -m twisted.scripts.twistd`` does nothing (that module has no
    ``__main__`` block), hence ``-c``.
    """
    return [python or sys.executable, "-c", _TWISTD]


def twistd_command(args: Sequence[str], python: str | None = None) -> list[str]:
    """
    Return the argv that runs ``twistd -n --pidfile= aoe ARGS`` with ``python``.

    ``-n`` keeps it in the foreground, logging to standard output; the empty
    ``--pidfile`` lets several servers run from one directory.
    """
    return [*twistd_argv(python), "-n", "--pidfile=", "aoe", *args]


def _serve(argv: list[str]) -> NoReturn:
    """Replace this process with ``twistd -n aoe ARGS`` (inside ``--netns NAME`` if given)."""
    prefix: list[str] = []
    if argv[:1] == ["--netns"] and len(argv) >= 2:
        prefix = ["ip", "netns", "exec", argv[1]]
        argv = argv[2:]
    elif argv and argv[0].startswith("--netns="):
        prefix = ["ip", "netns", "exec", argv[0].partition("=")[2]]
        argv = argv[1:]
    command = [*prefix, *twistd_command(argv)]
    try:
        os.execvp(command[0], command)
    except OSError as e:
        _error(f"cannot run {command[0]}: {e.strerror}")
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``aoe-twisted`` console script (and ``python -m aoe_twisted``)."""
    from twisted.internet import task

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # Everything after "serve" is twistd's ("serve --help" shows twistd aoe's help).
        _serve(argv[1:])
    if argv[:1] == ["ctl"]:
        # Everything after "ctl" is aoe_twisted.control.ctl's; it needs no raw socket.
        from aoe_twisted.control.ctl import main as ctl_main

        ctl_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        _check_control_args(args)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        raise SystemExit(2) from None
    _start_logging(args.verbose)
    state = {"finished": False, "interrupted": False, "cancelled": False}

    def _main(reactor: Any) -> Deferred[None]:
        def shutting_down() -> None:
            if not state["finished"]:
                state["interrupted"] = True

        reactor.addSystemEventTrigger("before", "shutdown", shutting_down)

        async def body() -> None:
            status = await run_command(reactor, args)
            state["finished"] = True
            if status:
                raise SystemExit(status)

        running = Deferred.fromCoroutine(body())

        def interrupt() -> None:
            # The first Ctrl-C cancels the command, which stops its transfer and says
            # how far it got; a second one (if that hangs) stops the reactor at once.
            if state["finished"]:
                return
            if state["cancelled"]:
                reactor.stop()
                return
            state["cancelled"] = True
            running.cancel()

        # Replaces the reactor's own handler (installed before this runs), which
        # would stop the reactor under the command.
        signal.signal(signal.SIGINT, lambda number, frame: reactor.callFromThread(interrupt))
        return running

    try:
        task.react(_main)
    except SystemExit:
        if state["interrupted"]:
            _error("interrupted")
            raise SystemExit(INTERRUPTED_STATUS) from None
        raise
    except KeyboardInterrupt:
        # Ctrl-C before the reactor ran (or after it stopped): nothing was transferred.
        _error("interrupted")
        raise SystemExit(INTERRUPTED_STATUS) from None
