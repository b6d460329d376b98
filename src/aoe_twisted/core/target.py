# -*- test-case-name: tests.test_target -*-
"""
One exported disk at shelf.slot: which requests it answers and what it answers (AoEr11 2, 3).

``Target.decide`` turns a decoded request into its answers: reply headers,
and for a read, write or flush a ``Pending`` — the disk operation to carry
out (``aoe_twisted.core.operations``) and how to answer once it is done.
``Target.handle`` does both steps synchronously, for callers with a
synchronous backend.  ``Target.reject`` answers a request the codec could
not decode.  The only I/O here is the ACL store's: a config, mask or
reserve change is stored before it is confirmed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import Factory, define, evolve, field, frozen, setters
from attrs.validators import instance_of
from zope.interface.interface import InterfaceClass

from aoe_twisted.core.acl import (
    MASK_LIST_CEILING,
    MASK_LIST_LIMIT,
    RESERVE_LIST_LIMIT,
    MemoryACLStore,
    edit_mask_list,
    mask_allows,
    reserve_allows,
)
from aoe_twisted.core.ata import finish_ata, plan_ata
from aoe_twisted.core.identify import DefaultIdentifier
from aoe_twisted.core.operations import BackendIO, IOKind, perform
from aoe_twisted.core.stats import TargetStats
from aoe_twisted.core.wire import (
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    SECTOR_SIZE,
    VERSION,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    Error,
    Header,
    MACMaskArg,
    MACMaskCommand,
    ProtocolError,
    RawArg,
    ReserveReleaseArg,
    ReserveReleaseCommand,
)
from aoe_twisted.interfaces import (
    IACLStore,
    IAsyncBlockBackend,
    IBlockBackend,
    IDiskIdentity,
    IIdentifier,
    ITransactionalACLStore,
    IZeroCopyBackend,
)

__all__ = ["FIRMWARE_VERSION", "Pending", "StoreFailure", "Target"]

FIRMWARE_VERSION = 0x0001
"""
The firmware version advertised in config replies (AoEr11 3.2).

The field is opaque to initiators (Linux only shows it in sysfs
``firmware-version``); 1 is this package's first wire behaviour.  Bump it
when what a target answers changes in a way an administrator may care about.
"""

_ATA = int(Command.ISSUE_ATA_COMMAND)
_CONFIG = int(Command.QUERY_CONFIG_INFORMATION)
_MASK = int(Command.MAC_MASK_LIST)
_RESERVE = int(Command.RESERVE_RELEASE)
_IDENTIFY = int(ATACmdStatus.IDENTIFY)
_NO_TAG = bytes(4)


def _between(low: int, high: int) -> Callable[[object, Any, object], None]:
    """Return an attrs validator that accepts ints from ``low`` to ``high`` inclusive."""

    def check(instance: object, attribute: Any, value: object) -> None:
        name = getattr(attribute, "name", "value")
        if not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer from {low} to {high}, not {value!r}")

    return check


def _provides(interface: InterfaceClass) -> Callable[[object, Any, object], None]:
    """Return an attrs validator for objects providing ``interface`` (attrs' own is deprecated)."""

    def check(instance: object, attribute: Any, value: object) -> None:
        if not interface.providedBy(value):
            name = getattr(attribute, "name", "value")
            raise TypeError(f"{name} must provide {interface.__name__}, not {value!r}")

    return check


@define(eq=False, on_setattr=setters.NO_OP)
class Pending:
    """
    An answer that waits for a disk operation: ``io`` on ``target``'s backend.

    Whoever carries out ``io`` (``operations.perform``, or later and in any
    order) calls ``reply`` with its result.  ``initiator`` is the MAC the
    reply goes to.
    """

    target: Target
    initiator: bytes
    request: Header
    io: BackendIO
    # Not frozen, for speed (one per request on the general path): a value all the same.

    @property
    def writes(self) -> bool:
        """Whether a successful ``reply`` acknowledges a write."""
        return self.io.kind is IOKind.WRITE

    def finish(
        self, result: bytes | None, error: OSError | None = None, elapsed: float = 0.0
    ) -> Header:
        """
        Return the reply once ``io`` gave ``result`` (or raised ``error``), counting it.

        The target's ``stats`` learn that the operation is no longer in
        flight, its service time (``elapsed`` seconds, measured by whoever
        carried it out), its bytes or its failure.
        """
        reply = self.reply(result, error)
        io = self.io
        stats = self.target.stats
        stats.in_flight -= 1
        stats.served(elapsed)
        kind = io.kind
        if error is not None:
            stats.failed(_OPERATION_NAMES[kind], error)
        elif kind is IOKind.READ and (result is None or len(result) != io.length):
            stats.failed("read", None)
        arg = reply.arg
        if isinstance(arg, ATAArg) and arg.cmd_status & _ATA_FAILED:
            stats.ata_errors += 1
        elif kind is IOKind.READ:
            stats.read_bytes += io.length
        elif kind is IOKind.WRITE:
            stats.write_bytes += io.length
        return reply

    def reply(self, result: bytes | None, error: OSError | None = None) -> Header:
        """Return the reply once ``io`` gave ``result`` (or raised ``error``), counting nothing."""
        request = self.request
        target = self.target
        return Header(
            VERSION,
            True,
            False,
            0,
            target.shelf,
            target.slot,
            request.command,
            request.tag,
            finish_ata(request.arg, self.io, result, error),  # type: ignore[arg-type]
        )


@frozen
class StoreFailure:
    """
    A config, mask or reserve change that the ACL store could not keep.

    ``reply`` is what the initiator gets (AoE error ``DEVICE_UNAVAILABLE``;
    the state is unchanged); ``error`` is the store's ``OSError``, for the
    server's log.
    """

    target: Target
    reply: Header
    error: OSError


Answer = Header | Pending | StoreFailure
"""One of ``Target.decide``'s answers to a request."""


def _check_disk(instance: object, attribute: Any, value: object) -> None:
    """Accept a disk: synchronous (``IBlockBackend``) or asynchronous (``IAsyncBlockBackend``)."""
    if not (IBlockBackend.providedBy(value) or IAsyncBlockBackend.providedBy(value)):
        name = getattr(attribute, "name", "backend")
        raise TypeError(
            f"{name} must provide IBlockBackend or IAsyncBlockBackend, not {value!r}"
        )


def _note_backend(instance: Target, attribute: Any, value: IBlockBackend) -> IBlockBackend:
    """Check a new backend; learn, once, whether it takes ring buffers or answers later."""
    _check_disk(instance, attribute, value)
    instance.zero_copy = IZeroCopyBackend.providedBy(value)
    instance.asynchronous = IAsyncBlockBackend.providedBy(value)
    return value


def _note_acl(instance: Target, attribute: Any, value: IACLStore) -> IACLStore:
    """Check a new ACL store and learn, once, whether it needs transactions."""
    _provides(IACLStore)(instance, attribute, value)
    instance.transactional = ITransactionalACLStore.providedBy(value)
    return value


@define
class Target:
    """
    An AoE target: one disk (``backend``) answering at ``shelf``.``slot``.

    ``max_sectors`` is the sector count advertised in config replies and
    enforced on ATA requests: the target's own cap (255, none, by default).
    An interface whose MTU allows fewer serves a copy of the target with
    the smaller count (``for_interface``): the copy shares the backend and
    the ACL store, so every interface serves the same disk and state.
    ``identifier`` defaults to a ``DefaultIdentifier`` for the backend's size
    (``DefaultIdentifier.for_disk``): for a backend that provides
    ``IDiskIdentity``, the serial number and world-wide name derived from its
    identity, otherwise the serial ``"shelf.slot"`` and no world-wide name;
    ``serial``, if given, replaces the serial either way.  ``mask_limit`` is
    how many MACs a mask list edit may grow the list to.

    ``spec`` is the backend's ``SCHEME:SPEC`` as the administrator wrote
    it, so that log lines can say which disk a target is (``name``).
    ``sync`` asks for group commit on this target's writes: each is
    acknowledged only once durable (``--sync``, or ``sync = true`` in a
    ``[[target]]``).  ``stats`` counts what the target does (``aoe_twisted.core.stats``); the
    interface copies share it.

    ``asynchronous`` says the backend is an ``IAsyncBlockBackend``: its
    operations complete later, and the fast path leaves it alone.
    ``zero_copy`` and ``transactional`` say which optional interfaces the
    backend and the ACL store provide; they are learnt when either is set,
    so the per-frame paths test a bool instead of an interface.
    """

    shelf: int = field(validator=_between(0, BROADCAST_MAJOR - 1))
    slot: int = field(validator=_between(0, BROADCAST_MINOR - 1))
    backend: IBlockBackend = field(
        validator=_check_disk, on_setattr=setters.pipe(_note_backend)
    )
    acl: IACLStore = field(
        default=Factory(MemoryACLStore),
        validator=_provides(IACLStore),
        on_setattr=setters.pipe(_note_acl),
    )
    buffer_count: int = field(default=16, validator=_between(0, 0xFFFF))
    max_sectors: int = field(default=0xFF, validator=_between(1, 0xFF))
    firmware_version: int = field(default=FIRMWARE_VERSION, validator=_between(0, 0xFFFF))
    identifier: IIdentifier | None = field(default=None)
    mask_limit: int = field(default=MASK_LIST_LIMIT, validator=_between(0, MASK_LIST_CEILING))
    serial: str | None = field(default=None, validator=instance_of((str, type(None))))
    spec: str = field(default="", validator=instance_of(str))
    sync: bool = field(default=False, validator=instance_of(bool))
    stats: TargetStats = field(factory=TargetStats, eq=False, repr=False)
    zero_copy: bool = field(init=False, default=False)
    transactional: bool = field(init=False, default=False)
    asynchronous: bool = field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        """Learn the backend's and store's abilities; build the default identifier once."""
        self.zero_copy = IZeroCopyBackend.providedBy(self.backend)
        self.asynchronous = IAsyncBlockBackend.providedBy(self.backend)
        self.transactional = ITransactionalACLStore.providedBy(self.acl)
        if self.identifier is None:
            backend = self.backend
            identity = backend.disk_identity() if IDiskIdentity.providedBy(backend) else None
            self.identifier = DefaultIdentifier.for_disk(
                backend.size // SECTOR_SIZE,
                identity,
                serial=self.serial,
                fallback_serial=f"{self.shelf}.{self.slot}",
            )
        elif not IIdentifier.providedBy(self.identifier):
            raise TypeError(f"identifier must provide IIdentifier, not {self.identifier!r}")

    @property
    def address(self) -> str:
        """The target's address as initiators name it: ``e1.0``."""
        return f"e{self.shelf}.{self.slot}"

    @property
    def name(self) -> str:
        """The address and the backend, for log lines: ``e1.0 = file:/srv/aoe/disk0.img``."""
        if self.spec:
            return f"e{self.shelf}.{self.slot} = {self.spec}"
        return f"e{self.shelf}.{self.slot}"

    def for_interface(self, max_sectors: int) -> Target:
        """
        Return this target as an interface carrying at most ``max_sectors`` per frame serves it.

        The same disk, store and identity (``backend``, ``acl``,
        ``identifier`` are shared, not copied), with ``max_sectors`` no larger
        than the interface allows; ``self`` if the target's own cap is
        already that small.
        """
        if self.max_sectors <= max_sectors:
            return self
        return evolve(self, max_sectors=max_sectors)

    def addresses(self, major: int, minor: int) -> bool:
        """Return whether ``major``.``minor`` names this target; each wildcard applies alone."""
        return (major == self.shelf or major == BROADCAST_MAJOR) and (
            minor == self.slot or minor == BROADCAST_MINOR
        )

    def handle(self, src: bytes, request: Header) -> list[Header]:
        """
        Return the replies (none or one) to ``request`` from the host with MAC ``src``.

        ``decide``, with any disk operation carried out at once
        (``operations.perform``): for synchronous backends and tests.
        """
        replies = []
        for answer in self.decide(src, request):
            if isinstance(answer, Pending):
                try:
                    result = perform(answer.io, self.backend)
                except OSError as e:
                    replies.append(answer.finish(None, e))
                else:
                    replies.append(answer.finish(result))
            elif isinstance(answer, StoreFailure):
                replies.append(answer.reply)
            else:
                replies.append(answer)
        return replies

    def decide(self, src: bytes, request: Header) -> list[Answer]:
        """
        Return the answers (none or one) to ``request`` from the host with MAC ``src``.

        A ``Header`` is a reply; a ``Pending`` a reply that waits for a disk
        operation; a ``StoreFailure`` the error reply to a change the ACL
        store could not keep.  Responses, requests for other addresses and,
        while the mask list is not empty, requests from hosts not on it get
        no answer at all.
        """
        if request.flag_response:
            return []
        major = request.major
        minor = request.minor
        if not (
            (major == self.shelf or major == BROADCAST_MAJOR)
            and (minor == self.slot or minor == BROADCAST_MINOR)
        ):
            return []
        acl = self.acl
        if not mask_allows(acl.mask_list, src):
            return []
        stats = self.stats
        stats.seen(src, request.tag)
        if request.command == _ATA:
            answer = self._ata(src, request, acl)
            if isinstance(answer, Pending):
                stats.in_flight += 1
            else:
                _count_reply(stats, answer)
            return [answer]
        try:
            if not self.transactional:
                answers = self._control(src, request, acl)
            else:
                # A store shared between processes: decide on its latest state, and
                # let no other worker change it between our reading and our writing.
                with acl.transaction():  # type: ignore[attr-defined]
                    answers = self._control(src, request, acl)
        except OSError as e:
            reply = self._error(request, Error.DEVICE_UNAVAILABLE, _raw(request.arg))
            stats.aoe_error(Error.DEVICE_UNAVAILABLE)
            return [StoreFailure(self, reply, e)]
        for answer in answers:
            _count_reply(stats, answer)  # type: ignore[arg-type]
        return answers

    def _control(self, src: bytes, request: Header, acl: IACLStore) -> list[Answer]:
        """Answer a request other than Issue ATA Command: config, mask list, reserve."""
        command = request.command
        stats = self.stats
        if command == _CONFIG:
            stats.config += 1
            return self._config(request, acl)
        if command == _MASK:
            stats.mask += 1
            return [self._mask(request, acl)]
        if command == _RESERVE:
            stats.reserve += 1
            return [self._reserve(src, request, acl)]
        return [self._error(request, Error.UNRECOGNIZED_COMMAND_CODE, _raw(request.arg))]

    def reject(self, src: bytes, error: ProtocolError) -> list[Header]:
        """
        Return the error reply to a request whose decoding raised ``error``.

        The same filters as ``handle`` apply to the partial header the error
        carries; without one (or for a response) there is nothing to answer.
        """
        header = error.header
        if header is None or header.flag_response:
            return []
        if not self.addresses(header.major, header.minor):
            return []
        if not mask_allows(self.acl.mask_list, src):
            return []
        self.stats.aoe_error(error.code)
        return [self._error(header, error.code, _raw(header.arg))]

    def announcement(self) -> Header:
        """Return the unsolicited config response (tag 0) announcing this target at start-up."""
        return Header(
            VERSION,
            True,
            False,
            0,
            self.shelf,
            self.slot,
            _CONFIG,
            _NO_TAG,
            self._config_arg(ConfigCommand.READ, self.acl.config_string),
        )

    # -- replies ----------------------------------------------------------

    def _reply(self, request: Header, arg: object) -> Header:
        """Return a successful reply to ``request`` carrying ``arg`` from our own address."""
        return Header(
            VERSION, True, False, 0, self.shelf, self.slot, request.command, request.tag, arg
        )

    def _error(self, request: Header, code: int, arg: object) -> Header:
        """Return an AoE error reply (E flag and ``code``) to ``request`` carrying ``arg``."""
        return Header(
            VERSION, True, True, int(code), self.shelf, self.slot, request.command, request.tag, arg
        )

    # -- command 0: ATA -------------------------------------------------

    def _ata(self, src: bytes, request: Header, acl: IACLStore) -> Header | Pending:
        """Plan an ATA command unless the target is reserved by other hosts (IDENTIFY always)."""
        arg = request.arg
        if not isinstance(arg, ATAArg):
            self.stats.other_ata += 1
            return self._error(request, Error.BAD_ARGUMENT_PARAMETER, _raw(arg))
        kind = _ATA_KINDS.get(arg.cmd_status, "other_ata")
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        if arg.cmd_status != _IDENTIFY and not reserve_allows(acl.reserve_list, src):
            return self._error(request, Error.TARGET_IS_RESERVED, evolve(arg, data=b""))
        planned = plan_ata(arg, self.backend, self.identifier, self.max_sectors)
        if isinstance(planned, BackendIO):
            return Pending(self, src, request, planned)
        return self._reply(request, planned)

    # -- command 1: config ----------------------------------------------

    def _config_arg(self, ccmd: int, string: bytes) -> ConfigArg:
        """Return the config argument every config reply carries: our limits and ``string``."""
        return ConfigArg(
            self.buffer_count,
            self.firmware_version,
            self.max_sectors,
            VERSION,
            ccmd,
            len(string),
            string,
        )

    def _config(self, request: Header, acl: IACLStore) -> list[Header]:
        """Answer a Query Config request; test and prefix mismatches get no reply."""
        arg = request.arg
        if not isinstance(arg, ConfigArg):
            return [self._error(request, Error.BAD_ARGUMENT_PARAMETER, _raw(arg))]
        ccmd = arg.command
        current = acl.config_string
        if ccmd == ConfigCommand.READ:
            pass
        elif ccmd == ConfigCommand.TEST:
            if arg.string != current:
                return []
        elif ccmd == ConfigCommand.TEST_PREFIX:
            if not current.startswith(arg.string):
                return []
        elif ccmd == ConfigCommand.SET:
            if current and current != arg.string:
                return [
                    self._error(
                        request, Error.CONFIG_STRING_PRESENT, self._config_arg(ccmd, current)
                    )
                ]
            if current != arg.string:
                acl.set_config_string(arg.string)
                current = arg.string
        elif ccmd == ConfigCommand.FORCE_SET:
            if current != arg.string:
                acl.set_config_string(arg.string)
                current = arg.string
        else:
            return [
                self._error(request, Error.BAD_ARGUMENT_PARAMETER, self._config_arg(ccmd, current))
            ]
        return [self._reply(request, self._config_arg(ccmd, current))]

    # -- command 2: MAC mask list ---------------------------------------

    def _mask(self, request: Header, acl: IACLStore) -> Header:
        """Read or edit the MAC mask list; a failed edit is told in MError, not an AoE error."""
        arg = request.arg
        if not isinstance(arg, MACMaskArg):
            return self._error(request, Error.BAD_ARGUMENT_PARAMETER, _raw(arg))
        mcmd = arg.command
        if mcmd == MACMaskCommand.READ:
            macs = acl.mask_list
        elif mcmd == MACMaskCommand.EDIT:
            current = acl.mask_list
            result = edit_mask_list(current, arg.directives, self.mask_limit)
            macs = result.macs
            if macs != current:
                acl.set_mask_list(macs)
            if result.failed_index is not None:
                index = result.failed_index
                return self._reply(
                    request, MACMaskArg(mcmd, result.error, index, arg.directives[:index])
                )
        else:
            return self._error(request, Error.BAD_ARGUMENT_PARAMETER, MACMaskArg(mcmd))
        listed = tuple(Directive(DirectiveCommand.NONE, mac) for mac in macs)
        return self._reply(request, MACMaskArg(mcmd, 0, len(listed), listed))

    # -- command 3: reserve/release -------------------------------------

    def _reserve(self, src: bytes, request: Header, acl: IACLStore) -> Header:
        """Read or replace the reserve list; only a member (or anyone, when empty) may set it."""
        arg = request.arg
        if not isinstance(arg, ReserveReleaseArg) or len(arg.macs) > RESERVE_LIST_LIMIT:
            return self._error(request, Error.BAD_ARGUMENT_PARAMETER, _raw(arg))
        rcmd = arg.command
        current = acl.reserve_list
        if rcmd == ReserveReleaseCommand.READ:
            pass
        elif rcmd == ReserveReleaseCommand.SET or rcmd == ReserveReleaseCommand.FORCE_SET:
            if rcmd == ReserveReleaseCommand.SET and current and src not in current:
                listed = ReserveReleaseArg(rcmd, len(current), current)
                return self._error(request, Error.TARGET_IS_RESERVED, listed)
            if arg.macs != current:
                acl.set_reserve_list(arg.macs)
                current = arg.macs
        else:
            listed = ReserveReleaseArg(rcmd, len(current), current)
            return self._error(request, Error.BAD_ARGUMENT_PARAMETER, listed)
        return self._reply(request, ReserveReleaseArg(rcmd, len(current), current))


#: The request kind (``core.stats.REQUEST_KINDS``) each ATA command is counted as.
_ATA_KINDS = {
    int(ATACmdStatus.READ_28BIT): "read",
    int(ATACmdStatus.READ_48BIT): "read",
    int(ATACmdStatus.WRITE_28BIT): "write",
    int(ATACmdStatus.WRITE_48BIT): "write",
    int(ATACmdStatus.IDENTIFY): "identify",
    int(ATACmdStatus.FLUSH): "flush",
    int(ATACmdStatus.FLUSH_EXT): "flush",
}

_OPERATION_NAMES = {IOKind.READ: "read", IOKind.WRITE: "write", IOKind.FLUSH: "flush"}

#: ATA status bits that mean the command failed (ERR, DF).
_ATA_FAILED = 0x21


def _count_reply(stats: TargetStats, reply: Header) -> None:
    """Count an error ``reply`` (AoE error code, or an ATA status with ERR) in ``stats``."""
    if reply.flag_error:
        stats.aoe_error(reply.error)
        return
    arg = reply.arg
    if isinstance(arg, ATAArg) and arg.cmd_status & _ATA_FAILED:
        stats.ata_errors += 1


def _raw(arg: object) -> RawArg:
    """Return ``arg`` as raw bytes, to echo in an error reply whatever the request carried."""
    if isinstance(arg, RawArg):
        return arg
    if arg is None:
        return RawArg()
    try:
        return RawArg(arg.to_bytes())  # type: ignore[attr-defined]
    except (ProtocolError, ValueError):
        return RawArg()
