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
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from aoe_twisted.core.acl import MASK_LIST_LIMIT
from aoe_twisted.core.wire import BROADCAST_MAJOR, BROADCAST_MINOR, MAX_CONFIG_STRING, parse_mac
from aoe_twisted.units import parse_address

if TYPE_CHECKING:
    from aoe_twisted.interfaces import IACLStore

__all__ = ["HangupHandler", "Options", "ServesUnderTwistd", "TargetSpec", "makeService"]

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


@frozen
class TargetSpec:
    """One target the command line asks for: its address and its ``SCHEME:SPEC`` backend."""

    shelf: int
    slot: int
    backend: str


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


def parse_target(text: str) -> TargetSpec:
    """
    Parse ``SHELF.SLOT=SCHEME:SPEC`` as given to ``--target``.

    The address is in the grammar of ``aoe_twisted.units.parse_address``
    (``1.2``, ``e1.2``, ``0x10.0``); the backend is checked when it is opened.
    """
    address, sep, backend = text.partition("=")
    if not sep or not backend:
        raise usage.UsageError(f"--target: expected SHELF.SLOT=SCHEME:SPEC, not {text!r}")
    try:
        shelf, slot = parse_address(address)
    except ValueError as e:
        raise usage.UsageError(f"--target: {e}") from None
    return TargetSpec(shelf, slot, backend)


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
        """Serve another target, as SHELF.SLOT=SCHEME:SPEC (repeatable)."""
        self["targets"].append(parse_target(text))

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, turning any usage error into a one-line exit naming the option."""
        try:
            self._refuse_repeated(options)
            super().parseOptions(options)
        except usage.UsageError as e:
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
        """Check and convert the options, and gather the targets to serve."""
        if self["help-backends"]:
            from aoe_twisted.backendspec import format_backend_help

            print(format_backend_help())
            raise SystemExit(0)
        if not self["iface"]:
            raise usage.UsageError("--iface: required (the Ethernet interface to serve on)")

        self["shelf"] = _int_in("shelf", self["shelf"], 0, BROADCAST_MAJOR - 1)
        self["slot"] = _int_in("slot", self["slot"], 0, BROADCAST_MINOR - 1)
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
        targets: list[TargetSpec] = list(self["targets"])
        if self["backend"]:
            targets.insert(0, TargetSpec(self["shelf"], self["slot"], self["backend"]))
        if not targets:
            raise usage.UsageError("--backend: required (or one or more --target)")
        seen: set[tuple[int, int]] = set()
        for spec in targets:
            address = (spec.shelf, spec.slot)
            if address in seen:
                raise usage.UsageError(f"--target: e{spec.shelf}.{spec.slot} is given twice")
            seen.add(address)
        self["targets"] = targets


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

    def startService(self) -> None:
        """Start serving, then handle SIGHUP."""
        super().startService()  # type: ignore[misc]
        self.hangup.install()

    def stopService(self) -> Any:
        """Stop serving; once stopped, give SIGHUP back to the handler it had before."""
        from twisted.internet import defer

        d = defer.maybeDeferred(super().stopService)  # type: ignore[misc]

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
    from aoe_twisted.backendspec import open_backend
    from aoe_twisted.core.acl import MemoryACLStore
    from aoe_twisted.core.target import Target
    from aoe_twisted.errors import BackendSpecError
    from aoe_twisted.server import AoEService
    from aoe_twisted.statefile import StateFileError

    owner = None
    if options.get("state-dir"):
        try:
            owner = _prepare_state_dir(options)
        except StateFileError as e:
            raise SystemExit(f"twistd aoe: --state-dir: {e}") from None
    targets = []
    try:
        for spec in options["targets"]:
            if options.get("state-dir"):
                acl = _persistent_acl(options, spec, owner)
            backend = open_backend(
                spec.backend,
                read_only=bool(options["read-only"]),
                direct=bool(options.get("direct")),
            )
            if not options.get("state-dir"):
                acl = MemoryACLStore()
                if options["config-string"]:
                    acl.set_config_string(options["config-string"])
                if options["masks"]:
                    acl.set_mask_list(tuple(options["masks"]))
            targets.append(
                Target(
                    spec.shelf,
                    spec.slot,
                    backend,
                    acl=acl,
                    buffer_count=options["buffer-count"],
                )
            )
    except BackendSpecError as e:
        for target in targets:
            target.backend.close()
        raise SystemExit(f"twistd aoe: --backend {spec.backend}: {e}") from None
    except StateFileError as e:
        for target in targets:
            target.backend.close()
        raise SystemExit(f"twistd aoe: --state-dir: {e}") from None
    hangup = HangupHandler(nothing_to_reload(len(targets), list(options["iface"])))
    workers = options.get("workers", 1)
    if workers > 1:
        from aoe_twisted.workers import WorkersService, share_targets

        served: Any = _under_twistd(WorkersService)(
            options["iface"],
            targets,
            [spec.backend for spec in options["targets"]],
            share_targets(targets),
            workers,
            max_sectors=options["max-sectors"],
            sync=bool(options.get("sync")),
            direct=bool(options.get("direct")),
            state_dir=options.get("state-dir"),
            exit_on_error=True,
            ring_frames=options.get("ring-frames"),
        )
    else:
        served = _under_twistd(AoEService)(
            options["iface"],
            targets,
            max_sectors=options["max-sectors"],
            exit_on_error=True,
            sync=bool(options.get("sync")),
            ring_frames=options.get("ring-frames"),
        )
    served.hangup = hangup
    return served  # type: ignore[no-any-return]


def _persistent_acl(
    options: Options | dict[str, Any], spec: TargetSpec, owner: tuple[int, int] | None = None
) -> IACLStore:
    """
    Open the state file of ``spec``'s target in ``--state-dir`` (made by ``make_state_dir``).

    A target with no state file yet is seeded from ``--config-string`` and
    ``--mask`` and its file written at once (and given to ``owner``, the
    user ``twistd --uid`` will switch to, if given); a target with one keeps
    what it says, and a differing command line is only logged: the
    persisted state is what initiators last set and were told about.  Raise
    ``StateFileError`` (one line naming the file) if the file is unusable.
    """
    from pathlib import Path

    from aoe_twisted.statefile import FileACLStore, StateFileError

    state_dir = Path(options["state-dir"])
    store = FileACLStore.open(state_dir, spec.shelf, spec.slot)
    config = options["config-string"] or None
    masks = tuple(options["masks"]) or None
    if not store.exists:
        try:
            store.seed(config, masks)
            if owner is not None:
                os.chown(store.path, *owner)
        except OSError as e:
            reason = e.strerror or str(e)
            raise StateFileError(f"state file {store.path}: cannot write: {reason}") from None
    elif (config is not None and config != store.config_string) or (
        masks is not None and masks != store.mask_list
    ):
        _log.warn(
            "e{shelf}.{slot}: --config-string/--mask ignored: {path} exists and holds the "
            "state initiators last set (delete it to start over)",
            shelf=spec.shelf,
            slot=spec.slot,
            path=str(store.path),
        )
    return store
