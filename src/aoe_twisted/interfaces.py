# -*- test-case-name: tests.test_interfaces -*-
"""The zope interfaces that the target dispatches through.

An AoE target is a disk (``IBlockBackend``), an optional source of ATA
IDENTIFY data (``IIdentifier``) and the per-target state the protocol lets
initiators change (``IACLStore``).  Backends are found as Twisted plugins
that provide ``IBackendFactory``.

Every method here is synchronous: the sans-IO core calls them directly, once
per request, and the reply is built only after the call returned.  That is
what makes "a write is acknowledged only after it reached the backend" hold.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface

__all__ = ["IACLStore", "IBackendFactory", "IBlockBackend", "IIdentifier"]


class IBlockBackend(Interface):
    """
    A disk of 512-byte sectors, addressed in bytes.

    The core checks every range against ``size`` before it calls ``read`` or
    ``write``, and never calls ``write`` when ``read_only`` is true.
    """

    size = Attribute("The disk's size in bytes (int), a whole multiple of 512.")
    read_only = Attribute("True if the disk refuses writes (bool).")

    def read(offset: int, length: int) -> bytes:
        """
        Return exactly ``length`` bytes starting at byte ``offset``.

        Raise ``OSError`` if the bytes cannot be read; the target then answers
        with an ATA error instead of data.
        """

    def write(offset: int, data: bytes) -> None:
        """
        Write all of ``data`` at byte ``offset``.

        When this returns the data has reached the backend (for a file: the
        kernel's page cache), so the target may acknowledge it.  Raise
        ``OSError`` on failure.
        """

    def flush() -> None:
        """
        Make every completed write durable (``fsync`` for files and devices).

        Raise ``OSError`` on failure.

        A backend may also have an optional ``sync_data()`` method, not part
        of this interface so that older backends still provide it: the same
        promise, done as cheaply as the backend can (``fdatasync`` for the
        built-in file and block backends).  ``--sync`` calls it once per group
        of writes before acknowledging them, and calls ``flush`` on a backend
        without it.
        """

    def close() -> None:
        """Release the backend's resources; no call follows this one."""


class IIdentifier(Interface):
    """A source of ATA IDENTIFY DEVICE data for one disk."""

    def identify() -> bytes:
        """Return the 512-byte IDENTIFY DEVICE page, words little-endian."""


class IACLStore(Interface):
    """
    The state an initiator may change on a target: AoEr11 sections 3.2-3.4.

    Reading is cheap.  Each ``set_*`` call returns only once the new value is
    stored as durably as the store promises (a file-backed store fsyncs), so
    the target can confirm the change in its reply.  MAC addresses are 6-byte
    ``bytes``.

    A store that several processes share (``aoe_twisted.sharedacl``) may also
    have a ``transaction()`` method returning a context manager; the target
    then reads, decides and changes the state of each config, mask and
    reserve request inside it, so no other process changes it in between.
    """

    config_string = Attribute("The config string (bytes, at most 1024).")
    mask_list = Attribute(
        "The MAC mask list (tuple of 6-byte bytes); empty means every host may "
        "talk to the target."
    )
    reserve_list = Attribute(
        "The reserve list (tuple of 6-byte bytes); empty means unreserved."
    )

    def set_config_string(value: bytes) -> None:
        """Replace the config string."""

    def set_mask_list(macs: tuple[bytes, ...]) -> None:
        """Replace the MAC mask list."""

    def set_reserve_list(macs: tuple[bytes, ...]) -> None:
        """Replace the reserve list."""


class IBackendFactory(IPlugin):
    """
    A plugin that opens one kind of backend from a ``SCHEME:SPEC`` string.

    Ship a module-level instance in a ``twisted/plugins/`` module; the server
    finds it with ``twisted.plugin.getPlugins(IBackendFactory)``.
    """

    scheme = Attribute(
        "The name before the colon in --backend (str, unique, lower case, "
        "letters, digits and '-'), e.g. 'file'."
    )
    description = Attribute("One line saying what the backend is (str).")
    spec_format = Attribute("What follows the colon, for --help (str), e.g. 'PATH'.")

    def open(spec: str, read_only: bool = False) -> IBlockBackend:
        """
        Open the backend that ``spec`` (the text after the colon) names.

        With ``read_only`` the backend must refuse writes.  Raise
        ``aoe_twisted.errors.BackendSpecError`` with a one-line message that
        names the problem if ``spec`` is wrong or the backend cannot be opened.

        A factory that can bypass a cache (``--direct``) also takes a keyword
        argument ``direct: bool = False``; ``open_backend`` passes it only
        when ``--direct`` is given, and refuses ``--direct`` for a factory
        whose ``open`` does not take it.
        """
