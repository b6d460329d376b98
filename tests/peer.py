# -*- test-case-name: tests.test_e2e -*-
"""
A small asynchronous AoE initiator for end-to-end tests: real frames on a real socket.

``Peer`` opens an ``AoEPort`` (optionally in another network namespace) and
sends AoE requests with unique tags.  Each request returns a ``Deferred``
that fires with the list of replies carrying its tag: the first reply for a
unicast request, every reply that arrives before the timeout for a
broadcast one, and ``[]`` if nothing came.  Frames with no matching request
(announcements, say) are kept in ``unsolicited``.

This is not a client library, only what the tests need to talk to a target.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import AbstractDatagramProtocol

from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    Directive,
    EthernetFrame,
    Header,
    MACMaskArg,
    ReserveReleaseArg,
    WireError,
)
from aoe_twisted.net.port import AoEPort
from aoe_twisted.testing import ata_arg, ethernet_frame

__all__ = ["Peer", "Reply"]

#: How long a request waits for its replies, in seconds.
DEFAULT_TIMEOUT = 2.0
#: How long a broadcast discovery collects replies.
DISCOVERY_TIMEOUT = 0.3


@frozen
class Reply:
    """One AoE response: who sent it, to whom, and what it says."""

    src: bytes
    dst: bytes
    header: Header
    frame: bytes

    @property
    def arg(self) -> Any:
        """The decoded argument."""
        return self.header.arg


@define
class _Pending:
    """A request waiting for replies."""

    deferred: defer.Deferred[list[Reply]]
    first_only: bool
    replies: list[Reply] = field(factory=list)
    timer: IDelayedCall | None = None


class _PeerProtocol(AbstractDatagramProtocol):
    """Match received responses to pending requests by tag."""

    noisy = False

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def datagramReceived(self, datagram: bytes, addr: Any = None) -> None:
        self.peer._received(datagram)


class Peer:
    """
    An AoE initiator on ``interface`` (in namespace ``netns``).

    ``start()`` opens the port; ``stop()`` closes it and fails nothing: every
    request still waiting fires with what it has.  ``mac`` is the peer's own
    MAC once started.  With ``accept_other_hosts`` (the default) the peer also
    sees replies addressed to forged source MACs.  Frames go out unpadded, as
    the Linux initiator sends them on virtio (a config query is 32 bytes).
    """

    def __init__(
        self,
        interface: str,
        netns: str | None = None,
        reactor: Any = None,
        accept_other_hosts: bool = True,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.protocol = _PeerProtocol(self)
        self.port = AoEPort(
            interface,
            self.protocol,
            reactor=reactor,
            netns=netns,
            accept_other_hosts=accept_other_hosts,
            pad_frames=False,
            stale_after=0,  # a test peer keeps what it received, however late it reads it
        )
        self.mac = b""
        self.mtu = 0
        self.unsolicited: list[Reply] = []
        self.undecodable: list[bytes] = []
        self._pending: dict[bytes, _Pending] = {}
        self._tags = itertools.count(0x1000)

    def start(self) -> None:
        """Open the socket."""
        self.port.startListening()
        assert self.port.mac is not None and self.port.mtu is not None
        self.mac = self.port.mac
        self.mtu = self.port.mtu

    def stop(self) -> defer.Deferred[None]:
        """Fire every waiting request with what it has, then close the socket."""
        for tag in list(self._pending):
            self._finish(tag)
        return self.port.stopListening()

    def next_tag(self) -> bytes:
        """Return a tag no earlier request of this peer used."""
        return next(self._tags).to_bytes(4, "big")

    # -- sending ---------------------------------------------------------

    def send_raw(self, frame: bytes) -> None:
        """Send ``frame`` (an Ethernet frame, header included) as it is."""
        self.port.write(frame)

    def frame(self, header: Header, dst: bytes, src: bytes | None = None) -> bytes:
        """Return ``header`` in an Ethernet frame from ``src`` (our MAC) to ``dst``."""
        return ethernet_frame(header.to_bytes(), src or self.mac, dst)

    def request(
        self,
        header: Header,
        dst: bytes,
        src: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        first_only: bool | None = None,
    ) -> defer.Deferred[list[Reply]]:
        """
        Send ``header`` (its tag must be unused) and collect the replies with its tag.

        By default a unicast request fires at its first reply and a broadcast
        one (to ``BROADCAST_MAC`` or a wildcard shelf or slot) collects until
        ``timeout``.
        """
        if first_only is None:
            first_only = dst != BROADCAST_MAC and not (
                header.major == BROADCAST_MAJOR or header.minor == BROADCAST_MINOR
            )
        d: defer.Deferred[list[Reply]] = defer.Deferred()
        pending = _Pending(d, first_only)
        tag = header.tag
        self._pending[tag] = pending
        pending.timer = self.reactor.callLater(timeout, self._finish, tag)
        self.send_raw(self.frame(header, dst, src))
        return d

    def _received(self, data: bytes) -> None:
        """Record one received frame, completing the request it answers."""
        try:
            ethernet = EthernetFrame.from_bytes(data)
            header = Header.from_bytes(ethernet.payload)
        except WireError:
            self.undecodable.append(data)
            return
        if not header.flag_response:
            return
        reply = Reply(ethernet.src, ethernet.dst, header, data)
        pending = self._pending.get(header.tag)
        if pending is None:
            self.unsolicited.append(reply)
            return
        pending.replies.append(reply)
        if pending.first_only:
            self._finish(header.tag)

    def _finish(self, tag: bytes) -> None:
        """Fire the request with ``tag`` with the replies it got."""
        pending = self._pending.pop(tag, None)
        if pending is None:
            return
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.deferred.callback(pending.replies)

    # -- requests --------------------------------------------------------

    def _header(self, shelf: int, slot: int, command: Command, arg: Any) -> Header:
        return Header(major=shelf, minor=slot, command=command, tag=self.next_tag(), arg=arg)

    def discover(
        self,
        shelf: int = BROADCAST_MAJOR,
        slot: int = BROADCAST_MINOR,
        timeout: float = DISCOVERY_TIMEOUT,
    ) -> defer.Deferred[list[Reply]]:
        """Broadcast a config query, as ``aoe-discover`` does; collect every answer."""
        header = self._header(shelf, slot, Command.QUERY_CONFIG_INFORMATION, ConfigArg())
        return self.request(header, BROADCAST_MAC, timeout=timeout, first_only=False)

    def ata(
        self,
        dst: bytes,
        shelf: int,
        slot: int,
        arg: ATAArg,
        src: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> defer.Deferred[list[Reply]]:
        """Issue one ATA command."""
        header = self._header(shelf, slot, Command.ISSUE_ATA_COMMAND, arg)
        return self.request(header, dst, src, timeout)

    def identify(self, dst: bytes, shelf: int, slot: int) -> defer.Deferred[list[Reply]]:
        """IDENTIFY DEVICE."""
        return self.ata(dst, shelf, slot, ata_arg(ATACmdStatus.IDENTIFY))

    def read(
        self,
        dst: bytes,
        shelf: int,
        slot: int,
        lba: int,
        count: int = 1,
        src: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> defer.Deferred[list[Reply]]:
        """READ SECTORS EXT of ``count`` sectors at ``lba``, as Linux sends it."""
        arg = ata_arg(ATACmdStatus.READ_48BIT, lba=lba, count=count)
        return self.ata(dst, shelf, slot, arg, src, timeout)

    def write(
        self,
        dst: bytes,
        shelf: int,
        slot: int,
        lba: int,
        data: bytes,
        src: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> defer.Deferred[list[Reply]]:
        """WRITE SECTORS EXT of ``data`` (whole sectors) at ``lba``, as Linux sends it."""
        arg = ata_arg(ATACmdStatus.WRITE_48BIT, lba=lba, data=data)
        return self.ata(dst, shelf, slot, arg, src, timeout)

    def config(
        self,
        dst: bytes,
        shelf: int,
        slot: int,
        command: ConfigCommand,
        string: bytes = b"",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> defer.Deferred[list[Reply]]:
        """Query Config Information with sub-command ``command`` and ``string``."""
        arg = ConfigArg(command=command, string_length=len(string), string=string)
        header = self._header(shelf, slot, Command.QUERY_CONFIG_INFORMATION, arg)
        return self.request(header, dst, timeout=timeout)

    def mask(
        self,
        dst: bytes,
        shelf: int,
        slot: int,
        command: int,
        directives: Sequence[Directive] = (),
        src: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> defer.Deferred[list[Reply]]:
        """MAC Mask List read (``command`` 0) or edit (1) with ``directives``."""
        arg = MACMaskArg(command, 0, len(directives), tuple(directives))
        header = self._header(shelf, slot, Command.MAC_MASK_LIST, arg)
        return self.request(header, dst, src, timeout)

    def reserve(
        self,
        dst: bytes,
        shelf: int,
        slot: int,
        command: int,
        macs: Sequence[bytes] = (),
        src: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> defer.Deferred[list[Reply]]:
        """Reserve/Release read (``command`` 0), set (1) or force set (2) of ``macs``."""
        arg = ReserveReleaseArg(command, len(macs), tuple(macs))
        header = self._header(shelf, slot, Command.RESERVE_RELEASE, arg)
        return self.request(header, dst, src, timeout)
