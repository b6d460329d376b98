# -*- test-case-name: tests.test_tap -*-
"""
``twistd aoe``: the command line of the AoE target and the service it builds.

Options are checked here, in ``Options``, so that every bad value stops
``twistd`` with one line naming the option; backends are opened in
``makeService``, before ``twistd`` drops privileges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.application import service
from twisted.python import usage

from aoe_twisted.core.acl import MASK_LIST_LIMIT
from aoe_twisted.core.wire import BROADCAST_MAJOR, BROADCAST_MINOR, MAX_CONFIG_STRING, parse_mac
from aoe_twisted.units import parse_address

if TYPE_CHECKING:
    from aoe_twisted.interfaces import IACLStore

__all__ = ["Options", "TargetSpec", "makeService"]

_MAX_BUFFER_COUNT = 0xFFFF


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
         "initiator uses; the receive ring holds four initiators' full windows."],
        ["max-sectors", None, None, "Cap the sectors per ATA command below what the MTU allows "
         "(1..255)."],
        ["workers", "w", "1", "Serve from this many processes (1..64), sharing the interface "
         "by PACKET_FANOUT: one per core on a busy server. Each initiator's frames for a "
         "target stay with one worker."],
        ["state-dir", None, None, "Keep each target's config string, mask list and reserve "
         "list in DIR/eSHELF.SLOT.json, so they survive a restart (created if missing; must "
         "be writable by the user the server runs as). --config-string and --mask only seed "
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
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd aoe: {e}") from None

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


def makeService(options: Options | dict[str, Any]) -> service.IService:
    """Open every target's backend and return the service that serves them."""
    from aoe_twisted.backendspec import open_backend
    from aoe_twisted.core.acl import MemoryACLStore
    from aoe_twisted.core.target import Target
    from aoe_twisted.errors import BackendSpecError
    from aoe_twisted.server import AoEService
    from aoe_twisted.statefile import StateFileError

    targets = []
    try:
        for spec in options["targets"]:
            if options.get("state-dir"):
                acl = _persistent_acl(options, spec)
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
    workers = options.get("workers", 1)
    if workers > 1:
        from aoe_twisted.workers import WorkersService, share_targets

        return WorkersService(
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
        )
    return AoEService(
        options["iface"],
        targets,
        max_sectors=options["max-sectors"],
        exit_on_error=True,
        sync=bool(options.get("sync")),
    )


def _persistent_acl(options: Options | dict[str, Any], spec: TargetSpec) -> IACLStore:
    """
    Open the state file of ``spec``'s target in ``--state-dir`` (creating the directory).

    A target with no state file yet is seeded from ``--config-string`` and
    ``--mask`` and its file written at once; a target with one keeps what it
    says, and a differing command line is only logged: the persisted state is
    what initiators last set and were told about.  Raise ``StateFileError``
    (one line naming the file) if the directory or file is unusable.
    """
    import os
    from pathlib import Path

    from twisted.logger import Logger

    from aoe_twisted.statefile import FileACLStore, StateFileError

    state_dir = Path(options["state-dir"])
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise StateFileError(f"cannot create {state_dir}: {e.strerror or e}") from None
    store = FileACLStore.open(state_dir, spec.shelf, spec.slot)
    config = options["config-string"] or None
    masks = tuple(options["masks"]) or None
    if not store.exists:
        try:
            store.seed(config, masks)
        except OSError as e:
            reason = e.strerror or str(e)
            raise StateFileError(f"state file {store.path}: cannot write: {reason}") from None
    elif (config is not None and config != store.config_string) or (
        masks is not None and masks != store.mask_list
    ):
        Logger().warn(
            "e{shelf}.{slot}: --config-string/--mask ignored: {path} exists and holds the "
            "state initiators last set (delete it to start over)",
            shelf=spec.shelf,
            slot=spec.slot,
            path=str(store.path),
        )
    return store
