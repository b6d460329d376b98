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
    aoe-twisted serve --iface eth0 --backend memory:64M     (twistd -n aoe ...)

Every command but ``serve`` opens a raw socket, so it needs root or
``CAP_NET_RAW``; ``--netns NAME`` opens it inside network namespace NAME
(as made by ``ip netns add``).  A failure is one line on standard error and
exit status 1; a usage error is one line and status 2.  Long transfers show
a progress bar on standard error when it is a terminal.

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
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

from twisted.internet.defer import Deferred, gatherResults

from aoe_twisted import __version__
from aoe_twisted.core.wire import SECTOR_SIZE, format_mac
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

    def emit(data: bytes) -> None:
        nonlocal position
        if args.hexdump:
            out.write(("\n".join(hexdump(data, position)) + "\n").encode("ascii"))
        else:
            out.write(data)
        position += len(data)

    try:
        await _pipelined(
            (disk.read_at(o, n, progress.advance) for o, n in _segments(offset, length)), emit
        )
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
                yield disk.write_at(offset, data, progress.advance)
                offset += len(data)
                written += len(data)

        try:
            await _pipelined(writes(), lambda _: None)
            if not args.no_flush:
                await disk.flush()
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
) -> tuple[int, float]:
    """Run random single-frame operations of ``sectors`` sectors; return (ops, seconds)."""
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

    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(depth)],
                        consumeErrors=True)
    return issued, float(reactor.seconds() - start)


async def cmd_bench(reactor: Any, client: AoEClient, args: argparse.Namespace) -> int:
    """Measure sequential MB/s and random IOPS, printing a table."""
    from twisted.internet.defer import FirstError

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
    print(f"{'test':<28}{'ops':>9}{'MiB':>10}{'seconds':>10}{'MB/s':>10}{'IOPS':>10}")

    def report(label: str, ops: int, nbytes: int, seconds: float) -> None:
        seconds = max(seconds, 1e-9)
        print(f"{label:<28}{ops:>9}{nbytes / (1 << 20):>10.1f}{seconds:>10.3f}"
              f"{nbytes / seconds / 1e6:>10.2f}{ops / seconds:>10.0f}")

    frames = -(-region // (per * SECTOR_SIZE))

    async def sequential(write: bool) -> None:
        data = os.urandom(region) if write else b""
        pieces = _segments(0, region)
        await _pipelined(
            (disk.write(o // SECTOR_SIZE, data[o : o + n]) if write
             else disk.read(o // SECTOR_SIZE, n // SECTOR_SIZE) for o, n in pieces),
            lambda _: None,
        )

    try:
        seconds = await _timed(reactor, lambda: Deferred.fromCoroutine(sequential(False)))
        report("sequential read", frames, region, seconds)
        if args.write:
            seconds = await _timed(reactor, lambda: Deferred.fromCoroutine(sequential(True)))
            report("sequential write", frames, region, seconds)
        tests = [(f"random read {n} sector{'s' if n > 1 else ''}", n, False)
                 for n in dict.fromkeys((1, per))]
        if args.write:
            tests += [(f"random write {n} sector{'s' if n > 1 else ''}", n, True)
                      for n in dict.fromkeys((1, per))]
        for label, n, write in tests:
            ops, seconds = await _random_io(reactor, disk, n, region, write, args, rng)
            report(label, ops, ops * n * SECTOR_SIZE, seconds)
    except FirstError as e:
        e.subFailure.raiseException()
    if _several(client, disk):
        for path in disk.paths.paths:
            print(f"path {path.state()}")
    return 0


_COMMANDS: dict[str, Callable[[Any, AoEClient, argparse.Namespace], Any]] = {
    "discover": cmd_discover,
    "info": cmd_info,
    "read": cmd_read,
    "write": cmd_write,
    "bench": cmd_bench,
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
    """
    from twisted.internet.error import CannotListenError

    from aoe_twisted.initiator.client import AoEClientError

    handler = _COMMANDS[args.command]
    try:
        client = _open_client(reactor, args)
        try:
            status: int = await Deferred.fromCoroutine(handler(reactor, client, args))
        finally:
            await client.close()
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
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        raise SystemExit(2) from None
    _start_logging(args.verbose)
    state = {"finished": False, "interrupted": False}

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

        return Deferred.fromCoroutine(body())

    try:
        task.react(_main)
    except SystemExit:
        if state["interrupted"]:
            _error("interrupted")
            raise SystemExit(130) from None
        raise
