# -*- test-case-name: tests.test_control -*-
"""
The control socket's AMP commands: the contract between ``twistd aoe`` and ``aoe-twisted ctl``.

Every result is JSON (``BigJSON``): the target listing, the stats snapshot
and the reload report of /tmp/h/common.md and docs/operations.md, as the
server's ``IController`` returns them.  A command the server cannot do fails
with ``ControlError``, whose text is one line for the user; a peer that may
not use the socket gets ``PermissionDenied`` for its first command and the
connection is closed.

An AMP value is at most 65,535 bytes, and the stats of 1,000 targets are
several times that, so ``BigJSON`` splits its text over as many keys as it
needs (the ``BigString`` recipe of Twisted's AMP documentation).
"""

from __future__ import annotations

import json
from itertools import count
from typing import Any

from twisted.protocols import amp

__all__ = [
    "BAD_REQUEST",
    "CONTROL_ERROR",
    "DEFAULT_SOCKET",
    "INTERNAL_ERROR",
    "PERMISSION_DENIED",
    "SOCKET_ENVIRONMENT",
    "Add",
    "BigJSON",
    "ControlError",
    "Initiators",
    "InternalError",
    "List",
    "PermissionDenied",
    "Reload",
    "Remove",
    "Set",
    "Stats",
]

#: Where the server listens, and ``ctl`` connects, unless told otherwise.
DEFAULT_SOCKET = "/run/aoe-twisted/control.sock"
#: The environment variable that overrides ``DEFAULT_SOCKET`` for ``ctl``.
SOCKET_ENVIRONMENT = "AOE_TWISTED_CONTROL"

#: AMP error codes.
CONTROL_ERROR = b"CONTROL_ERROR"
PERMISSION_DENIED = b"PERMISSION_DENIED"
INTERNAL_ERROR = b"INTERNAL_ERROR"
BAD_REQUEST = b"BAD_REQUEST"


class ControlError(Exception):
    """A command that cannot be done: its ``str`` is one line for the user (sent back to ctl)."""


class PermissionDenied(Exception):
    """The peer may not use the control socket: ``str`` is one line naming its uid and the path."""


class InternalError(Exception):
    """The server failed while doing a command (a bug, logged with its traceback there)."""


class BigJSON(amp.Argument):
    """
    A JSON value of any size, as UTF-8 text split over keys ``NAME.0``, ``NAME.1``, ...

    Each key holds at most ``CHUNK`` bytes (AMP's limit on one value);
    ``fromBox`` joins the keys in order until one is missing.  ``toBox``
    raises ``TypeError`` or ``ValueError`` for a value JSON cannot hold
    (including NaN and infinities, which are not JSON).
    """

    #: The most bytes one AMP value may hold.
    CHUNK = 0xFFFF

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = self.retrieve(objects, _identifier(name), proto)
        text = json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
        for index, start in enumerate(range(0, len(text), self.CHUNK)):
            strings[b"%s.%d" % (name, index)] = text[start:start + self.CHUNK]

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        pieces = []
        for index in count():
            piece = strings.get(b"%s.%d" % (name, index))
            if piece is None:
                break
            pieces.append(piece)
        if not pieces:
            raise KeyError(f"no {name.decode('ascii', 'replace')}.0 key")
        objects[_identifier(name)] = json.loads(b"".join(pieces).decode("utf-8"))


def _identifier(name: bytes) -> str:
    """Return the Python keyword argument an AMP argument name stands for (as AMP does)."""
    return name.decode("ascii").replace("-", "_")


class _ControlCommand(amp.Command):
    """A control command: ``ControlError`` is an answer; ``PermissionDenied`` also hangs up."""

    errors = {ControlError: CONTROL_ERROR, InternalError: INTERNAL_ERROR}
    fatalErrors = {PermissionDenied: PERMISSION_DENIED}


class List(_ControlCommand):
    """The served targets: a list of target listing dicts, in address order."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"targets", BigJSON())]


class Stats(_ControlCommand):
    """The stats snapshot (summed over ``--workers`` processes)."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"stats", BigJSON())]


class Initiators(_ControlCommand):
    """
    The initiators the server has heard: the snapshot's ``initiators`` list.

    ``time`` is the snapshot's time, against which ``last_seen`` is measured.
    """

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"initiators", BigJSON()), (b"time", amp.Float())]


class Add(_ControlCommand):
    """
    Start serving a target: ``target`` is ``ADDRESS=SCHEME:SPEC[,key=value...]``.

    ``settings`` are more ``KEY=VALUE`` per-target options.  The answer is the
    new target's listing.
    """

    arguments = [(b"target", amp.Unicode()), (b"settings", amp.ListOf(amp.Unicode()))]
    response = [(b"target", BigJSON())]


class Remove(_ControlCommand):
    """Stop serving the target at ``address``; the answer is its last listing."""

    arguments = [(b"address", amp.Unicode())]
    response = [(b"target", BigJSON())]


class Set(_ControlCommand):
    """Change a target's options (``KEY=VALUE``); the answer is its new listing."""

    arguments = [(b"address", amp.Unicode()), (b"settings", amp.ListOf(amp.Unicode()))]
    response = [(b"target", BigJSON())]


class Reload(_ControlCommand):
    """
    Re-read the config file and apply the difference.

    The answer is ``{"added", "removed", "changed", "unchanged", "message"}``;
    a broken file changes nothing and is a ``ControlError``.
    """

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"result", BigJSON())]
