# -*- test-case-name: tests.test_acl -*-
"""
The MAC mask list and reserve list rules (AoEr11 sections 3.3 and 3.4), and an in-memory store.

The rules are pure functions over tuples of 6-byte MACs so the target can
apply them without caring where the lists live; ``MemoryACLStore`` is the
``IACLStore`` that keeps them in memory (lost on restart, as in vblade).
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import define, field, frozen
from zope.interface import implementer

from aoe_twisted.core.wire import DirectiveCommand, MACMaskError
from aoe_twisted.core.wire.macmask import Directive
from aoe_twisted.interfaces import IACLStore

__all__ = [
    "MASK_LIST_CEILING",
    "MASK_LIST_LIMIT",
    "RESERVE_LIST_LIMIT",
    "MaskEditResult",
    "MemoryACLStore",
    "edit_mask_list",
    "mac_tuple",
    "mask_allows",
    "reserve_allows",
]

MASK_LIST_CEILING = (1500 - 10 - 4) // 8
"""
The most MACs a mask list reply can carry in a standard 1500-byte frame: 185.

A reply is the 10-byte AoE header, the 4-byte mask argument and 8 bytes per
MAC, all inside the 1500-byte Ethernet payload (10 + 4 + 8n <= 1500).
"""

MASK_LIST_LIMIT = 64
"""
How many MACs the mask list holds by default.

Twice vblade's 32, and far below ``MASK_LIST_CEILING``: even counting the
14-byte Ethernet header (14 + 10 + 4 + 8 * 64 = 540 bytes) the whole list
fits one reply at any MTU an initiator can use, so a read never truncates.
"""

RESERVE_LIST_LIMIT = 255
"""The most MACs a reserve list holds: its count (NMACs) is one byte."""


def mac_tuple(value: Iterable[bytes]) -> tuple[bytes, ...]:
    """
    Return ``value`` as the tuple of 6-byte ``bytes`` every ``IACLStore`` keeps.

    @raise ValueError: if an item is not 6 bytes long.
    """
    macs = tuple(bytes(mac) for mac in value)
    for mac in macs:
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(mac)}: {mac!r}")
    return macs


@implementer(IACLStore)
@define
class MemoryACLStore:
    """An ``IACLStore`` in memory: each ``set_*`` takes effect at once; all is lost on exit."""

    config_string: bytes = b""
    mask_list: tuple[bytes, ...] = field(default=(), converter=mac_tuple)
    reserve_list: tuple[bytes, ...] = field(default=(), converter=mac_tuple)

    def set_config_string(self, value: bytes) -> None:
        """Replace the config string."""
        self.config_string = bytes(value)

    def set_mask_list(self, macs: tuple[bytes, ...]) -> None:
        """Replace the MAC mask list."""
        self.mask_list = mac_tuple(macs)

    def set_reserve_list(self, macs: tuple[bytes, ...]) -> None:
        """Replace the reserve list."""
        self.reserve_list = mac_tuple(macs)


@frozen
class MaskEditResult:
    """
    What a mask list edit did: the new list and, if it stopped early, why and where.

    ``error`` is 0 or a ``MACMaskError``; ``failed_index`` is the index of the
    directive that stopped the edit (every directive before it was applied).
    """

    macs: tuple[bytes, ...]
    error: int = 0
    failed_index: int | None = None


def edit_mask_list(
    current: tuple[bytes, ...], directives: Iterable[Directive], limit: int
) -> MaskEditResult:
    """
    Apply mask list ``directives`` to ``current`` in order, as vblade's ``aoemask`` does.

    NONE does nothing; ADD appends a MAC not yet listed (a duplicate is fine)
    and stops with ``LIST_FULL`` if the list already holds ``limit`` MACs;
    DELETE removes a listed MAC (an absent one is fine); any other command
    stops with ``BAD_COMMAND``.  Directives before the one that stopped the
    edit stay applied.
    """
    macs = list(current)
    for index, directive in enumerate(directives):
        command = directive.command
        if command == DirectiveCommand.NONE:
            continue
        if command == DirectiveCommand.ADD:
            if directive.mac in macs:
                continue
            if len(macs) >= limit:
                return MaskEditResult(tuple(macs), MACMaskError.LIST_FULL, index)
            macs.append(directive.mac)
        elif command == DirectiveCommand.DELETE:
            if directive.mac in macs:
                macs.remove(directive.mac)
        else:
            return MaskEditResult(tuple(macs), MACMaskError.BAD_COMMAND, index)
    return MaskEditResult(tuple(macs))


def mask_allows(mask_list: tuple[bytes, ...], mac: bytes) -> bool:
    """Return whether ``mac`` may talk to the target: an empty mask list allows everyone."""
    return not mask_list or mac in mask_list


def reserve_allows(reserve_list: tuple[bytes, ...], mac: bytes) -> bool:
    """Return whether ``mac`` may use a target: an empty reserve list means unreserved."""
    return not reserve_list or mac in reserve_list
