# -*- test-case-name: tests.test_tap -*-
"""
``twistd aoe``: the command line of the AoE target and the service it builds.

Options are checked here, in ``Options``, so that every bad value stops
``twistd`` with one line naming the option (an option that takes one value
and is given twice included); backends are opened in ``makeService``,
before ``twistd`` drops privileges, and the state directory is checked
there too, for the user ``twistd --uid``/``--gid`` will switch to.

The service ``makeService`` returns is the server's (``AoEService``, or
``WorkersService`` for ``--workers``) with what running under ``twistd``
adds (``ServesUnderTwistd``): ``SIGHUP`` is handled instead of ending the
process.
"""

from __future__ import annotations

import functools
import getopt
import os
import signal
from collections.abc import Callable
from typing import Any

from attrs import evolve
from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from aoe_twisted.config import ConfigError, ServerConfig
from aoe_twisted.core.acl import MASK_LIST_LIMIT
from aoe_twisted.core.wire import BROADCAST_MAJOR, BROADCAST_MINOR, MAX_CONFIG_STRING, parse_mac
from aoe_twisted.net.ring import MAX_STALE_AFTER, STALE_AFTER
from aoe_twisted.units import parse_address

__all__ = ["HangupHandler", "Options", "ServesUnderTwistd", "makeService"]

_log = Logger()

_MAX_BUFFER_COUNT = 0xFFFF

#: What to do instead, for the single-value options a user most often repeats by mistake.
_INSTEAD = {
    "backend": "serve more disks with --target SHELF.SLOT=SCHEME:SPEC",
    "shelf": "--shelf and --slot address the one --backend target; "
    "other targets are --target SHELF.SLOT=SCHEME:SPEC",
    "slot": "--shelf and --slot address the one --backend target; "
    "other targets are --target SHELF.SLOT=SCHEME:SPEC",
}


def _int_in(option: str, text: str, low: int, high: int) -> int:
    """Parse ``text`` as an integer in ``[low, high]``, or fail naming ``option``."""
    try:
        value = int(text, 0)
    except ValueError:
        raise usage.UsageError(f"--{option}: not a number: {text!r}") from None
    if not low <= value <= high:
        raise usage.UsageError(f"--{option}: must be {low}..{high}, not {value}")
    return value


def _ring_frames(text: str, buffer_count: int) -> int:
    """
    Parse ``--ring-frames``: a number of receive ring slots that holds one full window.

    A ring smaller than the buffer count would make the count advertised a
    promise the server breaks for a single busy initiator, so it is refused.
    """
    from aoe_twisted.net.ring import MAX_RING_FRAMES, MIN_RING_FRAMES

    frames = _int_in("ring-frames", text, MIN_RING_FRAMES, MAX_RING_FRAMES)
    if frames < buffer_count:
        raise usage.UsageError(
            f"--ring-frames: {frames} frames do not hold one full window of "
            f"--buffer-count {buffer_count}"
        )
    return frames


class Options(usage.Options):
    """The options of ``twistd aoe``."""

    synopsis = (
        "[options] --iface IFACE [--iface IFACE ...] "
        "(--backend SCHEME:SPEC | --target S.N=SCHEME:SPEC ...)"
    )
    longdesc = (
        "Export disks as ATA over Ethernet (AoEr11) targets on one or more Ethernet "
        "interfaces. Needs CAP_NET_RAW. Example: "
        "twistd -n aoe --iface eth0 --backend file:disk.img. "
        "Each --iface answers from its own MAC with a sector count from its own MTU, "
        "so initiators use every one (AoE multipath). An interface that goes down, or "
        "is removed and created again, is served again when it is back; with several, "
        "one that does not exist yet at start-up is waited for."
    )

    optFlags = [
        ["read-only", "r", "Export every target read-only: writes are refused with ATA ABRT."],
        ["sync", None, "Acknowledge a write only once it is on stable storage (fdatasync, "
         "one per disk for each burst of writes); survives power loss. Default: acknowledged "
         "in the page cache, durable at FLUSH CACHE."],
        ["direct", None, "Open file: and block: disks O_DIRECT, bypassing the server's page "
         "cache (refused for other backends)."],
        ["help-backends", None, "List the installed backend schemes and exit."],
    ]
    optParameters = [
        ["config", None, None, "Read the server and its targets from this TOML file "
         "(docs/operations.md); SIGHUP or `aoe-twisted ctl reload` re-read it and apply "
         "the difference. Not with the options that describe targets or interfaces."],
        ["control", None, None, "Listen for `aoe-twisted ctl` on this UNIX socket "
         "(mode 0600; e.g. /run/aoe-twisted/control.sock)."],
        ["control-group", None, None, "Let this group's members use --control too (mode 0660)."],
        ["metrics", None, None, "Serve Prometheus metrics at http://[HOST:]PORT/metrics "
         "(HOST defaults to 127.0.0.1)."],
        ["removed-grace", None, "180", "Seconds a removed target's address answers ATA "
         "requests with an error, so an initiator's I/O to it fails at once (0: silent)."],
        ["backend-timeout", None, "30", "Seconds a disk that answers later (nbd:, rbd:, "
         "thread:) has to complete a request before it gets an ATA error."],
        ["duplicate-wait", None, "0.5", "Seconds to wait for another server answering for an "
         "address before serving it (duplicate address detection; 0: do not wait)."],
        ["stale-after", None, str(STALE_AFTER), "Drop, unanswered, a request that waited in "
         "the receive ring longer than this many seconds while the server was stopped or "
         f"stalled (its initiator has retried it, perhaps elsewhere; 0..{MAX_STALE_AFTER}, "
         "0: never)."],
        ["backend", "b", None, "The disk of the target SHELF.SLOT, as SCHEME:SPEC "
         "(e.g. file:disk.img, memory:64M, block:/dev/sdb)."],
        ["shelf", "s", "0", "The shelf (major) address of --backend, 0..65534."],
        ["slot", "l", "0", "The slot (minor) address of --backend, 0..254."],
        ["config-string", "c", None, "The initial config string of every target "
         "(at most 1024 bytes)."],
        ["buffer-count", None, "64", "Requests each target accepts in flight from each "
         "initiator (1..65535), advertised in config replies. 64 is the most the Linux "
         "initiator uses; the receive ring holds four initiators' full windows of every "
         "target, up to --ring-frames."],
        ["ring-frames", None, None, "Cap each interface's receive ring at this many frames "
         "(256..65536; default 4096: 64 full windows of 64, 38 MiB at MTU 9000). The ring "
         "holds four windows of every target up to the cap, and never less than one full "
         "window of --buffer-count."],
        ["max-sectors", None, None, "Cap the sectors per ATA command below what the MTU allows "
         "(1..255)."],
        ["workers", "w", "1", "Serve from this many processes (1..64), sharing the interface "
         "by PACKET_FANOUT: one per core on a busy server. Each initiator's frames for a "
         "target stay with one worker."],
        ["state-dir", None, None, "Keep each target's config string, mask list and reserve "
         "list in DIR/eSHELF.SLOT.json, so they survive a restart (created if missing, owned "
         "by the twistd --uid user; must be writable by the user the server runs as, which "
         "is checked at start-up). --config-string and --mask only seed "
         "a target that has no state file yet: after that the file wins."],
    ]
    compData = usage.Completions(
        optActions={"iface": usage.CompleteNetInterfaces()},
    )

    def __init__(self) -> None:
        super().__init__()
        self["masks"] = []
        self["targets"] = []
        self["iface"] = []
        #: The options given on the command line (not defaults), by long name.
        self.given: set[str] = set()

    def opt_iface(self, name: str) -> None:
        """An Ethernet interface to serve every target on (required; repeatable)."""
        if not name or "/" in name or len(name) > 15:
            raise usage.UsageError(f"--iface: {name!r} is not an interface name")
        if name in self["iface"]:
            raise usage.UsageError(f"--iface: {name} is given twice")
        self["iface"].append(name)

    opt_i = opt_iface

    def opt_mask(self, mac: str) -> None:
        """Allow only this MAC address (repeatable): starts the target with a MAC mask list."""
        try:
            self["masks"].append(parse_mac(mac))
        except ValueError as e:
            raise usage.UsageError(f"--mask: {e}") from None

    def opt_target(self, text: str) -> None:
        """
        Serve another target: SHELF.SLOT=SCHEME:SPEC[,KEY[=VALUE]...] (repeatable).

        KEY is a per-target option: read_only (ro), sync, direct, offset, length,
        iface, mask, config_string, buffer_count, max_sectors (docs/options.md).
        """
        address, sep, backend = text.partition("=")
        if not sep or not backend:
            raise usage.UsageError(f"--target: expected SHELF.SLOT=SCHEME:SPEC, not {text!r}")
        try:
            parse_address(address)
        except ValueError as e:
            raise usage.UsageError(f"--target: {e}") from None
        self["targets"].append(text)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, turning any usage error into a one-line exit naming the option."""
        try:
            self._refuse_repeated(options)
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd aoe: {e}") from None
        except ConfigError as e:
            raise SystemExit(f"twistd aoe: {e}") from None

    def _refuse_repeated(self, argv: list[str] | None) -> None:
        """
        Refuse an option that holds one value (every ``optParameters`` entry) given twice.

        ``usage.Options`` keeps the last value, so ``--backend a.img
        --backend b.img`` would silently serve only ``b.img``: a mistake in
        a script or unit file that must stop start-up, not change which disk
        is exported.  Long and short forms count as one option; the
        repeatable options (``--iface``, ``--target``, ``--mask``) are
        ``opt_`` methods, not parameters, and are not checked here.  A
        command line getopt cannot parse is left to ``parseOptions``.
        """
        try:
            given, _ = getopt.getopt(list(argv or ()), self.shortOpt, self.longOpt)
        except getopt.error:
            return
        single = {parameter[0] for parameter in self.optParameters}
        seen: dict[str, str] = {}
        for flag, value in given:
            name = flag[2:] if flag.startswith("--") else flag[1:]
            name = self.synonyms.get(name, self.synonyms.get(name.replace("-", "_"), name))
            self.given.add(name)
            if name not in single:
                continue
            if name in seen:
                instead = _INSTEAD.get(name, "give it once")
                raise usage.UsageError(
                    f"--{name}: given twice ({_shown(seen[name])}, then {_shown(value)}); "
                    f"it takes one value: {instead}"
                )
            seen[name] = value

    def postOptions(self) -> None:
        """Check and convert the options into the server's configuration (``server-config``)."""
        if self["help-backends"]:
            from aoe_twisted.backendspec import format_backend_help

            print(format_backend_help())
            raise SystemExit(0)
        if self["config"] is not None:
            self._from_file()
            return
        self["server-config"] = self._from_command_line()

    def _from_file(self) -> None:
        """Load ``--config``; refuse the options that would say the same things twice."""
        clashing = sorted(self.given & _SERVING_OPTIONS)
        if clashing:
            raise usage.UsageError(
                f"--{clashing[0]}: not with --config (say it in {self['config']} instead)"
            )
        from aoe_twisted.config import load_config

        config = load_config(self["config"])
        self["server-config"] = config
        self["targets"] = list(config.targets)
        self["iface"] = list(config.interfaces)
        self["workers"] = config.workers
        self["state-dir"] = config.state_dir
        self["ring-frames"] = config.ring_frames

    def _from_command_line(self) -> ServerConfig:
        """Build the server's configuration from the command line's options."""
        from aoe_twisted.config import ServerConfig, parse_metrics, parse_target_option

        shelf = _int_in("shelf", self["shelf"], 0, BROADCAST_MAJOR - 1)
        slot = _int_in("slot", self["slot"], 0, BROADCAST_MINOR - 1)
        self["buffer-count"] = _int_in("buffer-count", self["buffer-count"], 1, _MAX_BUFFER_COUNT)
        if self["ring-frames"] is not None:
            self["ring-frames"] = _ring_frames(self["ring-frames"], self["buffer-count"])
        if self["max-sectors"] is not None:
            self["max-sectors"] = _int_in("max-sectors", self["max-sectors"], 1, 255)
        from aoe_twisted.net.fanout import MAX_WORKERS

        self["workers"] = _int_in("workers", self["workers"], 1, MAX_WORKERS)
        config = self["config-string"]
        if config is not None:
            encoded = config.encode("utf-8", "surrogateescape")
            if len(encoded) > MAX_CONFIG_STRING:
                raise usage.UsageError(
                    f"--config-string: {len(encoded)} bytes, at most {MAX_CONFIG_STRING}"
                )
            self["config-string"] = encoded
        if len(self["masks"]) > MASK_LIST_LIMIT:
            raise usage.UsageError(f"--mask: at most {MASK_LIST_LIMIT} MAC addresses")
        metrics = None
        if self["metrics"] is not None:
            try:
                metrics = parse_metrics(self["metrics"])
            except ValueError as e:
                raise usage.UsageError(f"--metrics: {e}") from None
        if self["control-group"] is not None and self["control"] is None:
            raise usage.UsageError("--control-group: needs --control")
        grace = _seconds("removed-grace", self["removed-grace"], 86400.0)
        wait = _seconds("duplicate-wait", self["duplicate-wait"], 60.0)
        timeout = _seconds("backend-timeout", self["backend-timeout"], 3600.0)
        if timeout <= 0:
            raise usage.UsageError("--backend-timeout: must be more than 0 seconds")
        stale_after = _int_in("stale-after", str(self["stale-after"]), 0, MAX_STALE_AFTER)
        defaults: dict[str, Any] = {
            "interfaces": tuple(self["iface"]),
            "buffer_count": self["buffer-count"],
            "max_sectors": self["max-sectors"],
            "read_only": bool(self["read-only"]),
            "sync": bool(self["sync"]),
            "direct": bool(self["direct"]),
            "mask": tuple(self["masks"]),
            "config_string": self["config-string"] or b"",
        }
        texts = list(self["targets"])
        if self["backend"]:
            texts.insert(0, None)
        if not texts:
            raise usage.UsageError("--backend: required (or one or more --target)")
        targets = []
        seen: set[tuple[int, int]] = set()
        for text in texts:
            try:
                if text is None:
                    # --backend's text is all backend, commas and all.
                    target = parse_target_option(f"{shelf}.{slot}=memory:1", defaults)
                    target = evolve(target, backend=self["backend"])
                else:
                    target = parse_target_option(text, defaults)
            except ValueError as e:
                option = "--backend" if text is None else f"--target {_shown(text)}"
                raise usage.UsageError(f"{option}: {e}") from None
            if target.key in seen:
                raise usage.UsageError(f"--target: {target.address} is given twice")
            if not target.interfaces:
                raise usage.UsageError(
                    "--iface: required (the Ethernet interface to serve on), or iface=NAME "
                    f"in each --target ({target.address} has none)"
                )
            seen.add(target.key)
            targets.append(target)
        self["targets"] = targets
        interfaces = list(self["iface"])
        for target in targets:
            interfaces += [name for name in target.interfaces if name not in interfaces]
        self["iface"] = interfaces
        return ServerConfig(
            interfaces=tuple(interfaces),
            control=self["control"],
            control_group=self["control-group"],
            metrics=metrics,
            state_dir=self["state-dir"],
            buffer_count=self["buffer-count"],
            max_sectors=self["max-sectors"],
            sync=bool(self["sync"]),
            direct=bool(self["direct"]),
            read_only=bool(self["read-only"]),
            workers=self["workers"],
            ring_frames=self["ring-frames"],
            removed_grace=grace,
            duplicate_wait=wait,
            backend_timeout=timeout,
            stale_after=stale_after,
            targets=tuple(targets),
        )


#: The options that describe the targets or the server, which ``--config`` says instead.
_SERVING_OPTIONS = frozenset({
    "iface", "target", "backend", "shelf", "slot", "mask", "config-string", "read-only",
    "sync", "direct", "buffer-count", "ring-frames", "max-sectors", "workers", "state-dir",
    "control", "control-group", "metrics", "removed-grace", "duplicate-wait", "backend-timeout",
    "stale-after",
})


def _seconds(option: str, text: str, high: float) -> float:
    """Parse a number of seconds in ``[0, high]`` for ``--option``."""
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"--{option}: not a number of seconds: {text!r}") from None
    if not 0 <= value <= high:
        raise usage.UsageError(f"--{option}: must be 0..{high:g} seconds, not {text}")
    return value


def _shown(value: str) -> str:
    """Quote an option's value for a one-line message, shortened if it is long."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


class HangupHandler:
    """
    What ``SIGHUP`` does while the server runs: ``on_hangup`` is called in the reactor thread.

    Without a handler the signal's default action ends the process (exit
    status 129, not a line in the log): an administrator's ``kill -HUP`` or
    ``systemctl reload`` would stop every target at once.  The handler only
    queues the call with ``reactor.callFromThread``, as the reactor's own
    SIGINT and SIGTERM handlers do: a Python signal handler runs between two
    bytecodes of whatever the main thread was doing, so nothing else may
    happen there; ``callFromThread`` also wakes the reactor.

    ``install`` must be called from the main thread (``startService`` is,
    under ``twistd``); ``restore`` puts back the handler it replaced.
    """

    def __init__(self, on_hangup: Callable[[], None], reactor: Any = None) -> None:
        self.on_hangup = on_hangup
        self.reactor = reactor
        self._previous: Any = None
        self.installed = False

    def install(self) -> None:
        """Handle SIGHUP from now on, remembering the handler it replaces."""
        if self.installed:
            return
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        self._previous = signal.signal(signal.SIGHUP, self._received)
        self.installed = True

    def restore(self) -> None:
        """Put back the handler ``install`` replaced (the default if it was not Python's)."""
        if not self.installed:
            return
        previous = signal.SIG_DFL if self._previous is None else self._previous
        signal.signal(signal.SIGHUP, previous)
        self.installed = False

    def _received(self, signum: int, frame: object) -> None:
        """The signal handler: queue ``on_hangup`` for the reactor thread, nothing else."""
        self.reactor.callFromThread(self.on_hangup)


def nothing_to_reload(targets: int, interfaces: list[str]) -> Callable[[], None]:
    """
    Return the SIGHUP action of a server started from its command line: say so, keep serving.

    An administrator sends SIGHUP expecting a reload (as with ggaoed, or a
    unit's ``ExecReload``); a server with nothing to re-read must say that
    nothing changed, in one line, rather than end or stay silent.
    """
    served = f"{targets} target{'s' if targets != 1 else ''} on {', '.join(interfaces)}"

    def hangup() -> None:
        _log.warn(
            "SIGHUP: nothing to reload (started without --config: the command line is "
            "read once, at start-up); still serving {served}",
            served=served,
        )

    return hangup


class ServesUnderTwistd:
    """
    What running under ``twistd`` adds to the server's service: ``SIGHUP`` is handled.

    Mixed in before ``AoEService`` or ``WorkersService`` (``_under_twistd``)
    so that the service ``makeService`` returns is still the server's, with
    its ``targets`` and options.  The handler is installed once the server
    has started (after ``twistd --uid`` dropped privileges) and the previous
    one restored once it has stopped: a SIGHUP while the ports close and the
    disks are flushed must not end the process either.
    """

    hangup: HangupHandler
    extras: list[Any] = []

    def privilegedStartService(self) -> None:
        """Open the server's sockets, and the extras' (the control socket) while privileged."""
        super().privilegedStartService()  # type: ignore[misc]
        for extra in self.extras:
            try:
                extra.privilegedStartService()
            except Exception as e:
                raise SystemExit(f"twistd aoe: {e}") from None

    def startService(self) -> None:
        """Start serving, then handle SIGHUP and start the extras (control, metrics)."""
        super().startService()  # type: ignore[misc]
        self.hangup.install()
        for extra in self.extras:
            if not extra.running:
                try:
                    extra.startService()
                except Exception as e:
                    raise SystemExit(f"twistd aoe: {e}") from None

    def stopService(self) -> Any:
        """Stop the extras and serving; then give SIGHUP back to the handler it had before."""
        from twisted.internet import defer

        stopping = [
            defer.maybeDeferred(extra.stopService) for extra in self.extras if extra.running
        ]
        d = defer.gatherResults(stopping, consumeErrors=True)
        d.addBoth(lambda _: super(ServesUnderTwistd, self).stopService())  # type: ignore[misc]

        def restore(result: object) -> object:
            self.hangup.restore()
            return result

        return d.addBoth(restore)


@functools.cache
def _under_twistd(server: type) -> type:
    """Return ``server`` (a service class) with ``ServesUnderTwistd`` mixed in."""
    return type(
        server.__name__,
        (ServesUnderTwistd, server),
        {"__module__": __name__, "__doc__": f"{server.__doc__}\n\n{ServesUnderTwistd.__doc__}"},
    )


def _service_user(options: Options | dict[str, Any]) -> tuple[int | None, int | None]:
    """
    Return the ``(uid, gid)`` ``twistd`` will switch to after ``makeService``, or ``None``s.

    ``twistd`` parses its own options (``--uid``, ``--gid``) before the
    plugin's, and gives the plugin's ``Options`` its own as ``parent``; the
    gid defaults to the user's, as ``twistd`` does.  Outside ``twistd`` (a
    dict, or ``Options`` parsed alone) nothing changes user.
    """
    parent = options.parent if isinstance(options, usage.Options) else None
    if parent is None:
        return None, None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is not None and gid is None:
        import pwd

        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = None
    return uid, gid


def _prepare_state_dir(options: Options | dict[str, Any]) -> tuple[int, int] | None:
    """
    Create ``--state-dir`` if missing and check the server's user can keep state files there.

    The user is the one ``twistd --uid``/``--gid`` will switch to (or this
    process's): a directory it cannot write would otherwise be found only by
    the first initiator that sets a config string, mask or reservation,
    then at every retransmission of it.  Return the ``(uid, gid)`` the
    server's files should belong to when this process (root) writes them
    for another user, else ``None``.  Raise ``StateFileError`` (one line).
    """
    from aoe_twisted.statefile import check_state_dir, make_state_dir

    uid, gid = _service_user(options)
    owner = None
    if os.geteuid() == 0 and (uid, gid) != (None, None) and (uid, gid) != (0, 0):
        owner = (-1 if uid is None else uid, -1 if gid is None else gid)
    make_state_dir(options["state-dir"], owner)
    check_state_dir(options["state-dir"], uid, gid)
    return owner


def makeService(options: Options | dict[str, Any]) -> service.IService:
    """Open every target's backend and return the service that serves them."""
    from aoe_twisted.manager import TargetError, TargetManager
    from aoe_twisted.server import AoEService
    from aoe_twisted.statefile import StateFileError

    config: ServerConfig = options["server-config"]
    owner = None
    if config.state_dir:
        try:
            owner = _prepare_state_dir(options)
        except StateFileError as e:
            raise SystemExit(f"twistd aoe: --state-dir: {e}") from None
    manager = TargetManager(config, owner=owner)
    try:
        targets = manager.open_all()
    except TargetError as e:
        where = f"{config.source}: " if config.source else ""
        raise SystemExit(f"twistd aoe: {where}{e}") from None
    interfaces = list(config.interfaces)
    for target_config in config.targets:
        interfaces += [name for name in target_config.interfaces if name not in interfaces]
    placement = {t.key: t.interfaces for t in config.targets}
    if not interfaces:
        raise SystemExit("twistd aoe: no interface to serve on ([server] interfaces)")
    if config.workers > 1:
        from aoe_twisted.workers import WorkersService, share_targets

        served: Any = _under_twistd(WorkersService)(
            interfaces,
            targets,
            [t.backend for t in config.targets],
            share_targets(targets),
            config.workers,
            max_sectors=config.max_sectors,
            direct=config.direct,
            state_dir=config.state_dir,
            exit_on_error=True,
            ring_frames=config.ring_frames,
            placement=placement,
            duplicate_wait=config.duplicate_wait,
            removed_grace=config.removed_grace,
            backend_timeout=config.backend_timeout,
            stale_after=config.stale_after,
        )
    else:
        served = _under_twistd(AoEService)(
            interfaces,
            targets,
            max_sectors=config.max_sectors,
            exit_on_error=True,
            ring_frames=config.ring_frames,
            placement=placement,
            duplicate_wait=config.duplicate_wait,
            removed_grace=config.removed_grace,
            backend_timeout=config.backend_timeout,
            stale_after=config.stale_after,
        )
    manager.service = served
    served.manager = manager
    if config.source is None:
        served.hangup = HangupHandler(nothing_to_reload(len(targets), interfaces))
    else:
        served.hangup = HangupHandler(manager.hangup)
    served.extras = _extras(config, manager, _socket_owner(options))
    return served  # type: ignore[no-any-return]


def _socket_owner(options: Options | dict[str, Any]) -> tuple[int, int] | None:
    """The ``(uid, gid)`` the control socket is given: the user ``twistd --uid`` switches to."""
    uid, gid = _service_user(options)
    if os.geteuid() != 0 or (uid, gid) == (None, None):
        return None
    return (-1 if uid is None else uid, -1 if gid is None else gid)


def _extras(config: ServerConfig, manager: Any, owner: tuple[int, int] | None) -> list[Any]:
    """The services beside the server's: the control socket and the metrics endpoint."""
    extras: list[Any] = []
    if config.control is not None:
        from aoe_twisted.control.server import ControlServer

        extras.append(ControlServer(manager, config.control, config.control_group, owner))
    if config.metrics is not None:
        from aoe_twisted.metrics import MetricsService

        label = "[server] metrics" if config.source else "--metrics"
        extras.append(MetricsService(config.metrics, manager.stats, label=label))
    return extras
