# -*- test-case-name: tests.test_control -*-
"""
``aoe-twisted ctl``: look at and change a running ``twistd aoe`` through its control socket.

::

    aoe-twisted ctl [--socket PATH] list [--json]
    aoe-twisted ctl stats [--watch [--interval S]] [--json]
    aoe-twisted ctl initiators [--json]
    aoe-twisted ctl add 1.0=file:/srv/aoe/disk0.img[,read_only=on] [KEY=VALUE ...]
    aoe-twisted ctl remove e1.0
    aoe-twisted ctl set e1.0 read_only=on mask=52:54:00:12:34:56
    aoe-twisted ctl reload

The socket is ``--socket``, else ``$AOE_TWISTED_CONTROL``, else
``/run/aoe-twisted/control.sock``.  Each command prints a table or a line,
or with ``--json`` the server's answer as one line of JSON (``stats
--watch --json``: one line per report).  A failure is one line on standard
error and exit status 1 (a usage error: status 2); ``stats --watch`` runs
until Ctrl-C and then exits 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.protocols import amp

from aoe_twisted.control.commands import (
    DEFAULT_SOCKET,
    SOCKET_ENVIRONMENT,
    Add,
    ControlError,
    Initiators,
    InternalError,
    List,
    PermissionDenied,
    Reload,
    Remove,
    Set,
    Stats,
)
from aoe_twisted.core.stats import INTERFACE_FIGURES
from aoe_twisted.units import parse_address

__all__ = ["CtlError", "build_parser", "default_socket", "main", "rates", "run"]

PROG = "aoe-twisted ctl"
#: The exit status of a command interrupted by SIGINT (128 + 2), as a shell reports it.
INTERRUPTED_STATUS = 130


class UsageError(Exception):
    """The command line is wrong: one line, exit status 2."""


class CtlError(Exception):
    """The command failed: ``str`` is the one line to print; exit status 1."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, raised rather than printed."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {PROG} --help)")


def default_socket() -> str:
    """Return the socket to use without ``--socket``: ``$AOE_TWISTED_CONTROL``, or the default."""
    return os.environ.get(SOCKET_ENVIRONMENT) or DEFAULT_SOCKET


def _address(text: str) -> str:
    """A target address (``e1.0`` or ``1.0``), checked here and passed on as written."""
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _target(text: str) -> str:
    """``ADDRESS=SCHEME:SPEC[,key=value...]``, as ``twistd aoe --target``."""
    address, equals, backend = text.partition("=")
    if not equals or not backend:
        raise argparse.ArgumentTypeError(
            f"not a target: {text!r} (expected ADDRESS=SCHEME:SPEC, e.g. 1.0=file:/srv/disk.img)")
    _address(address)
    return text


def _setting(text: str) -> str:
    """
    ``KEY=VALUE`` (the value may be empty: ``mask=`` empties the mask list), or a bare ``KEY``.

    A bare key is a boolean set on (``ro``, ``sync``); the server checks the
    keys and values (``aoe_twisted.config.parse_target_settings``).
    """
    key = text.partition("=")[0]
    if not key or key.startswith("-"):
        raise argparse.ArgumentTypeError(f"not a setting: {text!r} (expected KEY=VALUE)")
    return text


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the interval must be a positive number, not {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"the count must be at least 1, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``aoe-twisted ctl``'s command line."""
    parser = _Parser(
        prog=PROG,
        description="Look at and change a running 'twistd aoe' through its control socket.",
        epilog=f"The socket is --socket, else ${SOCKET_ENVIRONMENT}, else {DEFAULT_SOCKET}.",
    )
    socket_help = f"the server's control socket (default: {default_socket()})"
    parser.add_argument("--socket", metavar="PATH", default=default_socket(), help=socket_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    common = _Parser(add_help=False)
    # Also after the command; SUPPRESS keeps the subcommand from resetting the value.
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help=socket_help)
    common.add_argument("--json", action="store_true",
                        help="print the server's answer as one line of JSON")

    commands.add_parser("list", parents=[common], help="list the served targets",
                        description="List the served targets and their options.")
    stats = commands.add_parser(
        "stats", parents=[common], help="show the counters per target and interface",
        description="Show the counters per target and per interface; with --watch, "
        "rates every interval (like iostat) until Ctrl-C.")
    stats.add_argument("--watch", action="store_true",
                       help="print rates every interval until Ctrl-C")
    stats.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                       help="seconds between --watch reports (default 1)")
    stats.add_argument("--count", type=_count, default=None, help=argparse.SUPPRESS)
    commands.add_parser("initiators", parents=[common], help="list the initiators heard",
                        description="List the initiators the server has heard from.")
    add = commands.add_parser(
        "add", parents=[common], help="serve a new target",
        description="Start serving a target: ADDRESS=SCHEME:SPEC[,key=value...] as "
        "'twistd aoe --target', then more per-target options as KEY=VALUE.")
    add.add_argument("target", type=_target, metavar="ADDRESS=SCHEME:SPEC[,key=value...]")
    add.add_argument("settings", type=_setting, nargs="*", metavar="KEY=VALUE")
    remove = commands.add_parser("remove", parents=[common], help="stop serving a target",
                                 description="Stop serving a target.")
    remove.add_argument("address", type=_address, metavar="ADDRESS")
    change = commands.add_parser(
        "set", parents=[common], help="change a target's options",
        description="Change a served target's options: read_only=on|off, mask=MAC "
        "(repeat it; mask= empties the list), config_string=TEXT, buffer_count=N, "
        "max_sectors=N.")
    change.add_argument("address", type=_address, metavar="ADDRESS")
    change.add_argument("settings", type=_setting, nargs="+", metavar="KEY=VALUE")
    commands.add_parser("reload", parents=[common], help="re-read the config file",
                        description="Re-read the server's config file and apply the "
                        "difference; a broken file changes nothing.")
    return parser


# -- talking to the server ---------------------------------------------------------


#: The longest path a UNIX socket address holds (``sun_path`` less its final NUL).
_MAX_PATH = 107


class _Client(amp.AMP):
    """The ``ctl`` end of the connection; ``closed`` fires when it is closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)


async def connect(reactor: Any, path: str) -> _Client:
    """Connect to the control socket at ``path``; raise ``CtlError`` (one line) if it cannot."""
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    if len(os.fsencode(path)) > _MAX_PATH:
        # Twisted's connect fails with a TypeError of its own on such a path.
        raise CtlError(f"cannot connect to {path}: the path is longer than a UNIX socket's "
                       f"{_MAX_PATH} bytes")
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise CtlError(f"cannot connect to {path}: not a socket")
    except OSError:
        pass  # connecting says what is wrong
    try:
        return await connectProtocol(UNIXClientEndpoint(reactor, path), _Client())
    except ConnectError as e:
        code = e.osError if isinstance(e.osError, int) else None
        reason = os.strerror(code) if code else (e.args[0] if e.args else "failed")
        if code in (errno.EACCES, errno.EPERM):
            raise CtlError(f"permission denied: cannot connect to {path}: {reason} (only root, "
                           "the server's user and the socket's group may)") from None
        if code in (errno.ENOENT, errno.ECONNREFUSED):
            raise CtlError(f"cannot connect to {path}: {reason} "
                           "(is twistd aoe running with a control socket?)") from None
        raise CtlError(f"cannot connect to {path}: {reason}") from None


async def call(proto: amp.AMP, path: str, command: type[amp.Command], **kwargs: Any) -> Any:
    """Send ``command``; return its answer, or raise ``CtlError`` with the server's one line."""
    try:
        return await proto.callRemote(command, **kwargs)
    except (ControlError, PermissionDenied, InternalError) as e:
        raise CtlError(str(e) or type(e).__name__) from None
    except ConnectionClosed:
        raise CtlError(f"the server at {path} closed the connection") from None
    except amp.TooLong:
        raise CtlError("the command is too long for the control socket") from None
    except amp.RemoteAmpError as e:
        raise CtlError(f"the server at {path} refused {command.__name__.lower()}: "
                       f"{e.description}") from None


async def run(reactor: Any, args: argparse.Namespace, out: Any = None) -> int:
    """Run the command ``args`` names against the server; return the exit status."""
    out = sys.stdout if out is None else out
    proto = await connect(reactor, args.socket)
    try:
        return await _COMMANDS[args.command](reactor, proto, args, out)
    finally:
        if proto.transport is not None:
            proto.transport.loseConnection()
        await proto.closed


# -- output ---------------------------------------------------------------------------


def _human(size: float) -> str:
    """Return ``size`` bytes as ``64.0 MiB``."""
    from aoe_twisted.initiator.cli import human

    return human(size)


def _table(rows: Sequence[Sequence[Any]], right: str = "") -> str:
    """
    Return ``rows`` (the first is the header) as aligned columns.

    ``right`` holds one character per column: ``>`` right-aligns it (numbers).
    """
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in cells:
        parts = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if i < len(right) and right[i] == ">":
                parts.append(cell.rjust(widths[i]))
            else:
                parts.append(cell if last else cell.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _json_line(value: Any, out: Any) -> None:
    out.write(json.dumps(value, sort_keys=True) + "\n")


def _mode(listing: dict[str, Any]) -> str:
    mode = ["ro" if listing.get("read_only") else "rw"]
    mode += [flag for flag in ("sync", "direct") if listing.get(flag)]
    return ",".join(mode)


def _notes(listing: dict[str, Any]) -> str:
    """What a listing has to say beyond the columns: slices, duplicates, other paths."""
    notes = []
    offset, length = listing.get("offset") or 0, listing.get("length") or 0
    if offset or length:
        notes.append(f"slice from {offset}" + (f" length {length}" if length else ""))
    if listing.get("duplicate_of"):
        notes.append(f"duplicate of {listing['duplicate_of']}")
    if listing.get("paths"):
        notes.append("paths " + ",".join(listing["paths"]))
    if listing.get("config_string"):
        notes.append(f"config {listing['config_string']!r}")
    return "; ".join(notes)


def format_list(targets: Sequence[dict[str, Any]]) -> str:
    """Return the ``list`` table."""
    if not targets:
        return "no targets"
    rows: list[Sequence[Any]] = [
        ("TARGET", "STATE", "SIZE", "MODE", "BACKEND", "INTERFACES", "MASK", "NOTES")]
    for t in targets:
        rows.append((
            t.get("target", "?"), t.get("state", "?"), _human(t.get("size") or 0), _mode(t),
            t.get("backend", "?"), ",".join(t.get("interfaces") or []) or "-",
            len(t.get("mask") or []) or "-", _notes(t)))
    return _table(rows, "<<><<<>")


def _summary(listing: dict[str, Any]) -> str:
    """One line about a target: address, backend, size, mode, state, notes."""
    details = [_human(listing.get("size") or 0), _mode(listing), listing.get("state", "?")]
    if listing.get("mask"):
        details.append(f"mask {', '.join(listing['mask'])}")
    notes = _notes(listing)
    if notes:
        details.append(notes)
    return f"{listing.get('target', '?')} = {listing.get('backend', '?')} ({'; '.join(details)})"


_KINDS = ("read", "write", "identify", "flush", "other_ata", "config", "mask", "reserve")
_KIND_HEADERS = ("READS", "WRITES", "IDENT", "FLUSH", "ATA", "CONFIG", "MASK", "RESERVE")


def format_stats(stats: dict[str, Any]) -> str:
    """Return the ``stats`` tables: one row per target, one per interface."""
    parts = []
    targets = stats.get("targets") or []
    if targets:
        rows: list[Sequence[Any]] = [("TARGET", *_KIND_HEADERS, "READ", "WRITTEN", "INFLIGHT",
                                      "RETRANS", "AVG MS", "ERRORS")]
        for t in targets:
            requests = t.get("requests") or {}
            service = t.get("service_seconds") or {}
            average = (f"{1000 * service['sum'] / service['count']:.3f}"
                       if service.get("count") else "-")
            errors = {k: v for k, v in (t.get("errors") or {}).items() if v}
            rows.append((
                t.get("target", "?"), *(requests.get(kind, 0) for kind in _KINDS),
                _human((t.get("bytes") or {}).get("read", 0)),
                _human((t.get("bytes") or {}).get("write", 0)),
                t.get("in_flight", 0), t.get("retransmits", 0), average,
                " ".join(f"{k}={v}" for k, v in sorted(errors.items())) or "-"))
        parts.append(_table(rows, "<" + ">" * 13))
    else:
        parts.append("no targets")
    interfaces = stats.get("interfaces") or []
    if interfaces:
        rows = [("INTERFACE", "MAC", "MTU", *(key.upper() for key in INTERFACE_FIGURES))]
        for i in interfaces:
            rows.append((i.get("interface", "?"), i.get("mac", "?"), i.get("mtu", "?"),
                         *(i.get(key, 0) for key in INTERFACE_FIGURES)))
        parts.append(_table(rows, "<<>" + ">" * len(INTERFACE_FIGURES)))
    return "\n\n".join(parts)


def _ago(seconds: float) -> str:
    """``3 s ago``, ``5 min ago``, ``2 h ago``, ``3 d ago``."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def format_initiators(initiators: Sequence[dict[str, Any]], now: float) -> str:
    """Return the ``initiators`` table; ``now`` is the snapshot's time."""
    if not initiators:
        return "no initiators heard"
    rows: list[Sequence[Any]] = [("INITIATOR", "TARGETS", "FRAMES", "LAST SEEN")]
    for i in initiators:
        last = i.get("last_seen")
        rows.append((i.get("mac", "?"), ",".join(i.get("targets") or []) or "-",
                     i.get("frames", 0), "never" if last is None else _ago(now - last)))
    return _table(rows, "<<>>")


def rates(previous: dict[str, Any], current: dict[str, Any],
          elapsed: float | None = None) -> dict[str, Any]:
    """
    Return the rates between two stats snapshots (``stats --watch``).

    The time between them is their ``time`` fields' difference (or
    ``elapsed`` if those do not advance).  A target or interface missing
    from ``previous`` has rates of ``None``.
    """
    seconds = (current.get("time") or 0) - (previous.get("time") or 0)
    if not seconds > 0:
        seconds = elapsed if elapsed and elapsed > 0 else 1.0
    before = {t.get("target"): t for t in previous.get("targets") or []}
    targets = []
    for t in current.get("targets") or []:
        old = before.get(t.get("target"))
        row: dict[str, Any] = {"target": t.get("target"), "in_flight": t.get("in_flight", 0)}
        if old is None:
            row.update(dict.fromkeys(
                ("reads_per_s", "writes_per_s", "read_kib_per_s", "write_kib_per_s",
                 "service_ms", "errors_per_s")))
        else:
            def delta(*keys: str, new: Any = t, was: Any = old) -> float:
                for key in keys[:-1]:
                    new, was = new.get(key) or {}, was.get(key) or {}
                return (new.get(keys[-1]) or 0) - (was.get(keys[-1]) or 0)

            done = delta("service_seconds", "count")
            row.update({
                "reads_per_s": delta("requests", "read") / seconds,
                "writes_per_s": delta("requests", "write") / seconds,
                "read_kib_per_s": delta("bytes", "read") / 1024 / seconds,
                "write_kib_per_s": delta("bytes", "write") / 1024 / seconds,
                "service_ms": 1000 * delta("service_seconds", "sum") / done if done else None,
                "errors_per_s": (sum((t.get("errors") or {}).values())
                                 - sum((old.get("errors") or {}).values())) / seconds,
            })
        targets.append(row)
    before = {i.get("interface"): i for i in previous.get("interfaces") or []}
    interfaces = []
    for i in current.get("interfaces") or []:
        old = before.get(i.get("interface"))
        row = {"interface": i.get("interface")}
        for key in INTERFACE_FIGURES:
            row[f"{key}_per_s"] = (None if old is None
                                   else ((i.get(key) or 0) - (old.get(key) or 0)) / seconds)
        interfaces.append(row)
    return {"time": current.get("time"), "seconds": seconds, "targets": targets,
            "interfaces": interfaces}


def _rate(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_rates(report: dict[str, Any]) -> str:
    """Return one ``stats --watch`` report: a block of target rates, then interface rates."""
    stamp = time.strftime("%H:%M:%S", time.localtime(report.get("time") or time.time()))
    rows: list[Sequence[Any]] = [(stamp, "r/s", "w/s", "rkB/s", "wkB/s", "inflight",
                                  "svc ms", "err/s")]
    for t in report["targets"]:
        rows.append((t["target"], _rate(t["reads_per_s"]), _rate(t["writes_per_s"]),
                     _rate(t["read_kib_per_s"]), _rate(t["write_kib_per_s"]), t["in_flight"],
                     _rate(t["service_ms"], 3), _rate(t["errors_per_s"])))
    parts = [_table(rows, "<>>>>>>>")]
    if report["interfaces"]:
        rows = [("interface", "rx/s", "tx/s", "ignored/s", "dropped/s", "malformed/s",
                 "stale/s")]
        for i in report["interfaces"]:
            rows.append((i["interface"],
                         *(_rate(i[f"{key}_per_s"]) for key in INTERFACE_FIGURES)))
        parts.append(_table(rows, "<" + ">" * len(INTERFACE_FIGURES)))
    return "\n".join(parts) + "\n"


# -- the commands ------------------------------------------------------------------------


async def cmd_list(reactor: Any, proto: amp.AMP, args: argparse.Namespace, out: Any) -> int:
    targets = (await call(proto, args.socket, List))["targets"]
    if args.json:
        _json_line(targets, out)
    else:
        out.write(format_list(targets) + "\n")
    return 0


async def cmd_stats(reactor: Any, proto: amp.AMP, args: argparse.Namespace, out: Any) -> int:
    if args.watch:
        return await _watch(reactor, proto, args, out)
    stats = (await call(proto, args.socket, Stats))["stats"]
    if args.json:
        _json_line(stats, out)
    else:
        out.write(format_stats(stats) + "\n")
    return 0


async def _watch(reactor: Any, proto: amp.AMP, args: argparse.Namespace, out: Any) -> int:
    """Print rates every ``--interval`` seconds (``--count`` reports, else until Ctrl-C)."""
    from twisted.internet.task import LoopingCall

    state: dict[str, Any] = {"previous": None, "when": 0.0, "reports": 0}

    async def tick() -> None:
        stats = (await call(proto, args.socket, Stats))["stats"]
        now = reactor.seconds()
        previous, state["previous"] = state["previous"], stats
        elapsed, state["when"] = now - state["when"], now
        if previous is None:
            return
        report = rates(previous, stats, elapsed)
        if args.json:
            _json_line(report, out)
        else:
            out.write(format_rates(report) + "\n")
        out.flush()
        state["reports"] += 1
        if args.count is not None and state["reports"] >= args.count:
            loop.stop()

    loop = LoopingCall(lambda: Deferred.fromCoroutine(tick()))
    loop.clock = reactor
    await loop.start(args.interval, now=True)
    return 0


async def cmd_initiators(reactor: Any, proto: amp.AMP, args: argparse.Namespace,
                         out: Any) -> int:
    answer = await call(proto, args.socket, Initiators)
    if args.json:
        _json_line(answer["initiators"], out)
    else:
        out.write(format_initiators(answer["initiators"], answer["time"]) + "\n")
    return 0


async def _change(verb: str, proto: amp.AMP, args: argparse.Namespace, out: Any,
                  command: type[amp.Command], **kwargs: Any) -> int:
    listing = (await call(proto, args.socket, command, **kwargs))["target"]
    if args.json:
        _json_line(listing, out)
    else:
        out.write(f"{verb} {_summary(listing)}\n")
    return 0


async def cmd_add(reactor: Any, proto: amp.AMP, args: argparse.Namespace, out: Any) -> int:
    return await _change("added", proto, args, out, Add, target=args.target,
                         settings=args.settings)


async def cmd_remove(reactor: Any, proto: amp.AMP, args: argparse.Namespace, out: Any) -> int:
    return await _change("removed", proto, args, out, Remove, address=args.address)


async def cmd_set(reactor: Any, proto: amp.AMP, args: argparse.Namespace, out: Any) -> int:
    return await _change("changed", proto, args, out, Set, address=args.address,
                         settings=args.settings)


def _names(items: Sequence[Any]) -> str:
    return ", ".join(item.get("target", "?") if isinstance(item, dict) else str(item)
                     for item in items)


async def cmd_reload(reactor: Any, proto: amp.AMP, args: argparse.Namespace, out: Any) -> int:
    result = (await call(proto, args.socket, Reload))["result"]
    if args.json:
        _json_line(result, out)
        return 0
    lines = [result["message"]] if result.get("message") else []
    for key in ("added", "removed", "changed"):
        if result.get(key):
            lines.append(f"{key}: {_names(result[key])}")
    if "unchanged" in result:
        lines.append(f"unchanged: {result['unchanged']}")
    out.write("\n".join(lines or ["reloaded"]) + "\n")
    return 0


_COMMANDS: dict[str, Callable[[Any, amp.AMP, argparse.Namespace, Any], Any]] = {
    "list": cmd_list,
    "stats": cmd_stats,
    "initiators": cmd_initiators,
    "add": cmd_add,
    "remove": cmd_remove,
    "set": cmd_set,
    "reload": cmd_reload,
}


# -- running --------------------------------------------------------------------------------


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """``aoe-twisted ctl ARGS`` (``argv`` is what follows ``ctl``)."""
    from twisted.internet import task

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        raise SystemExit(2) from None
    watching = args.command == "stats" and args.watch
    _log_errors_in_one_line()
    state = {"finished": False, "interrupted": False, "status": 0}

    def _main(reactor: Any) -> Deferred[None]:
        def shutting_down() -> None:
            if not state["finished"]:
                state["interrupted"] = True

        reactor.addSystemEventTrigger("before", "shutdown", shutting_down)

        async def body() -> None:
            try:
                state["status"] = await run(reactor, args)
            except CtlError as e:
                if state["interrupted"]:
                    return
                _error(str(e))
                state["status"] = 1
            except BrokenPipeError:
                _quiet_stdout()
            except Exception as e:
                # A bug, or an answer this version cannot read: still one line.
                _error(f"unexpected error: {type(e).__name__}: {e}")
                state["status"] = 1
            state["finished"] = True

        return Deferred.fromCoroutine(body())

    try:
        task.react(_main)
    except SystemExit:
        pass
    except KeyboardInterrupt:
        # Ctrl-C before the reactor ran its signal handlers in.
        state["interrupted"] = True
    if state["interrupted"]:
        if watching:
            raise SystemExit(0)
        _error("interrupted")
        raise SystemExit(INTERRUPTED_STATUS)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    raise SystemExit(state["status"])


def _log_errors_in_one_line() -> None:
    """
    Send Twisted's own error log events to standard error as one line each.

    ``ctl`` logs nothing itself; this only keeps an unforeseen error inside
    Twisted from printing a traceback.
    """
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) < LogLevel.error:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += ": " + failure.getErrorMessage()
        _error(text)

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _quiet_stdout() -> None:
    """The reader of standard output went away (``| head``): point it at /dev/null, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    main()
