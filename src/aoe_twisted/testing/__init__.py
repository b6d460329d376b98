"""
Fakes and builders for testing code built on aoe_twisted, as ``twisted.pair.testing`` is for tuntap.

``packets``: ``MemoryPacketSystem``, the kernel's packet sockets in memory.
``frames``: AoE request frames built from a few arguments, and the MAC
addresses the tests use.  Both ship in the package so that a third-party
backend's tests can use them too.
"""

from aoe_twisted.testing.frames import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    ata_arg,
    ata_request,
    config_request,
    ethernet_frame,
    mask_request,
    reserve_request,
)
from aoe_twisted.testing.packets import MemoryInterface, MemoryPacketSocket, MemoryPacketSystem

__all__ = [
    "INITIATOR_MAC",
    "OTHER_MAC",
    "TARGET_MAC",
    "MemoryInterface",
    "MemoryPacketSocket",
    "MemoryPacketSystem",
    "ata_arg",
    "ata_request",
    "config_request",
    "ethernet_frame",
    "mask_request",
    "reserve_request",
]
