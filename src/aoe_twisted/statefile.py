# -*- test-case-name: tests.test_statefile -*-
"""
Target state that survives a restart and a crash: a file-backed ``IACLStore``.

``twistd aoe --state-dir DIR`` keeps what initiators may change on each
target (the config string, the MAC mask list and the reserve list, AoEr11
3.2-3.4) in one small JSON file per target, ``DIR/e{shelf}.{slot}.json``::

    {
      "version": 1,
      "shelf": 0,
      "slot": 1,
      "config_string": "host=alpha",
      "mask_list": ["52:54:00:12:34:56"],
      "reserve_list": []
    }

A config string that is not valid UTF-8 is written as
``"config_string_hex"`` instead of ``"config_string"``, so every byte string
round-trips exactly while the usual, textual one stays readable.

Why it is done this way: a change an initiator was told about must not be
lost, and a crash must never leave a half-written file.  So every ``set_*``
writes the whole new state to a temporary file in the same directory,
fsyncs it, renames it over the old file (``os.replace``, atomic on POSIX)
and fsyncs the directory, all before it returns; only then does the target
build the reply that confirms the change.  A crash at any point leaves
either the old file or the new one.  The value in memory changes only after
the file did, so a failed write (``OSError``) leaves both as they were and
the request goes unanswered.

A state file that cannot be read or does not make sense raises
``StateFileError`` with one line naming the file: the server refuses to
start rather than silently forget an access control list.  A missing file is
a target's first start: its state is empty until something is set.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from aoe_twisted.core.acl import MASK_LIST_CEILING, RESERVE_LIST_LIMIT, mac_tuple
from aoe_twisted.core.wire import MAX_CONFIG_STRING, format_mac, parse_mac
from aoe_twisted.interfaces import IStatePersister

__all__ = [
    "STATE_VERSION",
    "FileACLStore",
    "StateFileError",
    "check_state_dir",
    "make_state_dir",
    "state_path",
]

_log = Logger()

STATE_VERSION = 1
"""The ``"version"`` a state file must carry; a file from a later format is refused."""

_KEYS = frozenset(
    {"version", "shelf", "slot", "config_string", "config_string_hex", "mask_list", "reserve_list"}
)
_MAX_FILE = 64 * 1024
"""No valid state file comes near this size; a bigger one is refused unread."""


class StateFileError(Exception):
    """A state file cannot be read or is not valid; ``str()`` is one line naming the file."""


def state_path(state_dir: Path | str, shelf: int, slot: int) -> Path:
    """Return the path of the state file of target ``shelf``.``slot`` in ``state_dir``."""
    return Path(state_dir) / f"e{shelf}.{slot}.json"


def _kind(mode: int) -> str:
    """Name the kind of file ``mode`` (an ``st_mode``) says it is, for a message."""
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a directory"


def make_state_dir(state_dir: Path | str, owner: tuple[int, int] | None = None) -> bool:
    """
    Make sure ``state_dir`` is a directory, creating it (mode 0700) if it is missing.

    A directory this creates is given to ``owner`` (``(uid, gid)``, -1 for
    either to keep it) if given: the user ``twistd --uid`` will switch to,
    since ``makeService`` runs as root before the switch and a directory
    made for the server must be the server's.  One that exists is left as
    it is.  Return whether it was created.  Raise ``StateFileError``, one
    line naming the path and saying what it is, if the path (or one of its
    parents) exists but is not a directory, or cannot be created.
    """
    path = Path(state_dir)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        raise StateFileError(_blocked(path)) from None
    except OSError as e:
        raise StateFileError(f"{path}: {e.strerror or e}") from None
    else:
        if stat.S_ISDIR(mode):
            return False
        raise StateFileError(f"{path} is {_kind(mode)}, not a directory")
    try:
        os.makedirs(path, mode=0o700)
        if owner is not None:
            os.chown(path, *owner)
    except FileExistsError:
        return make_state_dir(path, owner)  # made meanwhile by someone else: check it
    except NotADirectoryError:
        raise StateFileError(_blocked(path)) from None
    except OSError as e:
        raise StateFileError(f"cannot create {path}: {e.strerror or e}") from None
    return True


def _blocked(path: Path) -> str:
    """Say which parent of ``path`` is in the way, not being a directory."""
    for parent in reversed(path.parents):
        try:
            mode = os.stat(parent).st_mode
        except OSError:
            break
        if not stat.S_ISDIR(mode):
            return f"cannot create {path}: {parent} is {_kind(mode)}, not a directory"
    return f"cannot create {path}: a parent is not a directory"


@contextlib.contextmanager
def _acting_as(uid: int | None, gid: int | None) -> Iterator[None]:
    """
    Within the block, use the file system as ``uid``/``gid`` would after ``twistd``'s switch.

    Only the effective ids (which Linux checks file access with) and the
    supplementary groups change, as ``twistd`` will set them
    (``initgroups``); the real and saved uid stay root's, so the ids are
    put back afterwards.  Needs root; ``None`` leaves an id as it is.
    """
    import pwd

    euid, egid, groups = os.geteuid(), os.getegid(), os.getgroups()
    try:
        if uid is not None:
            try:
                name = pwd.getpwuid(uid).pw_name
                os.setgroups(os.getgrouplist(name, egid if gid is None else gid))
            except KeyError:
                os.setgroups([] if gid is None else [gid])
        if gid is not None:
            os.setegid(gid)
        if uid is not None:
            os.seteuid(uid)
        yield
    finally:
        os.seteuid(euid)
        os.setegid(egid)
        os.setgroups(groups)


def _user_name(uid: int) -> str:
    """Return ``uid``'s user name and number, as in ``nobody (uid 65534)``."""
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _owner(st: os.stat_result) -> str:
    """Return a file's ``user:group, mode 0700`` for a message."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"owned by {user}:{group}, mode {stat.S_IMODE(st.st_mode):04o}"


def check_state_dir(state_dir: Path | str, uid: int | None = None, gid: int | None = None) -> None:
    """
    Check that the server's user can keep state files in ``state_dir``; else one line.

    Every change of a target's state creates a temporary file there,
    renames it over the state file and opens the directory to fsync it.
    This does the same with a probe file, as the user that will do it:
    ``uid``/``gid`` when given (the user ``twistd --uid``/``--gid`` will
    switch to, checked now, as root, with that user's effective ids), else
    this process.  Trying is the only check that sees everything (modes,
    ACLs, a read-only mount, a security module) and it leaves nothing
    behind.  Without it a directory the server cannot write is found by the
    first initiator that sets a config string, a mask or a reservation, and
    again at every retransmission.  Raise ``StateFileError`` naming the
    directory, the user and why.
    """
    path = Path(state_dir)
    switch = os.geteuid() == 0 and (uid is not None or gid is not None)
    who = _user_name(os.geteuid() if not switch or uid is None else uid)
    probe = path / f".probe-{os.getpid()}.tmp"
    try:
        with _acting_as(uid, gid) if switch else contextlib.nullcontext():
            directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            os.close(directory)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        try:
            owned = f" ({_owner(os.stat(path))})"
        except OSError:
            owned = ""
        raise StateFileError(
            f"{path}: {who} cannot keep state files here: {e.strerror or e}{owned}"
        ) from None


def encode_state(
    shelf: int,
    slot: int,
    config_string: bytes,
    mask_list: tuple[bytes, ...],
    reserve_list: tuple[bytes, ...],
) -> bytes:
    """Return the state file contents (UTF-8 JSON, one key a line) for this state."""
    state: dict[str, Any] = {"version": STATE_VERSION, "shelf": shelf, "slot": slot}
    try:
        state["config_string"] = config_string.decode("utf-8")
    except UnicodeDecodeError:
        state["config_string_hex"] = config_string.hex()
    state["mask_list"] = [format_mac(mac) for mac in mask_list]
    state["reserve_list"] = [format_mac(mac) for mac in reserve_list]
    return (json.dumps(state, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def decode_state(
    path: Path, data: bytes, shelf: int, slot: int
) -> tuple[bytes, tuple[bytes, ...], tuple[bytes, ...]]:
    """
    Return ``(config_string, mask_list, reserve_list)`` from a state file's ``data``.

    Raise ``StateFileError`` naming ``path`` and the first thing wrong.
    """

    def bad(why: str) -> StateFileError:
        return StateFileError(f"state file {path}: {why}")

    try:
        state = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise bad(f"not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(state, dict):
        raise bad(f"expected a JSON object, not {type(state).__name__}")
    version = state.get("version")
    if version != STATE_VERSION or isinstance(version, bool):
        raise bad(f'"version" must be {STATE_VERSION}, not {version!r}')
    unknown = sorted(set(state) - _KEYS)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}")
    for key, expected in (("shelf", shelf), ("slot", slot)):
        if key in state and state[key] != expected:
            raise bad(f'"{key}" is {state[key]!r} but the file is for e{shelf}.{slot}')

    if "config_string" in state and "config_string_hex" in state:
        raise bad('both "config_string" and "config_string_hex" are given')
    if "config_string_hex" in state:
        text = state["config_string_hex"]
        if not isinstance(text, str):
            raise bad('"config_string_hex" must be a string of hex digits')
        try:
            config = bytes.fromhex(text)
        except ValueError:
            raise bad('"config_string_hex" is not hex digits') from None
    else:
        text = state.get("config_string", "")
        if not isinstance(text, str):
            raise bad(f'"config_string" must be a string, not {type(text).__name__}')
        try:
            config = text.encode("utf-8")
        except UnicodeEncodeError:
            raise bad('"config_string" is not encodable as UTF-8') from None
    if len(config) > MAX_CONFIG_STRING:
        raise bad(f"config string of {len(config)} bytes, at most {MAX_CONFIG_STRING}")

    lists = []
    for key, limit in (("mask_list", MASK_LIST_CEILING), ("reserve_list", RESERVE_LIST_LIMIT)):
        value = state.get(key, [])
        if not isinstance(value, list):
            raise bad(f'"{key}" must be a list of MAC addresses, not {type(value).__name__}')
        if len(value) > limit:
            raise bad(f'"{key}" has {len(value)} MAC addresses, at most {limit}')
        macs = []
        for item in value:
            if not isinstance(item, str):
                raise bad(f'"{key}": not a MAC address: {item!r}')
            try:
                macs.append(parse_mac(item))
            except ValueError as e:
                raise bad(f'"{key}": {e}') from None
        lists.append(tuple(macs))
    return config, lists[0], lists[1]


@implementer(IStatePersister)
class FileACLStore:
    """
    An ``IACLStore`` kept in ``path``: every ``set_*`` is durable when it returns.

    It provides ``IStatePersister``: ``replace_state`` writes a whole state,
    which is how the shared store of ``--workers`` persists through it.

    Open one with ``FileACLStore.open(state_dir, shelf, slot)``.  Reads come
    from memory; the file is read once, when the store is opened.  ``fs`` is
    the module the store calls for file system operations (``os`` unless a
    test passes a recorder); it needs ``open``, ``write``, ``fsync``,
    ``close``, ``replace`` and ``unlink``.
    """

    exists = False
    """Whether the state file existed when the store was opened (or has been written since)."""

    def __init__(
        self,
        path: Path,
        shelf: int,
        slot: int,
        config_string: bytes = b"",
        mask_list: Iterable[bytes] = (),
        reserve_list: Iterable[bytes] = (),
        fs: Any = os,
    ) -> None:
        self.path = Path(path)
        self.shelf = shelf
        self.slot = slot
        self.config_string = bytes(config_string)
        self.mask_list = mac_tuple(mask_list)
        self.reserve_list = mac_tuple(reserve_list)
        self.fs = fs

    @property
    def temporary_path(self) -> Path:
        """Where a new state is written before it is renamed over ``path``."""
        return self.path.with_name(f".{self.path.name}.tmp")

    @classmethod
    def open(cls, state_dir: Path | str, shelf: int, slot: int, fs: Any = os) -> FileACLStore:
        """
        Return the store of ``shelf``.``slot`` in ``state_dir``, with the state its file holds.

        A missing file is an empty state (the file is written at the first
        change); ``exists`` tells which.  A temporary file left by a crash
        during a write is removed: the rename never happened, so the state
        file still holds the last acknowledged state.  Raise
        ``StateFileError`` if the file cannot be read or is not valid.
        """
        path = state_path(state_dir, shelf, slot)
        store = cls(path, shelf, slot, fs=fs)
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX_FILE + 1)
        except FileNotFoundError:
            store.exists = False
        except OSError as e:
            reason = e.strerror or str(e)
            if e.errno == errno.EISDIR:
                reason = "is a directory"
            raise StateFileError(f"state file {path}: cannot read: {reason}") from None
        else:
            if len(data) > _MAX_FILE:
                raise StateFileError(f"state file {path}: larger than {_MAX_FILE} bytes")
            config, masks, reserves = decode_state(path, data, shelf, slot)
            store.config_string, store.mask_list, store.reserve_list = config, masks, reserves
            store.exists = True
        store._remove_stale_temporary()
        return store

    def _remove_stale_temporary(self) -> None:
        """Remove a temporary file that a crash in the middle of a write left behind."""
        try:
            self.fs.unlink(self.temporary_path)
        except FileNotFoundError:
            return
        except OSError as e:
            _log.warn(
                "cannot remove stale temporary state file {path}: {error}",
                path=str(self.temporary_path),
                error=e.strerror or str(e),
            )
            return
        _log.info(
            "removed {path}, left by an interrupted write; {state} holds the last "
            "acknowledged state",
            path=str(self.temporary_path),
            state=str(self.path),
        )

    # -- IACLStore ----------------------------------------------------------

    def set_config_string(self, value: bytes) -> None:
        """Replace the config string, durably."""
        self._store(bytes(value), self.mask_list, self.reserve_list)

    def set_mask_list(self, macs: tuple[bytes, ...]) -> None:
        """Replace the MAC mask list, durably."""
        self._store(self.config_string, mac_tuple(macs), self.reserve_list)

    def set_reserve_list(self, macs: tuple[bytes, ...]) -> None:
        """Replace the reserve list, durably."""
        self._store(self.config_string, self.mask_list, mac_tuple(macs))

    def seed(
        self,
        config_string: bytes | None = None,
        mask_list: tuple[bytes, ...] | None = None,
    ) -> None:
        """
        Give a target with no state file yet its initial state, and write the file.

        This is how ``--config-string`` and ``--mask`` reach a new target; a
        target whose file exists keeps what the file says.
        """
        config = self.config_string if config_string is None else bytes(config_string)
        masks = self.mask_list if mask_list is None else mac_tuple(mask_list)
        self._store(config, masks, self.reserve_list)

    def replace_state(
        self, config_string: bytes, mask_list: tuple[bytes, ...], reserve_list: tuple[bytes, ...]
    ) -> None:
        """
        Replace the whole state at once, durably.

        What a store shared by worker processes persists through: another
        worker may have changed the parts this store last saw, so each change
        writes all three.
        """
        self._store(bytes(config_string), mac_tuple(mask_list), mac_tuple(reserve_list))

    # -- writing ------------------------------------------------------------

    def _store(
        self, config_string: bytes, mask_list: tuple[bytes, ...], reserve_list: tuple[bytes, ...]
    ) -> None:
        """
        Make this state the file's, durably: write a temporary file, fsync, rename, fsync the dir.

        The state in memory changes when the rename has happened, so memory
        always matches the file.  Raise ``OSError`` if any step fails: before
        the rename the temporary file is removed and nothing changed; if only
        the directory fsync fails the new state is in place but not known to
        be durable, so the caller must not confirm it either.
        """
        fs = self.fs
        data = encode_state(self.shelf, self.slot, config_string, mask_list, reserve_list)
        temporary = self.temporary_path
        try:
            fd = fs.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = fs.write(fd, view)
                    view = view[written:]
                fs.fsync(fd)
            finally:
                fs.close(fd)
            fs.replace(temporary, self.path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                fs.unlink(temporary)
            if isinstance(e, OSError):
                self._log_failure(e)
            raise
        self.config_string, self.mask_list, self.reserve_list = (
            config_string,
            mask_list,
            reserve_list,
        )
        self.exists = True
        try:
            directory = fs.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fs.fsync(directory)
            finally:
                fs.close(directory)
        except OSError as e:
            self._log_failure(e)
            raise

    def _log_failure(self, error: OSError) -> None:
        """Say, in one line naming the file, that a change could not be stored (nor confirmed)."""
        _log.error(
            "cannot store the state of e{shelf}.{slot} in {path}: {error}; "
            "the change is not confirmed to the initiator",
            shelf=self.shelf,
            slot=self.slot,
            path=str(self.path),
            error=error.strerror or str(error),
        )

    def __repr__(self) -> str:
        return (
            f"<FileACLStore {self.path} config_string={self.config_string!r} "
            f"mask_list={[format_mac(m) for m in self.mask_list]} "
            f"reserve_list={[format_mac(m) for m in self.reserve_list]}>"
        )
