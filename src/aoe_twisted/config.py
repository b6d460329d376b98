# -*- test-case-name: tests.test_config -*-
"""
The configuration model: the TOML config file, one ``--target`` option, and what a reload changes.

Pure: nothing here opens a backend, a socket or a file other than the
config file ``load_config`` reads.  Every mistake is a one-line message:
``ConfigError`` (naming the file, the ``[server]`` key or the ``[[target]]``
number and the problem) for a file, ``ValueError`` (naming the key) for a
``--target`` option or a ``ctl set`` setting.

The config file (``twistd aoe --config PATH``)
==============================================

A TOML file with one optional ``[server]`` table and any number of
``[[target]]`` tables (none is valid: targets can be added at run time)::

    [server]
    interfaces = ["eth0"]
    control = "/run/aoe-twisted/control.sock"
    control_group = "aoe"
    metrics = "127.0.0.1:9580"
    state_dir = "/var/lib/aoe-twisted"
    buffer_count = 64
    workers = 1

    [[target]]
    address = "1.0"
    backend = "file:/srv/aoe/disk0.img"
    offset = "1M"
    length = "64M"
    mask = ["52:54:00:12:34:56"]

Any other top-level table or key is an error, and so is ``[target]`` written
as one table instead of ``[[target]]``.

``[server]`` keys (all optional):

``interfaces`` (array of strings, default none)
    The Ethernet interfaces every target is served on, unless the target
    names its own.  A name is 1..15 bytes with no ``/``, ``:`` or white
    space, and is given once.
``control`` (string, default none: no control socket)
    The path of the control socket (``aoe-twisted ctl``), at most 107 bytes.
``control_group`` (string, default none)
    A group whose members may use the control socket too (the socket is then
    mode 0660 and owned by that group; otherwise 0600).  Needs ``control``.
``metrics`` (string or integer, default none: no metrics endpoint)
    Where to serve Prometheus ``/metrics``: ``"HOST:PORT"``,
    ``"[IPV6]:PORT"``, or a port alone (``9580`` or ``"9580"``), which binds
    127.0.0.1.  The port is 0..65535 (0: any free port).
``state_dir`` (string, default none)
    As ``--state-dir``: keeps each target's config string, mask list and
    reserve list across restarts.
``workers`` (integer 1..64, default 1)
    As ``--workers``.
``ring_frames`` (integer 256..65536, default: sized from the targets)
    As ``--ring-frames``; must hold one full window of the largest
    ``buffer_count``.
``removed_grace`` (seconds, number 0..86400, default 180)
    How long the address of a removed target keeps answering ATA requests
    with an error, so that an initiator's outstanding I/O fails promptly
    instead of being retried until it gives up.
``backend_timeout`` (seconds, number above 0 up to 3600, default 30)
    How long a disk that answers later (``nbd:``, ``rbd:``, ``thread:``)
    has to complete a request before it is answered with an ATA error.
``duplicate_wait`` (seconds, number 0..60, default 0.5)
    How long to wait for another server's answer for an address before
    serving it (duplicate address detection).
``stale_after`` (seconds, integer 0..3600, default 5)
    As ``--stale-after``: a request that waited in the receive ring longer
    than this (the server was stopped or stalled) is dropped unanswered;
    0 never drops one.
``buffer_count``, ``max_sectors``, ``read_only``, ``sync``, ``direct``
    Defaults for every target's key of the same name (below).

``[[target]]`` keys:

``address`` (string, required)
    ``SHELF.SLOT`` or ``eSHELF.SLOT`` (``"1.0"``, ``"e1.0"``, ``"0x10.0"``);
    shelf 0..65534, slot 0..254; each address once in a file.
``backend`` (string, required)
    ``SCHEME:SPEC``, as ``--backend`` (``file:/srv/a.img``, ``memory:64M``,
    ``block:/dev/sdb``).  It is opened by the server, not checked here.
``read_only``, ``sync``, ``direct`` (booleans, default ``[server]``'s, else false)
    As ``--read-only``, ``--sync`` and ``--direct``, for this target.
``offset``, ``length`` (bytes, default 0)
    Serve a slice of the backend: ``length`` bytes from ``offset``
    (``length = 0``: to the end).  An integer, or a string with a size
    suffix (``"1M"``, ``"512KiB"``, ``"8s"``: see docs/options.md); a
    multiple of 512.  Slices of one backend may overlap; a slice past the end
    of its backend is refused when the backend is opened (``slice_error``).
``interfaces`` (array of strings, default ``[server]``'s)
    Serve this target on these interfaces instead.  A target must end up
    with at least one interface.
``mask`` (array of MAC address strings, default none)
    The initial MAC mask list (at most 64 addresses, each once).
``config_string`` (string, default empty)
    The initial config string (at most 1024 bytes in UTF-8).
``buffer_count`` (integer 1..65535, default ``[server]``'s, else 64)
    Requests accepted in flight from each initiator.
``max_sectors`` (integer 1..255, default ``[server]``'s, else as the MTU allows)
    Cap on the sectors per ATA command.

The ``--target`` option (and ``aoe-twisted ctl add``)
=====================================================

``ADDRESS=SCHEME:SPEC[,KEY[=VALUE]]...``, for example::

    1.0=file:/srv/d.img,read_only,offset=1M,length=64M,mask=52:54:00:12:34:56,iface=eth1

The keys are the ``[[target]]`` keys other than ``address`` and ``backend``,
plus ``ro`` for ``read_only`` and ``iface`` for ``interfaces``.  A boolean
key alone means true; a boolean value is one of true/false, yes/no, on/off,
1/0.  ``mask`` and ``iface`` are repeated to give several values (``mask=``
alone gives an empty mask list).  ``max_sectors=none`` removes a cap.  In a
value, ``\\,`` is a comma and ``\\\\`` a backslash.

Options are split off the *end*: trailing comma-separated segments are taken
as options while each starts with a key (``KEY`` or ``KEY=``); the rest is
the backend, commas and all.  So a backend spec may contain commas, unless a
segment after its last comma starts with one of these keys (or is a near
miss of one, such as ``readonly``, which is refused as a typo).

Keys not given take the ``defaults`` the caller passes: the command line's
global flags (``--read-only``, ``--iface``...) or the ``[server]`` table.

``aoe-twisted ctl set``/``ctl add`` settings (``parse_target_settings``)
are the same keys, plus ``backend``, one ``KEY=VALUE`` (or bare boolean
``KEY``) per argument, values taken verbatim (no escapes needed).

Reloading
=========

``diff_configs(old, new)`` compares targets by address, on their resolved
values: a target is unchanged only if every field is equal, so changing a
``[server]`` default (``interfaces``, ``buffer_count``, ``max_sectors``,
``read_only``, ``sync``, ``direct``) changes the targets that use it.
``workers``, ``control``, ``control_group``, ``metrics``, ``state_dir``,
``ring_frames`` and ``stale_after`` (``RESTART_KEYS``) only take effect at
the next start;
the rest of ``[server]`` (``LIVE_KEYS``) is applied by a reload.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from attrs import NOTHING, field, fields, frozen

from aoe_twisted.core.acl import MASK_LIST_LIMIT
from aoe_twisted.core.wire import MAX_CONFIG_STRING, format_mac, parse_mac
from aoe_twisted.net.fanout import MAX_WORKERS
from aoe_twisted.net.ring import MAX_RING_FRAMES, MAX_STALE_AFTER, MIN_RING_FRAMES, STALE_AFTER
from aoe_twisted.units import SECTOR_SIZE, parse_address, parse_byte_count

__all__ = [
    "LIVE_KEYS",
    "RESTART_KEYS",
    "ConfigChanges",
    "ConfigError",
    "ServerConfig",
    "TargetConfig",
    "check_interface_name",
    "diff_configs",
    "format_target_option",
    "load_config",
    "parse_config",
    "parse_metrics",
    "parse_target_option",
    "parse_target_settings",
    "slice_error",
]

_MAX_BUFFER_COUNT = 0xFFFF
_MAX_SECTORS = 255
#: The largest offset or length: what an ``off_t`` holds.
_MAX_BYTES = (1 << 63) - 1
#: ``sun_path`` is 108 bytes, one of them the terminating NUL.
_MAX_SOCKET_PATH = 107
_MAX_REMOVED_GRACE = 86400.0
_MAX_DUPLICATE_WAIT = 60.0
_MAX_BACKEND_TIMEOUT = 3600.0
_DEFAULT_METRICS_HOST = "127.0.0.1"

RESTART_KEYS = (
    "workers", "control", "control_group", "metrics", "state_dir", "ring_frames", "stale_after",
)
"""``[server]`` keys a running server cannot change: a reload reports them in ``restart``."""

LIVE_KEYS = (
    "interfaces",
    "buffer_count",
    "max_sectors",
    "sync",
    "direct",
    "read_only",
    "removed_grace",
    "duplicate_wait",
    "backend_timeout",
)
"""
``[server]`` keys a reload applies.  All but the last three are target
defaults, so their effect is already in the targets' changes.
"""


class ConfigError(Exception):
    """
    A config file that cannot be served: ``str()`` is one line.

    The line is ``SOURCE: [WHERE ]KEY: PROBLEM``, e.g.
    ``aoe.toml: [[target]] #2 (e1.0) offset: not a multiple of 512: 1000``;
    the parts are kept as attributes for callers that report them apart.
    """

    def __init__(
        self, source: str, problem: str, where: str | None = None, key: str | None = None
    ) -> None:
        self.source = source
        self.problem = _one_line(problem)
        self.where = where
        self.key = key
        location = " ".join(part for part in (where, key) if part)
        parts = [source, location, self.problem] if location else [source, self.problem]
        super().__init__(": ".join(parts))


# ---------------------------------------------------------------------------
# Checks of typed values (shared by the file, the command line and the attrs validators).
# Each raises ValueError with the problem only; the caller names the key.


def _one_line(text: str) -> str:
    """Return ``text`` with every line break replaced, so a message is one line."""
    return " ".join(text.split("\n")).replace("\r", " ")


def _shown(value: object) -> str:
    """Return ``repr(value)``, shortened: a message quotes what it refuses, on one line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_int(value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, found {_shown(value)}")
    if not low <= value <= high:
        raise ValueError(f"must be {low}..{high}, not {value}")


def _check_bool(value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, found {_shown(value)}")


def _check_bytes_count(value: object) -> None:
    """An offset or a length: a whole number of sectors, not negative."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a number of bytes, found {_shown(value)}")
    if value < 0:
        raise ValueError(f"negative: {value}")
    if value > _MAX_BYTES:
        raise ValueError(f"too large: {value} (at most {_MAX_BYTES})")
    if value % SECTOR_SIZE:
        raise ValueError(f"not a multiple of {SECTOR_SIZE}: {value}")


def _check_max_sectors(value: object) -> None:
    if value is not None:
        _check_int(value, 1, _MAX_SECTORS)


def check_interface_name(name: str) -> str:
    """
    Return ``name`` if it can name a network interface, as the kernel's ``dev_valid_name``.

    @raise ValueError: one line quoting ``name``: empty, longer than 15 bytes,
        ``.`` or ``..``, or containing ``/``, ``:`` or white space.
    """
    if not isinstance(name, str):
        raise ValueError(f"expected an interface name, found {_shown(name)}")
    if (
        not name
        or len(name.encode("utf-8", "surrogateescape")) > 15
        or name in (".", "..")
        or "/" in name
        or ":" in name
        or any(ch.isspace() for ch in name)
    ):
        raise ValueError(
            f"{_shown(name)} is not an interface name (1..15 bytes, no '/', ':' or spaces)"
        )
    return name


def _check_interfaces(value: object) -> None:
    if not isinstance(value, tuple):
        raise ValueError(f"expected a tuple of interface names, found {_shown(value)}")
    seen: set[str] = set()
    for name in value:
        check_interface_name(name)
        if name in seen:
            raise ValueError(f"{name} is given twice")
        seen.add(name)


def _check_mask(value: object) -> None:
    if not isinstance(value, tuple):
        raise ValueError(f"expected a tuple of MAC addresses, found {_shown(value)}")
    seen: set[bytes] = set()
    for mac in value:
        if not isinstance(mac, bytes) or len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {_shown(mac)}")
        if mac in seen:
            raise ValueError(f"{format_mac(mac)} is given twice")
        seen.add(mac)
    if len(value) > MASK_LIST_LIMIT:
        raise ValueError(f"{len(value)} MAC addresses, at most {MASK_LIST_LIMIT}")


def _check_config_string(value: object) -> None:
    if not isinstance(value, bytes):
        raise ValueError(f"expected bytes, found {_shown(value)}")
    if len(value) > MAX_CONFIG_STRING:
        raise ValueError(f"{len(value)} bytes, at most {MAX_CONFIG_STRING}")


def _check_backend(value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"expected SCHEME:SPEC, found {_shown(value)}")
    scheme, colon, spec = value.partition(":")
    if not (scheme and colon and spec):
        raise ValueError(f"{_shown(value)} is not SCHEME:SPEC, e.g. file:disk.img")


def _validated(check: Callable[[Any], None]) -> Callable[[Any, Any, Any], None]:
    """Return an attrs validator running ``check``, its message prefixed with the field name."""

    def validate(instance: object, attribute: Any, value: object) -> None:
        try:
            check(value)
        except ValueError as e:
            raise ValueError(f"{attribute.name}: {e}") from None

    return validate


def _int_between(low: int, high: int) -> Callable[[Any], None]:
    return lambda value: _check_int(value, low, high)


# ---------------------------------------------------------------------------
# The values.


@frozen
class TargetConfig:
    """
    One target as it will be served: every value resolved (the ``[server]`` defaults applied).

    Each field is checked when the value is made (``ValueError`` naming the
    field), so ``attrs.evolve`` with bad settings fails the same way.
    ``backend`` is only checked to be ``SCHEME:SPEC``: it is opened by the
    server.  ``interfaces`` may be empty here; a config file refuses a
    target left with none (``parse_target_option`` leaves that to its caller).
    """

    shelf: int = field(validator=_validated(_int_between(0, 0xFFFE)))
    slot: int = field(validator=_validated(_int_between(0, 0xFE)))
    backend: str = field(validator=_validated(_check_backend))
    read_only: bool = field(default=False, validator=_validated(_check_bool))
    sync: bool = field(default=False, validator=_validated(_check_bool))
    direct: bool = field(default=False, validator=_validated(_check_bool))
    offset: int = field(default=0, validator=_validated(_check_bytes_count))
    length: int = field(default=0, validator=_validated(_check_bytes_count))
    interfaces: tuple[str, ...] = field(default=(), validator=_validated(_check_interfaces))
    mask: tuple[bytes, ...] = field(default=(), validator=_validated(_check_mask))
    config_string: bytes = field(default=b"", validator=_validated(_check_config_string))
    buffer_count: int = field(
        default=64, validator=_validated(_int_between(1, _MAX_BUFFER_COUNT))
    )
    max_sectors: int | None = field(default=None, validator=_validated(_check_max_sectors))

    @property
    def address(self) -> str:
        """The address as people write it: ``e1.0``."""
        return f"e{self.shelf}.{self.slot}"

    @property
    def key(self) -> tuple[int, int]:
        """``(shelf, slot)``: what targets are looked up and compared by."""
        return (self.shelf, self.slot)


@frozen
class ServerConfig:
    """
    A whole config file: the ``[server]`` settings and the resolved targets, in file order.

    ``buffer_count``, ``max_sectors``, ``sync``, ``direct``, ``read_only``
    and ``interfaces`` are the defaults the targets were resolved with (kept
    so ``ctl add`` can resolve a new target the same way: see
    ``target_defaults``).  ``source`` is the file it came from.
    """

    interfaces: tuple[str, ...] = ()
    control: str | None = None
    control_group: str | None = None
    metrics: tuple[str, int] | None = None
    state_dir: str | None = None
    buffer_count: int = 64
    max_sectors: int | None = None
    sync: bool = False
    direct: bool = False
    read_only: bool = False
    workers: int = 1
    ring_frames: int | None = None
    removed_grace: float = 180.0
    duplicate_wait: float = 0.5
    backend_timeout: float = 30.0
    stale_after: int = STALE_AFTER
    targets: tuple[TargetConfig, ...] = ()
    source: str | None = None

    def target_defaults(self) -> dict[str, object]:
        """The ``defaults`` for ``parse_target_option`` that resolve a target as this file does."""
        return {name: getattr(self, name) for name in _SERVER_TARGET_DEFAULTS}


#: [server] keys that are defaults for the targets' keys of the same name.
_SERVER_TARGET_DEFAULTS = (
    "interfaces", "buffer_count", "max_sectors", "sync", "direct", "read_only",
)


@frozen
class ConfigChanges:
    """
    What a reload changes (``diff_configs``), targets compared by address.

    ``changed`` pairs each old target with its new self; ``unchanged`` holds
    the new targets equal in every resolved field to the old ones.
    ``restart`` names the ``[server]`` keys (of ``RESTART_KEYS``) that differ
    and only take effect after a restart; ``live`` names the other
    ``[server]`` keys that differ (of ``LIVE_KEYS``).
    """

    added: tuple[TargetConfig, ...] = ()
    removed: tuple[TargetConfig, ...] = ()
    changed: tuple[tuple[TargetConfig, TargetConfig], ...] = ()
    unchanged: tuple[TargetConfig, ...] = ()
    restart: tuple[str, ...] = ()
    live: tuple[str, ...] = ()


def diff_configs(old: ServerConfig, new: ServerConfig) -> ConfigChanges:
    """
    Return what changes from ``old`` to ``new``.

    Targets are matched by address; ``added`` and ``changed`` and
    ``unchanged`` are in ``new``'s order, ``removed`` in ``old``'s.  A
    change of a ``[server]`` default shows as changes of the targets that
    use it, not as a restart.
    """
    before = {target.key: target for target in old.targets}
    after = {target.key: target for target in new.targets}
    added, changed, unchanged = [], [], []
    for target in new.targets:
        previous = before.get(target.key)
        if previous is None:
            added.append(target)
        elif previous == target:
            unchanged.append(target)
        else:
            changed.append((previous, target))
    removed = [target for target in old.targets if target.key not in after]
    return ConfigChanges(
        added=tuple(added),
        removed=tuple(removed),
        changed=tuple(changed),
        unchanged=tuple(unchanged),
        restart=tuple(k for k in RESTART_KEYS if getattr(old, k) != getattr(new, k)),
        live=tuple(k for k in LIVE_KEYS if getattr(old, k) != getattr(new, k)),
    )


def slice_error(target: TargetConfig, size: int) -> str | None:
    """
    Return what is wrong with ``target``'s slice of a backend of ``size`` bytes, or ``None``.

    The offset must be inside the backend (an empty slice serves nothing) and
    ``offset + length`` not past its end.  The text names the backend but not
    the target, e.g. ``offset 1048576 + length 4096 is past the end of
    file:x.img (1048576 bytes)``; the caller says which target it is.
    """
    if target.offset >= size:
        return f"offset {target.offset} is past the end of {target.backend} ({size} bytes)"
    if target.offset + target.length > size:
        start = f"offset {target.offset} + " if target.offset else ""
        return (
            f"{start}length {target.length} is past the end of {target.backend} "
            f"({size} bytes)"
        )
    return None


# ---------------------------------------------------------------------------
# Reading TOML values.


def _found(value: object) -> str:
    """Name the TOML type of ``value``, with the value when it is short."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value!r})"
    if isinstance(value, str):
        return f"a string ({_shown(value)})"
    if isinstance(value, list):
        return f"an array ({len(value)} item{'' if len(value) == 1 else 's'})"
    if isinstance(value, dict):
        return "a table"
    return f"a date or time ({value})"


def _expected(what: str, value: object, hint: str = "") -> ValueError:
    return ValueError(f"expected {what}, found {_found(value)}{hint}")


def _toml_bool(value: object) -> bool:
    if not isinstance(value, bool):
        hint = ""
        if isinstance(value, str) and value.lower() in ("true", "false"):
            hint = f"; write {value.lower()} without quotes"
        raise _expected("a boolean (true or false)", value, hint)
    return value


def _toml_int(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected("an integer", value)
        _check_int(value, low, high)
        return value

    return convert


def _toml_bytes(value: object) -> int:
    """An offset or length: an integer, or a string with a size suffix."""
    if isinstance(value, str):
        count = parse_byte_count(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        count = value
    else:
        raise _expected('a number of bytes (an integer, or a string such as "1M")', value)
    _check_bytes_count(count)
    return count


def _toml_str(value: object) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    if not value:
        raise ValueError("empty")
    if "\0" in value:
        raise ValueError(f"contains a NUL character: {_shown(value)}")
    return value


def _toml_string_list(value: object, example: str) -> list[str]:
    if not isinstance(value, list):
        hint = f'; write ["{value}"]' if isinstance(value, str) else f", e.g. {example}"
        raise _expected("an array of strings", value, hint)
    for item in value:
        if not isinstance(item, str):
            raise _expected(f"an array of strings, e.g. {example}", item, " in the array")
    return value


def _toml_interfaces(value: object) -> tuple[str, ...]:
    interfaces = tuple(_toml_string_list(value, '["eth0"]'))
    _check_interfaces(interfaces)
    return interfaces


def _toml_target_interfaces(value: object) -> tuple[str, ...]:
    interfaces = _toml_interfaces(value)
    if not interfaces:
        raise ValueError("empty; leave it out to use the [server] interfaces")
    return interfaces


def _toml_mask(value: object) -> tuple[bytes, ...]:
    mask = tuple(parse_mac(text) for text in _toml_string_list(value, '["52:54:00:12:34:56"]'))
    _check_mask(mask)
    return mask


def _toml_config_string(value: object) -> bytes:
    if not isinstance(value, str):
        raise _expected("a string", value)
    encoded = value.encode("utf-8")
    _check_config_string(encoded)
    return encoded


def _toml_backend(value: object) -> str:
    if not isinstance(value, str):
        raise _expected('a string such as "file:/srv/aoe/disk0.img"', value)
    _check_backend(value)
    return value


def _toml_seconds(high: float, low: float = 0.0) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _expected("a number of seconds", value)
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number of seconds, not {value}")
        if not low <= value <= high:
            raise ValueError(f"must be {low:g}..{high:g} seconds, not {value:g}")
        return float(value)

    return convert


def _toml_socket_path(value: object) -> str:
    path = _toml_str(value)
    size = len(path.encode("utf-8"))
    if size > _MAX_SOCKET_PATH:
        raise ValueError(f"{size} bytes long; a UNIX socket path is at most {_MAX_SOCKET_PATH}")
    return path


def _toml_metrics(value: object) -> tuple[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_metrics(str(value))
    if isinstance(value, str):
        return parse_metrics(value)
    raise _expected('"HOST:PORT" or a port number', value)


def parse_metrics(text: str) -> tuple[str, int]:
    """
    Parse where to serve ``/metrics``: ``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``.

    A port alone binds 127.0.0.1; the port is 0..65535 (0: any free port).

    @raise ValueError: one line quoting ``text``.
    """
    host, colon, port_text = text.rpartition(":")
    if not colon:
        host = _DEFAULT_METRICS_HOST
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or not all(c in "0123456789abcdefABCDEF:." for c in host):
            raise ValueError(f"not an IPv6 address in [...]: {_shown(text)}")
    elif not host or ":" in host or "[" in host or any(c.isspace() for c in host):
        raise ValueError(
            f"not [HOST:]PORT: {_shown(text)} (e.g. 9580, 127.0.0.1:9580 or [::1]:9580)"
        )
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"not a port number: {_shown(port_text)} in {_shown(text)}")
    port = int(port_text)
    if port > 0xFFFF:
        raise ValueError(f"port must be 0..65535, not {port}")
    return host, port


_TARGET_KEYS: dict[str, Callable[[object], object]] = {
    "read_only": _toml_bool,
    "sync": _toml_bool,
    "direct": _toml_bool,
    "offset": _toml_bytes,
    "length": _toml_bytes,
    "interfaces": _toml_target_interfaces,
    "mask": _toml_mask,
    "config_string": _toml_config_string,
    "buffer_count": _toml_int(1, _MAX_BUFFER_COUNT),
    "max_sectors": _toml_int(1, _MAX_SECTORS),
}

_SERVER_KEYS: dict[str, Callable[[object], object]] = {
    "interfaces": _toml_interfaces,
    "control": _toml_socket_path,
    "control_group": _toml_str,
    "metrics": _toml_metrics,
    "state_dir": _toml_str,
    "buffer_count": _toml_int(1, _MAX_BUFFER_COUNT),
    "max_sectors": _toml_int(1, _MAX_SECTORS),
    "sync": _toml_bool,
    "direct": _toml_bool,
    "read_only": _toml_bool,
    "workers": _toml_int(1, MAX_WORKERS),
    "ring_frames": _toml_int(MIN_RING_FRAMES, MAX_RING_FRAMES),
    "removed_grace": _toml_seconds(_MAX_REMOVED_GRACE),
    "duplicate_wait": _toml_seconds(_MAX_DUPLICATE_WAIT),
    "backend_timeout": _toml_seconds(_MAX_BACKEND_TIMEOUT, low=0.001),
    "stale_after": _toml_int(0, MAX_STALE_AFTER),
}


def _unknown(key: str, known: Iterable[str]) -> str:
    """The problem text for an unknown key, suggesting the nearest known one."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)
    if close:
        return f"unknown key; did you mean {close[0]}?"
    return f"unknown key (known: {', '.join(sorted(known))})"


# ---------------------------------------------------------------------------
# The config file.


def load_config(path: str) -> ServerConfig:
    """
    Read and check the config file at ``path``.

    @raise ConfigError: one line, if the file cannot be read, is not TOML
        (or not UTF-8), or fails any check of ``parse_config``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            path, f"invalid TOML: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
    return parse_config(text, path)


def parse_config(text: str, source: str = "<config>") -> ServerConfig:
    """
    Parse and check a config file's text; ``source`` names it in errors and in the result.

    @raise ConfigError: one line naming ``source``, the ``[server]`` key or
        the ``[[target]]`` (1-based) and its key, and the problem.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, f"invalid TOML: {e}") from None
    for name, value in document.items():
        if name not in ("server", "target"):
            kind = "table" if isinstance(value, dict) else "key"
            raise ConfigError(
                source, f"unknown {kind}; a config file has [server] and [[target]]", key=name
            )
    server_table = document.get("server", {})
    if not isinstance(server_table, dict):
        found = "[[server]]" if isinstance(server_table, list) else _found(server_table)
        raise ConfigError(
            source, f"expected one table ([server]), found {found}", key="server"
        )
    target_tables = document.get("target", [])
    if isinstance(target_tables, dict):
        raise ConfigError(
            source,
            "[target] is a single table; each target is an entry of an array of tables: "
            "write [[target]]",
            key="target",
        )
    if not isinstance(target_tables, list) or not all(
        isinstance(table, dict) for table in target_tables
    ):
        raise ConfigError(
            source,
            f"expected an array of tables ([[target]]), found {_found(target_tables)}",
            key="target",
        )

    settings: dict[str, Any] = {}
    for key, value in server_table.items():
        convert = _SERVER_KEYS.get(key)
        if convert is None:
            raise ConfigError(source, _unknown(key, _SERVER_KEYS), "[server]", key)
        try:
            settings[key] = convert(value)
        except ValueError as e:
            raise ConfigError(source, str(e), "[server]", key) from None
    if "control_group" in settings and "control" not in settings:
        raise ConfigError(
            source, "needs control (the socket it opens to the group)", "[server]",
            "control_group",
        )
    server = ServerConfig(**settings, source=source)

    defaults = server.target_defaults()
    targets: list[TargetConfig] = []
    seen: dict[tuple[int, int], int] = {}
    for number, table in enumerate(target_tables, 1):
        target = _parse_target_table(table, number, defaults, source)
        if not target.interfaces:
            raise ConfigError(
                source,
                "none: give [server] interfaces or the target's own",
                _target_where(number, target.address),
                "interfaces",
            )
        if target.key in seen:
            raise ConfigError(
                source,
                f"{target.address} is also [[target]] #{seen[target.key]}",
                _target_where(number, target.address),
                "address",
            )
        seen[target.key] = number
        targets.append(target)

    if server.ring_frames is not None:
        windows = [(server.buffer_count, "")] + [
            (t.buffer_count, f" of {_target_where(n, t.address)}")
            for n, t in enumerate(targets, 1)
        ]
        window, whose = max(windows, key=lambda pair: pair[0])
        if server.ring_frames < window:
            raise ConfigError(
                source,
                f"{server.ring_frames} frames do not hold one full window of buffer_count "
                f"{window}{whose}",
                "[server]",
                "ring_frames",
            )
    return ServerConfig(**{**settings, "targets": tuple(targets), "source": source})


def _target_where(number: int, address: str | None) -> str:
    return f"[[target]] #{number}" + (f" ({address})" if address else "")


def _parse_target_table(
    table: dict[str, Any], number: int, defaults: Mapping[str, object], source: str
) -> TargetConfig:
    """Return the resolved target of one ``[[target]]`` table, or raise ``ConfigError``."""
    where = _target_where(number, None)
    for required in ("address", "backend"):
        if required not in table:
            example = '"1.0"' if required == "address" else '"file:/srv/aoe/disk0.img"'
            raise ConfigError(source, f"missing, e.g. {required} = {example}", where, required)
    address = table["address"]
    if not isinstance(address, str):
        hint = "; quote it" if isinstance(address, int | float) else ""
        raise ConfigError(
            source, f'expected a string such as "1.0", found {_found(address)}{hint}',
            where, "address",
        )
    try:
        shelf, slot = parse_address(address)
    except ValueError as e:
        raise ConfigError(source, str(e), where, "address") from None
    where = _target_where(number, f"e{shelf}.{slot}")
    known = ("address", "backend", *_TARGET_KEYS)
    values: dict[str, Any] = dict(defaults)
    for key, value in table.items():
        if key == "address":
            continue
        if key not in known:
            raise ConfigError(source, _unknown(key, known), where, key)
        convert = _toml_backend if key == "backend" else _TARGET_KEYS[key]
        try:
            values[key] = convert(value)
        except ValueError as e:
            raise ConfigError(source, str(e), where, key) from None
    try:
        return TargetConfig(shelf, slot, **values)
    except ValueError as e:  # a default that was already checked: not expected
        raise ConfigError(source, str(e), where) from None


# ---------------------------------------------------------------------------
# The --target option and ctl settings.

_TEXT_BOOLS = {
    "true": True, "yes": True, "on": True, "1": True,
    "false": False, "no": False, "off": False, "0": False,
}
_ALIASES = {"ro": "read_only", "iface": "interfaces"}
_BOOL_KEYS = frozenset({"read_only", "sync", "direct"})
_LIST_KEYS = frozenset({"interfaces", "mask"})
#: The keys of a --target option, in the order format_target_option writes them.
_OPTION_ORDER = (
    "read_only", "sync", "direct", "offset", "length", "interfaces", "mask",
    "config_string", "buffer_count", "max_sectors",
)
_OPTION_KEYS = frozenset(_OPTION_ORDER) | frozenset(_ALIASES)
_NO_DEFAULTS: Mapping[str, object] = MappingProxyType({})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_GRAMMAR = "ADDRESS=SCHEME:SPEC[,KEY[=VALUE]]..."


def _text_bool(text: str) -> bool:
    try:
        return _TEXT_BOOLS[text.lower()]
    except KeyError:
        raise ValueError(
            f"not a boolean: {_shown(text)} (true/false, yes/no, on/off, 1/0)"
        ) from None


def _text_int(text: str) -> int:
    if re.fullmatch(r"[0-9]+", text, re.ASCII):
        return int(text, 10)
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    raise ValueError(f"not a number: {_shown(text)}")


def _text_value(key: str, text: str) -> object:
    """Convert one option value (already unescaped) of canonical ``key``; ``ValueError`` if bad."""
    if key in _BOOL_KEYS:
        return _text_bool(text)
    if key in ("offset", "length"):
        count = parse_byte_count(text)
        _check_bytes_count(count)
        return count
    if key == "buffer_count":
        count = _text_int(text)
        _check_int(count, 1, _MAX_BUFFER_COUNT)
        return count
    if key == "max_sectors":
        if text.lower() == "none":
            return None
        count = _text_int(text)
        _check_int(count, 1, _MAX_SECTORS)
        return count
    if key == "interfaces":
        return check_interface_name(text)
    if key == "mask":
        return parse_mac(text)
    if key == "config_string":
        encoded = text.encode("utf-8", "surrogateescape")
        _check_config_string(encoded)
        return encoded
    if key == "backend":
        _check_backend(text)
        return text
    raise AssertionError(key)  # pragma: no cover


def _settings(
    pairs: Iterable[tuple[str, str | None]], keys: frozenset[str]
) -> dict[str, object]:
    """
    Return the field values that ``(KEY, VALUE or None)`` pairs give.

    A list key collects its values (an empty value contributes nothing, so
    ``mask=`` alone is the empty list); any other key may be given once.
    """
    result: dict[str, object] = {}
    given: dict[str, str] = {}
    for written, value in pairs:
        if written not in keys:
            raise ValueError(f"{written}: {_unknown(written, keys)}")
        key = _ALIASES.get(written, written)
        try:
            if value is None:
                if key not in _BOOL_KEYS:
                    raise ValueError(f"needs a value ({written}=VALUE)")
                converted: object = True
            elif key == "mask" and value == "":
                converted = None
            elif key == "interfaces" and value == "":
                raise ValueError("empty interface name")
            else:
                converted = _text_value(key, value)
        except ValueError as e:
            raise ValueError(f"{written}: {e}") from None
        if key in _LIST_KEYS:
            items = result.setdefault(key, [])
            assert isinstance(items, list)
            if converted is not None:
                if converted in items:
                    shown = format_mac(converted) if key == "mask" else converted  # type: ignore[arg-type]
                    raise ValueError(f"{written}: {shown} is given twice")
                items.append(converted)
            continue
        shown = written if value is None else f"{written}={value}"
        if key in given:
            raise ValueError(f"{written}: given twice ({given[key]}, then {shown})")
        given[key] = shown
        result[key] = converted
    for key in _LIST_KEYS & result.keys():
        items = result[key]
        assert isinstance(items, list)
        result[key] = tuple(items)
    if "mask" in result:
        try:
            _check_mask(result["mask"])
        except ValueError as e:
            raise ValueError(f"mask: {e}") from None
    return result


def _unescape(value: str) -> str:
    return re.sub(r"\\([\\,])", r"\1", value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def _segments(text: str) -> list[str]:
    """Split ``text`` at each comma that no backslash escapes; the pieces are left raw."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == ",":
            pieces.append(text[start:i])
            start = i + 1
        i += 1
    pieces.append(text[start:])
    return pieces


def parse_target_option(
    text: str, defaults: Mapping[str, object] = _NO_DEFAULTS
) -> TargetConfig:
    """
    Parse one ``--target``: ``ADDRESS=SCHEME:SPEC[,KEY[=VALUE]]...`` (see the module docstring).

    @param defaults: ``TargetConfig`` field values for the keys not given
        (``ServerConfig.target_defaults()``, or the command line's global
        flags); the rest take ``TargetConfig``'s defaults.  Keys given
        replace them, list keys too (``iface=eth1`` serves on ``eth1`` only).
        The result may have no interfaces: the caller refuses that.
    @raise ValueError: one line naming the key (``address``, ``backend`` or
        an option), e.g. ``offset: not a multiple of 512: 1000``.
    """
    address_text, equals, rest = text.partition("=")
    if not equals or not rest:
        raise ValueError(f"expected {_GRAMMAR}, not {_shown(text)}")
    try:
        shelf, slot = parse_address(address_text)
    except ValueError as e:
        raise ValueError(f"address: {e}") from None
    segments = _segments(rest)
    options: list[str] = []
    while len(segments) > 1:
        name = segments[-1].partition("=")[0]
        if name in _OPTION_KEYS:
            options.insert(0, segments.pop())
            continue
        if _WORD.fullmatch(name) and difflib.get_close_matches(
            name, list(_OPTION_KEYS), n=1, cutoff=0.75
        ):
            raise ValueError(f"{name}: {_unknown(name, _OPTION_KEYS)}")
        break
    backend = ",".join(segments)
    try:
        _check_backend(backend)
    except ValueError as e:
        raise ValueError(f"backend: {e}") from None
    pairs = []
    for option in options:
        key, equals, value = option.partition("=")
        pairs.append((key, _unescape(value) if equals else None))
    given = _settings(pairs, _OPTION_KEYS)
    values = {**defaults, **given}
    return TargetConfig(shelf, slot, backend, **values)  # type: ignore[arg-type]


def parse_target_settings(pairs: Sequence[str]) -> dict[str, object]:
    """
    Parse ``KEY=VALUE`` settings (``ctl set``, ``ctl add``) into ``TargetConfig`` field values.

    Each item is one setting, taken verbatim (no comma escapes): the keys of
    a ``--target`` option and ``backend``; a boolean key alone means true;
    ``mask`` and ``iface``/``interfaces`` repeat to give several values, and
    ``mask=`` alone clears the mask list.  The result is for
    ``attrs.evolve(target, **result)``, keyed by field name.

    @raise ValueError: one line naming the key.
    """
    parsed = []
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if key == "address":
            raise ValueError(
                "address: not a setting; an address cannot change (remove the target and add "
                "it again)"
            )
        parsed.append((key, value if equals else None))
    return _settings(parsed, _OPTION_KEYS | {"backend"})


def _format_bytes(count: int) -> str:
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if count and count % unit == 0:
            return f"{count // unit}{suffix}"
    return str(count)


def _option_texts(key: str, value: object, default: object) -> list[str]:
    """The option segments that set ``key`` to ``value`` (which differs from ``default``)."""
    if key in _BOOL_KEYS:
        return [key if value else f"{key}=off"]
    if key in ("offset", "length"):
        return [f"{key}={_format_bytes(value)}"]  # type: ignore[arg-type]
    if key == "interfaces":
        if not value:
            raise ValueError("interfaces: no interfaces cannot be written as an option")
        return [f"iface={_escape(name)}" for name in value]  # type: ignore[attr-defined]
    if key == "mask":
        return [f"mask={format_mac(mac)}" for mac in value] or ["mask="]  # type: ignore[attr-defined]
    if key == "config_string":
        text = value.decode("utf-8", "surrogateescape")  # type: ignore[attr-defined]
        return [f"config_string={_escape(text)}"]
    if key == "max_sectors":
        return [f"max_sectors={'none' if value is None else value}"]
    return [f"{key}={value}"]


_FIELD_DEFAULTS = {
    a.name: a.default for a in fields(TargetConfig) if a.default is not NOTHING
}


def format_target_option(
    target: TargetConfig, defaults: Mapping[str, object] = _NO_DEFAULTS
) -> str:
    """
    Return the ``--target`` text that ``parse_target_option(text, defaults)`` reads as ``target``.

    Only the fields that differ from ``defaults`` (else ``TargetConfig``'s
    defaults) are written.

    @raise ValueError: if ``target`` cannot be written so: a backend whose
        last comma-separated segment starts with an option key, or a target
        with no interfaces when ``defaults`` has some.
    """
    parts = [f"{target.shelf}.{target.slot}={target.backend}"]
    for key in _OPTION_ORDER:
        value = getattr(target, key)
        default = defaults.get(key, _FIELD_DEFAULTS[key])
        if value != default:
            parts.extend(_option_texts(key, value, default))
    text = ",".join(parts)
    try:
        back = parse_target_option(text, defaults)
    except ValueError as e:
        raise ValueError(
            f"backend: {_shown(target.backend)} cannot be written as {_GRAMMAR}: {e}"
        ) from None
    if back != target:
        raise ValueError(
            f"backend: {_shown(target.backend)} cannot be written as {_GRAMMAR} "
            "(a segment after its last comma reads as an option)"
        )
    return text
