# -*- test-case-name: tests.test_manager -*-
"""
What is served, as configured: targets opened from their configuration, changed while serving.

``TargetManager`` sits between the configuration (``aoe_twisted.config``:
the command line's targets or the config file's) and the service that serves
(``AoEService``).  It opens each ``TargetConfig``'s backend (a slice of it,
with ``offset``/``length``) and its ACL store (persistent with
``state_dir``), builds the ``Target``, and applies changes while the server
runs: ``add``, ``remove``, ``set`` and ``reload`` (the control socket's
commands, ``IController``, and ``SIGHUP``).  A change touches only the
targets it names: the others keep serving, frame after frame.

A reload re-reads the config file and applies the difference
(``aoe_twisted.config.diff_configs``): removed targets stop, changed ones
change, new ones are asked about on the segment, then served and announced.
Everything a reload needs is prepared first (the file parsed, every new
backend opened); if any of it fails, nothing changes and one line says why.
Changes made with ``ctl add``/``set``/``remove`` last until the next
reload or restart: the file is what a reload restores.

A change of a target's backend, ``read_only``, ``direct``, ``offset`` or
``length`` opens its disk again (the old one is flushed and closed once
the new one serves); a change of ``buffer_count``, ``max_sectors``,
``sync`` or ``interfaces`` keeps the disk; a change of ``mask`` or
``config_string`` sets the target's live list or string, as an initiator
would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from aoe_twisted.backends.slice import slice_backend
from aoe_twisted.config import (
    ConfigChanges,
    ConfigError,
    ServerConfig,
    TargetConfig,
    diff_configs,
    load_config,
    parse_target_option,
    parse_target_settings,
    slice_error,
)
from aoe_twisted.control.server import ControlError, IController
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import format_mac
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import IACLStore, IAsyncBlockBackend
from aoe_twisted.units import parse_address

__all__ = ["TargetError", "TargetManager", "open_target"]

_log = Logger()

#: Fields whose change needs the disk opened again.
_REOPEN = ("backend", "read_only", "direct", "offset", "length")


class TargetError(Exception):
    """A target that cannot be opened or changed: ``str`` is one line naming it and why."""


def open_target(
    config: TargetConfig,
    state_dir: str | None = None,
    owner: tuple[int, int] | None = None,
    acl: IACLStore | None = None,
) -> Target:
    """
    Open ``config``'s backend (a slice of it, if asked) and ACL store; return its ``Target``.

    ``acl`` reuses a store (a target whose disk is opened again keeps its
    config string, mask and reserve lists); otherwise one is made: a
    ``FileACLStore`` in ``state_dir`` (seeded from ``mask`` and
    ``config_string`` if it has no file yet; ``owner`` is given the file),
    else a ``MemoryACLStore`` seeded from them.  Raise ``TargetError``.
    """
    from aoe_twisted.backendspec import open_backend
    from aoe_twisted.statefile import StateFileError

    name = f"{config.address} = {config.backend}"
    try:
        backend = open_backend(config.backend, read_only=config.read_only, direct=config.direct)
    except BackendSpecError as e:
        raise TargetError(f"{name}: {e}") from None
    except OSError as e:
        raise TargetError(f"{name}: cannot open: {e.strerror or e}") from None
    try:
        problem = slice_error(config, backend.size)
        if problem is not None:
            raise TargetError(f"{config.address}: {problem}")
        if IAsyncBlockBackend.providedBy(backend) and (config.offset or config.length):
            raise TargetError(
                f"{name}: offset/length: slices of a disk that answers later are not "
                "supported; export the whole disk (or make the slice in the storage behind it)"
            )
        try:
            backend = slice_backend(backend, config.offset, config.length)
        except BackendSpecError as e:
            raise TargetError(f"{name}: {e}") from None
        if acl is None:
            try:
                acl = _acl_store(config, state_dir, owner)
            except StateFileError as e:
                raise TargetError(f"{name}: {e}") from None
        return Target(
            config.shelf,
            config.slot,
            backend,
            acl=acl,
            buffer_count=config.buffer_count,
            max_sectors=config.max_sectors or 0xFF,
            spec=config.backend,
            sync=config.sync,
        )
    except BaseException:
        backend.close()
        raise


def _acl_store(
    config: TargetConfig, state_dir: str | None, owner: tuple[int, int] | None
) -> IACLStore:
    """Return a new ACL store for ``config``'s target (see ``open_target``)."""
    if state_dir is None:
        store = MemoryACLStore()
        if config.config_string:
            store.set_config_string(config.config_string)
        if config.mask:
            store.set_mask_list(tuple(config.mask))
        return store
    from aoe_twisted.statefile import FileACLStore, StateFileError

    persisted = FileACLStore.open(Path(state_dir), config.shelf, config.slot)
    if not persisted.exists:
        try:
            persisted.seed(config.config_string or None, tuple(config.mask) or None)
            if owner is not None:
                os.chown(persisted.path, *owner)
        except OSError as e:
            reason = e.strerror or str(e)
            raise StateFileError(f"state file {persisted.path}: cannot write: {reason}") from None
    elif (config.config_string and config.config_string != persisted.config_string) or (
        config.mask and tuple(config.mask) != persisted.mask_list
    ):
        _log.warn(
            "{target}: the configured config string/mask list is not applied: {path} "
            "exists and holds the state initiators last set (delete it to start over)",
            target=config.address,
            path=str(persisted.path),
        )
    return persisted


@implementer(IController)
class TargetManager:
    """
    The targets of one server, from ``config``, served by ``service``; changed on request.

    ``service`` is an ``AoEService`` (or ``WorkersService``) built with the
    targets ``open_all`` returned.  ``owner`` is the ``(uid, gid)`` new
    state files are given to (see ``tap``).  Implements ``IController``
    for the control socket; ``hangup`` is the ``SIGHUP`` action.
    """

    def __init__(
        self,
        config: ServerConfig,
        service: Any = None,
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.config = config
        self.service = service
        self.owner = owner
        #: The configuration each served target was opened from, by address.
        self.configs: dict[tuple[int, int], TargetConfig] = {t.key: t for t in config.targets}

    # -- opening -------------------------------------------------------------

    def open_all(self) -> list[Target]:
        """Open every configured target (all or none: ``TargetError``)."""
        return self._open_many(self.config.targets)

    def _open_many(self, configs: Sequence[TargetConfig]) -> list[Target]:
        """Open ``configs``' targets, all or none (``TargetError``)."""
        opened: list[Target] = []
        try:
            for config in configs:
                opened.append(open_target(config, self.config.state_dir, self.owner))
        except BaseException:
            for target in opened:
                target.backend.close()
            raise
        return opened

    # -- IController ----------------------------------------------------------

    def targets(self) -> list[dict[str, Any]]:
        """Return the listing of every served target (see docs/operations.md)."""
        return [self.listing(target) for target in self.service.targets]

    def stats(self) -> Any:
        """Return the stats snapshot (summed over the workers with ``--workers``)."""
        return self.service.merged_snapshot()

    def add(self, target: str, settings: list[str]) -> dict[str, Any]:
        """Serve one more target, given as ``--target`` is, with more ``KEY=VALUE`` settings."""
        try:
            config = parse_target_option(target, self.config.target_defaults())
            changes = parse_target_settings(settings)
            if "address" in changes:
                raise ValueError("address: give it before the = of the target")
            config = evolve(config, **changes)
        except ValueError as e:
            raise ControlError(f"add {target}: {e}") from None
        if not config.interfaces:
            raise ControlError(
                f"add {target}: no interfaces (give iface=NAME, or set [server] interfaces)"
            )
        if self.service.target(*config.key) is not None:
            raise ControlError(f"add: {config.address} is already served")
        opened = self._open_or_refuse(config, "add")
        done = self._serve(opened, config)
        return _when([done], lambda: self.listing(opened))

    def remove(self, address: str) -> dict[str, Any]:
        """Stop serving the target at ``address``; return its last listing."""
        key = self._key(address, "remove")
        target = self.service.target(*key)
        listing = self.listing(target)
        done = self.service.remove_target(*key)
        self.configs.pop(key, None)
        listing["state"] = "removed"
        return _when([done], lambda: listing)

    def set(self, address: str, settings: list[str]) -> dict[str, Any]:
        """Change a served target's options (``KEY=VALUE``); return its new listing."""
        key = self._key(address, "set")
        if not settings:
            raise ControlError(f"set {address}: nothing to set (give KEY=VALUE)")
        old = self.configs[key]
        try:
            changes = parse_target_settings(settings)
            if "address" in changes:
                raise ValueError("address: cannot change; remove and add the target")
            new = evolve(old, **changes)
        except ValueError as e:
            raise ControlError(f"set {old.address}: {e}") from None
        if not new.interfaces:
            raise ControlError(f"set {old.address}: a target needs at least one interface")
        self._open_interfaces([new], f"set {old.address}")
        prepared = self._prepare_change(old, new, "set")
        done = self._change(old, new, prepared, given=frozenset(changes))
        return _when([done], lambda: self.listing(self.service.target(*key)))

    def reload(self, trigger: str = "ctl reload") -> dict[str, Any]:
        """
        Re-read the config file and apply the difference; return what changed.

        ``ControlError`` (one line; nothing changed) for a server started
        without a config file, a broken file, or a target that cannot be
        opened.
        """
        source = self.config.source
        if source is None:
            raise ControlError(
                "reload: nothing to reload (started without --config: the command line is "
                "read once, at start-up)"
            )
        try:
            new = load_config(source)
        except ConfigError as e:
            raise _logged(ControlError(f"reload: {e}; nothing changed"), trigger) from None
        current = evolve(self.config, targets=tuple(self.configs.values()))
        changes = diff_configs(current, new)
        added: list[Target] = []
        prepared: list[Target | None] = []
        try:
            added = self._open_many(changes.added)
            for old, new_ in changes.changed:
                prepared.append(self._prepare_change(old, new_, "reload"))
            self._open_interfaces(
                [*changes.added, *(new_ for _, new_ in changes.changed)], f"reload: {source}"
            )
        except BaseException as e:
            for target in [*added, *(t for t in prepared if t is not None)]:
                target.backend.close()
            if isinstance(e, TargetError):
                error = ControlError(f"reload: {source}: {e}; nothing changed")
                raise _logged(error, trigger) from None
            if isinstance(e, ControlError):
                raise _logged(ControlError(f"{e}; nothing changed"), trigger) from None
            raise
        waiting = [
            self.service.retune(new.removed_grace, new.backend_timeout, new.duplicate_wait)
        ]
        for config in changes.removed:
            waiting.append(self.service.remove_target(*config.key))
            self.configs.pop(config.key, None)
        for (old, new_), opened in zip(changes.changed, prepared, strict=True):
            waiting.append(self._change(old, new_, opened))
        self.config = evolve(
            new,
            **{key: getattr(self.config, key) for key in changes.restart},
        )
        for target, config in zip(added, changes.added, strict=True):
            waiting.append(self._serve(target, config))
        message = _summary(changes)
        if changes.live:
            message += f"; [server] {', '.join(changes.live)} changed"
        if changes.restart:
            _log.warn(
                "reload: {keys} changed in {source}: they take effect at the next restart",
                keys=", ".join(changes.restart),
                source=source,
            )
            message += f"; {', '.join(changes.restart)} take effect at the next restart"
        _log.info("reload: {summary}", summary=message)
        result = {
            "added": [c.address for c in changes.added],
            "removed": [c.address for c in changes.removed],
            "changed": [new_.address for _, new_ in changes.changed],
            "unchanged": len(changes.unchanged),
            "restart": list(changes.restart),
            "message": message,
        }
        return _when(waiting, lambda: result)

    def hangup(self) -> None:
        """``SIGHUP``: reload; what happened (or why nothing did) is one line in the log."""
        with contextlib.suppress(ControlError):  # Logged by reload.
            self.reload("SIGHUP")

    # -- listing ----------------------------------------------------------------

    def listing(self, target: Target) -> dict[str, Any]:
        """Return one target's listing dict (what ``ctl list`` shows)."""
        config = self.configs.get((target.shelf, target.slot))
        state, other, paths = self.service.state_of(target)
        acl = target.acl
        return {
            "target": target.address,
            "backend": target.spec,
            "size": target.backend.size,
            "read_only": bool(target.backend.read_only),
            "sync": target.sync or bool(self.service.sync),
            "direct": config.direct if config else False,
            "offset": config.offset if config else 0,
            "length": config.length if config else 0,
            "interfaces": list(self.service.interfaces_of(target)),
            "mask": [format_mac(mac) for mac in acl.mask_list],
            "config_string": acl.config_string.decode("utf-8", "replace"),
            "buffer_count": target.buffer_count,
            "max_sectors": target.max_sectors,
            "state": state,
            "duplicate_of": format_mac(other) if other else None,
            "paths": [format_mac(mac) for mac in paths],
        }

    # -- changing ----------------------------------------------------------------

    def _key(self, address: str, command: str) -> tuple[int, int]:
        """Parse ``address`` and check a target is served there."""
        try:
            key = parse_address(address)
        except ValueError as e:
            raise ControlError(f"{command}: {e}") from None
        if self.service.target(*key) is None:
            raise ControlError(f"{command}: no target is served at e{key[0]}.{key[1]}")
        return key

    def _open_or_refuse(self, config: TargetConfig, command: str, acl: Any = None) -> Target:
        """Open ``config``'s target, or raise ``ControlError`` saying why not."""
        try:
            return open_target(config, self.config.state_dir, self.owner, acl=acl)
        except TargetError as e:
            raise ControlError(f"{command}: {e}") from None

    def _serve(self, target: Target, config: TargetConfig) -> Any:
        """Serve a newly opened ``target`` on ``config``'s interfaces (maybe a ``Deferred``)."""
        from aoe_twisted.net.packetsystem import CannotOpenInterface

        try:
            done = self.service.add_target(target, config.interfaces)
        except (CannotOpenInterface, ValueError) as e:
            target.backend.close()
            raise ControlError(f"add {config.address}: {e}") from None
        self.configs[config.key] = config
        return done

    def _prepare_change(self, old: TargetConfig, new: TargetConfig, command: str) -> Target | None:
        """Open the new disk a change needs (``None`` if it keeps the old one)."""
        if all(getattr(old, name) == getattr(new, name) for name in _REOPEN):
            return None
        if old.backend.startswith("memory:") and old.backend == new.backend:
            changed = [name for name in _REOPEN if getattr(old, name) != getattr(new, name)]
            raise ControlError(
                f"{command} {old.address}: changing {', '.join(changed)} opens the disk again, "
                f"and {old.backend} would lose its contents; remove and add it instead"
            )
        current = self.service.target(*old.key)
        return self._open_or_refuse(new, command, acl=current.acl)

    def _open_interfaces(self, configs: Sequence[TargetConfig], command: str) -> None:
        """
        Open the interfaces ``configs`` are served on, or raise ``ControlError`` (one line).

        ``ValueError``: ``WorkersService`` cannot add an interface without a restart.
        """
        from aoe_twisted.net.packetsystem import CannotOpenInterface

        try:
            self.service.open_interfaces([name for c in configs for name in c.interfaces])
        except (CannotOpenInterface, ValueError) as e:
            raise ControlError(f"{command}: {e}") from None

    def _change(
        self,
        old: TargetConfig,
        new: TargetConfig,
        opened: Target | None,
        given: frozenset[str] = frozenset(),
    ) -> Any:
        """
        Apply a prepared change of one target (``opened``: its new disk, if any).

        ``given``: the keys ``ctl set`` named; a mask or config string named
        there is set even if the configuration already said so (an initiator
        may have changed the live one since).
        """
        current = self.service.target(*old.key)
        acl = current.acl
        if new.mask != old.mask or "mask" in given:
            acl.set_mask_list(tuple(new.mask))
        if new.config_string != old.config_string or "config_string" in given:
            acl.set_config_string(new.config_string)
        if opened is None:
            replacement = evolve(
                current,
                buffer_count=new.buffer_count,
                max_sectors=new.max_sectors or 0xFF,
                sync=new.sync,
            )
        else:
            replacement = opened
            # The same disk's figures go on (a new disk would start from zero).
            replacement.stats = current.stats
        done = self.service.replace_target(replacement, new.interfaces)
        self.configs[new.key] = new
        _log.info(
            "{target}: {what}", target=replacement.name, what=_what_changed(old, new)
        )
        return done


def _logged(error: ControlError, trigger: str) -> ControlError:
    """Log a failed reload's one line, naming what asked for it (SIGHUP, ctl); return it."""
    _log.error("{trigger}: {error}", trigger=trigger, error=str(error))
    return error


def _when(results: Sequence[Any], value: Callable[[], Any]) -> Any:
    """
    ``value()`` once the ``Deferred`` s among ``results`` have fired (at once if none).

    ``AoEService`` changes its targets at once; ``WorkersService`` answers
    with a ``Deferred`` that fires once every worker has applied the change:
    a command is answered only then.
    """
    waiting = [r for r in results if isinstance(r, Deferred)]
    if not waiting:
        return value()
    done: Deferred[Any] = gatherResults(waiting, consumeErrors=True)
    return done.addCallback(lambda _: value())


def _what_changed(old: TargetConfig, new: TargetConfig) -> str:
    """Say in a few words which options of a target changed."""
    names = [
        name
        for name in (
            "backend", "read_only", "sync", "direct", "offset", "length", "interfaces",
            "mask", "config_string", "buffer_count", "max_sectors",
        )
        if getattr(old, name) != getattr(new, name)
    ]
    return "changed " + ", ".join(names) if names else "unchanged"


def _summary(changes: ConfigChanges) -> str:
    """One line: how many targets were added, removed, changed and left alone."""
    parts = []
    for what, targets in (
        ("added", [c.address for c in changes.added]),
        ("removed", [c.address for c in changes.removed]),
        ("changed", [n.address for _, n in changes.changed]),
    ):
        if targets:
            parts.append(f"{what} {' '.join(targets)}")
    parts.append(f"{len(changes.unchanged)} unchanged")
    return "; ".join(parts)
