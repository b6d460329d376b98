# -*- test-case-name: tests.test_statefile -*-
"""
``aoe_twisted.statefile``: target state that survives a restart and a crash.

Unit tests of ``FileACLStore`` (format, atomic durable writes in the right
order, refusal of bad files), of ``twistd aoe --state-dir`` (``makeService``
and a real ``twistd`` refusing a corrupt file), and one end-to-end test: a
server killed with SIGKILL comes back with exactly the state it last
acknowledged over the wire.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    SECTOR_SIZE,
    ATACmdStatus,
    ConfigArg,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    Error,
    Header,
    MACMaskCommand,
    ReserveReleaseCommand,
)
from aoe_twisted.interfaces import IStatePersister
from aoe_twisted.statefile import (
    STATE_VERSION,
    FileACLStore,
    StateFileError,
    check_state_dir,
    encode_state,
    make_state_dir,
    state_path,
)
from aoe_twisted.tap import Options, makeService

HOST = bytes.fromhex("525400123456")
OTHER = bytes.fromhex("02000000aa01")
THIRD = bytes.fromhex("02000000aa02")


class RecordingFS:
    """
    The ``fs`` of a ``FileACLStore`` that calls ``os`` and records each call.

    ``fail`` names an operation (and optionally the how-manieth call of it)
    that raises ``OSError(EIO)`` instead, to test what a failure leaves.
    """

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail
        self.names: dict[int, str] = {}

    def _maybe_fail(self, name: str) -> None:
        if self.fail == name:
            raise OSError(errno.EIO, f"injected {name} failure")

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        self._maybe_fail("open")
        fd = os.open(path, flags, mode)
        self.names[fd] = Path(path).name
        self.calls.append(("open", Path(path).name))
        return fd

    def write(self, fd: int, data: Any) -> int:
        self._maybe_fail("write")
        self.calls.append(("write", self.names[fd]))
        # Short writes, to check the store writes everything.
        return os.write(fd, bytes(data[:100]))

    def fsync(self, fd: int) -> None:
        self.calls.append(("fsync", self.names[fd]))
        self._maybe_fail("fsync")
        if not self.names[fd].endswith(".tmp"):
            self._maybe_fail("fsync-directory")
        os.fsync(fd)

    def close(self, fd: int) -> None:
        self.calls.append(("close", self.names.pop(fd)))
        os.close(fd)

    def replace(self, src: Any, dst: Any) -> None:
        self._maybe_fail("replace")
        self.calls.append(("replace", Path(src).name, Path(dst).name))
        os.replace(src, dst)

    def unlink(self, path: Any) -> None:
        self.calls.append(("unlink", Path(path).name))
        os.unlink(path)


class FileACLStoreTests(SynchronousTestCase):
    """What a ``FileACLStore`` keeps, where and how."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def reopen(self, shelf: int = 0, slot: int = 1) -> FileACLStore:
        return FileACLStore.open(self.dir, shelf, slot)

    def test_provides_interface(self) -> None:
        """A store provides ``IStatePersister`` (an ``IACLStore`` with ``replace_state``)."""
        self.assertTrue(verifyObject(IStatePersister, self.reopen()))

    def test_missing_file_is_empty(self) -> None:
        """With no file the state is empty, ``exists`` is false and nothing is written."""
        store = self.reopen()
        self.assertEqual(
            (store.config_string, store.mask_list, store.reserve_list, store.exists),
            (b"", (), (), False),
        )
        self.assertEqual(os.listdir(self.dir), [])

    def test_path(self) -> None:
        """The file of e7.3 is ``e7.3.json`` in the state directory."""
        self.assertEqual(state_path(self.dir, 7, 3), self.dir / "e7.3.json")
        store = self.reopen(7, 3)
        store.set_config_string(b"x")
        self.assertEqual(os.listdir(self.dir), ["e7.3.json"])

    def test_round_trip(self) -> None:
        """Each set is in the file at once, and a new store reads back all three."""
        store = self.reopen()
        store.set_config_string(b"host=alpha")
        self.assertEqual(self.reopen().config_string, b"host=alpha")
        store.set_mask_list((HOST, OTHER))
        self.assertEqual(self.reopen().mask_list, (HOST, OTHER))
        store.set_reserve_list((OTHER,))
        again = self.reopen()
        self.assertEqual(
            (again.config_string, again.mask_list, again.reserve_list, again.exists),
            (b"host=alpha", (HOST, OTHER), (OTHER,), True),
        )
        self.assertEqual(
            (store.config_string, store.mask_list, store.reserve_list),
            (b"host=alpha", (HOST, OTHER), (OTHER,)),
        )

    def test_readable_format(self) -> None:
        """The file is indented JSON a person can read: text, MACs with colons."""
        store = self.reopen()
        store.set_config_string(b"host=alpha")
        store.set_mask_list((HOST,))
        text = (self.dir / "e0.1.json").read_text()
        self.assertEqual(
            json.loads(text),
            {
                "version": STATE_VERSION,
                "shelf": 0,
                "slot": 1,
                "config_string": "host=alpha",
                "mask_list": ["52:54:00:12:34:56"],
                "reserve_list": [],
            },
        )
        self.assertIn('\n  "mask_list": [\n    "52:54:00:12:34:56"\n  ]', text)

    def test_binary_config_string(self) -> None:
        """A config string that is not UTF-8 is kept in hex, and every byte value round-trips."""
        value = bytes(range(256)) * 4
        self.reopen().set_config_string(value)
        state = json.loads((self.dir / "e0.1.json").read_text())
        self.assertNotIn("config_string", state)
        self.assertEqual(state["config_string_hex"], value.hex())
        self.assertEqual(self.reopen().config_string, value)

    def test_unicode_config_string(self) -> None:
        """A UTF-8 config string is stored as text, non-ASCII characters included."""
        value = "disque-é-☃".encode()
        self.reopen().set_config_string(value)
        self.assertIn("disque-é-☃", (self.dir / "e0.1.json").read_text(encoding="utf-8"))
        self.assertEqual(self.reopen().config_string, value)

    def test_empty_after_clearing(self) -> None:
        """Clearing everything is a change too: the file then holds the empty state."""
        store = self.reopen()
        store.set_mask_list((HOST,))
        store.set_mask_list(())
        again = self.reopen()
        self.assertEqual((again.mask_list, again.exists), ((), True))

    def test_no_temporary_files_left(self) -> None:
        """After many sets the directory holds the state file and nothing else."""
        store = self.reopen()
        for n in range(20):
            store.set_config_string(b"n=%d" % n)
            store.set_reserve_list((HOST,) * (n % 3))
        self.assertEqual(os.listdir(self.dir), ["e0.1.json"])
        self.assertEqual(self.reopen().config_string, b"n=19")

    def test_file_mode(self) -> None:
        """The state file is readable and writable by its owner only."""
        self.reopen().set_config_string(b"x")
        self.assertEqual((self.dir / "e0.1.json").stat().st_mode & 0o777, 0o600)

    def test_durable_order(self) -> None:
        """
        A set writes a temporary file, fsyncs it, closes it, renames it over
        the state file and then fsyncs the directory, in that order.
        """
        fs = RecordingFS()
        store = FileACLStore.open(self.dir, 0, 1, fs=fs)
        fs.calls.clear()
        store.set_mask_list((HOST,))
        tmp, final, directory = ".e0.1.json.tmp", "e0.1.json", self.dir.name
        writes = [call for call in fs.calls if call[0] == "write"]
        self.assertGreater(len(writes), 1, "the short-writing fs should need several writes")
        self.assertEqual(
            [call for call in fs.calls if call[0] != "write"],
            [
                ("open", tmp),
                ("fsync", tmp),
                ("close", tmp),
                ("replace", tmp, final),
                ("open", directory),
                ("fsync", directory),
                ("close", directory),
            ],
        )
        self.assertEqual(fs.calls[1:1 + len(writes)], writes)
        self.assertEqual(self.reopen().mask_list, (HOST,))

    def test_failure_before_rename_changes_nothing(self) -> None:
        """
        If writing, fsyncing or renaming fails the set raises, the old file
        and the value in memory are unchanged and no temporary file is left.
        """
        for step in ("open", "write", "fsync", "replace"):
            with self.subTest(step=step):
                self.reopen().set_config_string(b"old")
                store = FileACLStore.open(self.dir, 0, 1, fs=RecordingFS(fail=step))
                with self.assertRaises(OSError):
                    store.set_config_string(b"new")
                self.assertEqual(store.config_string, b"old")
                self.assertEqual(self.reopen().config_string, b"old")
                self.assertEqual(os.listdir(self.dir), ["e0.1.json"])

    def test_directory_fsync_failure(self) -> None:
        """
        If only the directory fsync fails the set raises (so nothing confirms
        it), but memory matches the file, which already holds the new state.
        """
        self.reopen().set_config_string(b"old")
        store = FileACLStore.open(self.dir, 0, 1, fs=RecordingFS(fail="fsync-directory"))
        with self.assertRaises(OSError):
            store.set_config_string(b"new")
        self.assertEqual(store.config_string, b"new")
        self.assertEqual(self.reopen().config_string, b"new")
        self.assertEqual(os.listdir(self.dir), ["e0.1.json"])

    def test_failure_is_not_confirmed_by_target(self) -> None:
        """
        A target whose store cannot write answers with an AoE error
        (``DEVICE_UNAVAILABLE``): the change is not confirmed, and not made.
        """
        from aoe_twisted.backends.memory import MemoryBackend

        store = FileACLStore.open(self.dir, 0, 1, fs=RecordingFS(fail="fsync"))
        target = Target(0, 1, MemoryBackend(64 * SECTOR_SIZE), acl=store)
        arg = ConfigArg(command=ConfigCommand.SET, string_length=3, string=b"new")
        request = Header(major=0, minor=1, command=1, tag=b"\0\0\0\1", arg=arg)
        [reply] = target.handle(HOST, request)
        self.assertEqual(
            (reply.flag_response, reply.flag_error, reply.error),
            (True, True, Error.DEVICE_UNAVAILABLE),
        )
        self.assertEqual(store.config_string, b"")
        self.assertEqual(os.listdir(self.dir), [])

    def test_stale_temporary_removed(self) -> None:
        """A temporary file left by a crash mid-write is removed; the state file wins."""
        self.reopen().set_config_string(b"acknowledged")
        (self.dir / ".e0.1.json.tmp").write_text('{"version": 1, "config_str')
        store = self.reopen()
        self.assertEqual(store.config_string, b"acknowledged")
        self.assertEqual(os.listdir(self.dir), ["e0.1.json"])

    def test_macs_must_be_six_bytes(self) -> None:
        """A MAC that is not 6 bytes raises ``ValueError`` and writes nothing."""
        store = self.reopen()
        with self.assertRaises(ValueError):
            store.set_mask_list((b"\x01\x02",))
        self.assertEqual(os.listdir(self.dir), [])

    def test_seed(self) -> None:
        """``seed`` sets the initial config string and mask list and writes the file."""
        store = self.reopen()
        store.seed(b"initial", (HOST,))
        again = self.reopen()
        self.assertEqual(
            (again.config_string, again.mask_list, again.exists), (b"initial", (HOST,), True)
        )


class BadStateFileTests(SynchronousTestCase):
    """A state file that is unreadable or wrong stops everything, with one line naming it."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "e0.1.json"

    def assertRefused(self, content: bytes | str, *words: str) -> str:
        """Write ``content`` as e0.1's file; opening it must raise naming it and ``words``."""
        if isinstance(content, str):
            content = content.encode()
        self.path.write_bytes(content)
        with self.assertRaises(StateFileError) as caught:
            FileACLStore.open(self.dir, 0, 1)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(str(self.path), message)
        for word in words:
            self.assertIn(word, message)
        # Never silently reset: the file is still there, untouched.
        self.assertEqual(self.path.read_bytes(), content)
        return message

    def good(self, **changes: Any) -> str:
        """A valid state file with ``changes`` applied (a value of ``...`` deletes the key)."""
        state: dict[str, Any] = json.loads(encode_state(0, 1, b"cfg", (HOST,), ()))
        for key, value in changes.items():
            if value is ...:
                del state[key]
            else:
                state[key] = value
        return json.dumps(state)

    def test_valid_control(self) -> None:
        """The template is accepted (so each refusal below is for the one change)."""
        self.path.write_text(self.good())
        self.assertEqual(FileACLStore.open(self.dir, 0, 1).mask_list, (HOST,))

    def test_optional_keys(self) -> None:
        """Only "version" is required: a hand-written minimal file is fine."""
        self.path.write_text('{"version": 1}')
        store = FileACLStore.open(self.dir, 0, 1)
        self.assertEqual((store.config_string, store.mask_list, store.reserve_list), (b"", (), ()))

    def test_empty(self) -> None:
        """An empty file (a crash in a careless editor) is refused."""
        self.assertRefused(b"", "not valid JSON")

    def test_truncated(self) -> None:
        self.assertRefused(self.good()[:-5], "not valid JSON")

    def test_not_utf8(self) -> None:
        self.assertRefused(b'{"version": 1, "config_string": "\xff"}', "not UTF-8")

    def test_not_object(self) -> None:
        self.assertRefused("[1, 2]", "JSON object")

    def test_wrong_version(self) -> None:
        self.assertRefused(self.good(version=2), '"version" must be 1, not 2')

    def test_missing_version(self) -> None:
        self.assertRefused(self.good(version=...), '"version"')

    def test_boolean_version(self) -> None:
        self.assertRefused(self.good(version=True), '"version"')

    def test_unknown_key(self) -> None:
        self.assertRefused(self.good(mask_lst=[]), "unknown key 'mask_lst'")

    def test_other_target(self) -> None:
        """A file copied from another target's name is refused rather than served."""
        self.assertRefused(self.good(slot=2), '"slot" is 2', "e0.1")

    def test_config_string_type(self) -> None:
        self.assertRefused(self.good(config_string=5), '"config_string" must be a string')

    def test_config_string_hex_bad(self) -> None:
        self.assertRefused(self.good(config_string=..., config_string_hex="zz"), "hex")

    def test_config_string_both(self) -> None:
        self.assertRefused(self.good(config_string_hex="00"), "both")

    def test_config_string_too_long(self) -> None:
        self.assertRefused(self.good(config_string="x" * 1025), "1025 bytes, at most 1024")

    def test_lone_surrogate(self) -> None:
        self.assertRefused(
            '{"version": 1, "config_string": "\\ud800"}', '"config_string"', "UTF-8"
        )

    def test_mask_list_type(self) -> None:
        self.assertRefused(self.good(mask_list="52:54:00:12:34:56"), '"mask_list" must be a list')

    def test_mask_list_bad_mac(self) -> None:
        self.assertRefused(self.good(mask_list=["52:54:00:12:34"]), '"mask_list"', "not a MAC")

    def test_reserve_list_item_type(self) -> None:
        self.assertRefused(self.good(reserve_list=[42]), '"reserve_list"', "42")

    def test_reserve_list_too_long(self) -> None:
        macs = ["02:00:00:00:00:01"] * 256
        self.assertRefused(self.good(reserve_list=macs), "256 MAC addresses, at most 255")

    def test_huge_file(self) -> None:
        self.assertRefused(b" " * (1 << 17), "larger than")

    def test_directory(self) -> None:
        """A directory where the file should be is refused (root included)."""
        self.path.mkdir()
        with self.assertRaises(StateFileError) as caught:
            FileACLStore.open(self.dir, 0, 1)
        self.assertIn(str(self.path), str(caught.exception))
        self.assertIn("cannot read", str(caught.exception))

    def test_permission_denied(self) -> None:
        """A file the server may not read is refused, naming it and the reason."""
        if os.geteuid() == 0:
            raise self.skipTest("root reads files whatever their mode")
        self.path.write_text(self.good())
        self.path.chmod(0)
        self.addCleanup(self.path.chmod, 0o600)
        with self.assertRaises(StateFileError) as caught:
            FileACLStore.open(self.dir, 0, 1)
        self.assertIn(str(self.path), str(caught.exception))
        self.assertIn("Permission denied", str(caught.exception))


def parse(*argv: str) -> Options:
    """Parse ``twistd aoe`` arguments."""
    options = Options()
    options.parseOptions(list(argv))
    return options


class MakeServiceStateTests(SynchronousTestCase):
    """``twistd aoe --state-dir``: each target's state in a file, the file winning."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())

    def serve(self, *argv: str) -> list[Target]:
        options = parse("-i", "eth0", "-b", "memory:1M", "--target", "2.3=memory:1M",
                        "--state-dir", str(self.dir), *argv)
        return makeService(options).targets  # type: ignore[attr-defined, no-any-return]

    def test_default_in_memory(self) -> None:
        """Without --state-dir the state is in memory, as before."""
        from aoe_twisted.core.acl import MemoryACLStore

        options = parse("-i", "eth0", "-b", "memory:1M")
        self.assertIsNone(options["state-dir"])
        (target,) = makeService(options).targets  # type: ignore[attr-defined]
        self.assertIsInstance(target.acl, MemoryACLStore)

    def test_file_stores_seeded(self) -> None:
        """
        The directory is created (mode 0700); each target gets a file store
        seeded from --config-string and --mask, written at once.
        """
        targets = self.serve("--config-string", "cfg", "--mask", "52:54:00:12:34:56")
        self.assertEqual(self.dir.stat().st_mode & 0o777, 0o700)
        for target in targets:
            self.assertIsInstance(target.acl, FileACLStore)
            self.assertEqual(target.acl.config_string, b"cfg")
            self.assertEqual(target.acl.mask_list, (HOST,))
        self.assertEqual(sorted(os.listdir(self.dir)), ["e0.0.json", "e2.3.json"])
        self.assertEqual(FileACLStore.open(self.dir, 2, 3).mask_list, (HOST,))

    def test_file_wins_over_command_line(self) -> None:
        """Once a target's file exists, --config-string and --mask no longer change it."""
        targets = self.serve("--config-string", "first")
        targets[0].acl.set_config_string(b"set-by-initiator")
        targets[1].acl.set_reserve_list((OTHER,))
        again = self.serve("--config-string", "second", "--mask", "52:54:00:12:34:56")
        self.assertEqual(again[0].acl.config_string, b"set-by-initiator")
        self.assertEqual(again[0].acl.mask_list, ())
        self.assertEqual(again[1].acl.config_string, b"first")
        self.assertEqual(again[1].acl.reserve_list, (OTHER,))

    def test_corrupt_file_exits(self) -> None:
        """A corrupt state file stops makeService with one line naming --state-dir and the file."""
        self.dir.mkdir()
        bad = self.dir / "e2.3.json"
        bad.write_text("{not json")
        with self.assertRaises(SystemExit) as caught:
            self.serve()
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("twistd aoe: e2.3 = "), message)
        self.assertIn(f"state file {bad}", message)
        self.assertEqual(bad.read_text(), "{not json")

    def test_state_dir_is_a_file_exits(self) -> None:
        """A --state-dir that is a file stops makeService with one line saying so."""
        self.dir.write_text("")
        with self.assertRaises(SystemExit) as caught:
            self.serve()
        self.assertEqual(
            str(caught.exception.code),
            f"twistd aoe: --state-dir: {self.dir} is a regular file, not a directory",
        )

    def test_help_mentions_precedence(self) -> None:
        """``--help`` says that the state file wins over --config-string and --mask."""
        help_text = str(Options())
        self.assertIn("--state-dir", help_text)
        self.assertIn("after that the file wins", " ".join(help_text.split()))


def _nobody() -> tuple[int, int]:
    """Return the uid of ``nobody`` and the gid of ``nogroup``; skip unless root and both exist."""
    import grp
    import pwd

    if os.geteuid() != 0:
        raise SkipTest("acting as another user needs root")
    try:
        return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        raise SkipTest("needs the user nobody and the group nogroup") from None


def _traversable(case: SynchronousTestCase) -> Path:
    """Return a fresh directory every user may pass through (trial's mktemp parent is 0700)."""
    work = Path(case.mktemp()).resolve()
    work.mkdir(parents=True)
    work.parent.chmod(0o711)
    work.chmod(0o755)
    return work


class MakeStateDirTests(SynchronousTestCase):
    """``make_state_dir``: a directory, created 0700 if missing, or one line saying what it is."""

    def setUp(self) -> None:
        self.path = Path(self.mktemp())

    def test_created(self) -> None:
        """A missing directory is created, mode 0700 (its parents too), and reported so."""
        path = self.path / "a" / "b"
        self.assertTrue(make_state_dir(path))
        self.assertTrue(path.is_dir())
        self.assertEqual(path.stat().st_mode & 0o777, 0o700)

    def test_existing_left_alone(self) -> None:
        """An existing directory keeps its mode and is reported as not created."""
        self.path.mkdir(mode=0o750)
        self.path.chmod(0o750)
        self.assertFalse(make_state_dir(self.path))
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o750)

    def test_regular_file(self) -> None:
        """A path that is a regular file is refused in one line that says so."""
        self.path.write_text("not a directory")
        with self.assertRaises(StateFileError) as caught:
            make_state_dir(self.path)
        self.assertEqual(str(caught.exception), f"{self.path} is a regular file, not a directory")
        self.assertEqual(self.path.read_text(), "not a directory")

    def test_parent_is_a_file(self) -> None:
        """A parent that is a file is named, rather than a bare "Not a directory"."""
        self.path.write_text("")
        with self.assertRaises(StateFileError) as caught:
            make_state_dir(self.path / "state")
        self.assertEqual(
            str(caught.exception),
            f"cannot create {self.path / 'state'}: {self.path} is a regular file, not a directory",
        )

    def test_other_kind(self) -> None:
        """Another kind of file (a named pipe) is named as what it is."""
        os.mkfifo(self.path)
        with self.assertRaises(StateFileError) as caught:
            make_state_dir(self.path)
        self.assertIn("is a named pipe, not a directory", str(caught.exception))

    def test_created_for_owner(self) -> None:
        """A directory created for the user ``twistd --uid`` will switch to is that user's."""
        uid, gid = _nobody()
        make_state_dir(self.path, (uid, gid))
        st = self.path.stat()
        self.assertEqual((st.st_uid, st.st_gid), (uid, gid))

    def test_existing_not_given_away(self) -> None:
        """An existing directory is never chowned: it is the administrator's."""
        uid, gid = _nobody()
        self.path.mkdir()
        make_state_dir(self.path, (uid, gid))
        self.assertEqual(self.path.stat().st_uid, os.geteuid())


class CheckStateDirTests(SynchronousTestCase):
    """``check_state_dir``: the server's user can keep state files there, or one line why not."""

    def test_writable(self) -> None:
        """A directory this process can write passes, and the probe leaves nothing behind."""
        path = Path(self.mktemp())
        path.mkdir()
        check_state_dir(path)
        self.assertEqual(os.listdir(path), [])

    def test_not_writable_by_service_user(self) -> None:
        """
        A root-owned 0700 directory is refused for nobody, in one line naming
        the directory, the user, the reason and who owns it; nothing is left.
        """
        uid, gid = _nobody()
        path = _traversable(self) / "state"
        path.mkdir(mode=0o700)
        with self.assertRaises(StateFileError) as caught:
            check_state_dir(path, uid, gid)
        self.assertEqual(
            str(caught.exception),
            f"{path}: nobody (uid {uid}) cannot keep state files here: Permission denied "
            "(owned by root:root, mode 0700)",
        )
        self.assertEqual(os.listdir(path), [])

    def test_writable_by_service_user(self) -> None:
        """The same directory owned by nobody passes for nobody."""
        uid, gid = _nobody()
        path = _traversable(self) / "state"
        path.mkdir(mode=0o700)
        os.chown(path, uid, gid)
        check_state_dir(path, uid, gid)
        self.assertEqual(os.listdir(path), [])

    def test_identity_restored(self) -> None:
        """After checking as nobody this process is root again, with its groups."""
        uid, gid = _nobody()
        before = (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups()))
        path = _traversable(self) / "state"
        path.mkdir(mode=0o700)
        with self.assertRaises(StateFileError):
            check_state_dir(path, uid, gid)
        after = (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups()))
        self.assertEqual(after, before)

    def test_unreadable_directory(self) -> None:
        """A directory nobody may write but not open (mode 0300: no fsync of it) is refused."""
        uid, gid = _nobody()
        path = _traversable(self) / "state"
        path.mkdir()
        os.chown(path, uid, gid)
        path.chmod(0o300)
        with self.assertRaises(StateFileError) as caught:
            check_state_dir(path, uid, gid)
        self.assertIn("Permission denied", str(caught.exception))


class TwistdUserStateTests(SynchronousTestCase):
    """
    ``twistd --uid nobody aoe --state-dir``: the directory is checked for nobody at start-up.

    ``makeService`` sees ``twistd``'s own options as its ``Options``'
    ``parent``; these tests parse a real ``twistd`` command line with
    ``twisted.scripts.twistd.ServerOptions``.
    """

    def twistd_options(self, *argv: str) -> Options:
        """Parse ``twistd ARGV`` and return the ``aoe`` plugin's options."""
        from twisted.scripts.twistd import ServerOptions

        config = ServerOptions()
        config.parseOptions(list(argv))
        return config.subOptions  # type: ignore[no-any-return]

    def test_created_for_the_user(self) -> None:
        """
        A state directory ``--state-dir`` creates, and the state files it
        seeds, belong to the user of ``--uid``: it can change them after the drop.
        """
        uid, gid = _nobody()
        state = _traversable(self) / "state"
        options = self.twistd_options(
            "--uid", "nobody", "aoe", "-i", "eth0", "-b", "memory:1M", "--state-dir", str(state)
        )
        makeService(options)
        for path in (state, state / "e0.0.json"):
            st = path.stat()
            self.assertEqual((st.st_uid, st.st_gid), (uid, gid), path)

    def test_not_writable_exits(self) -> None:
        """An existing directory nobody cannot write stops makeService with one line."""
        _nobody()
        state = _traversable(self) / "state"
        state.mkdir(mode=0o700)
        options = self.twistd_options(
            "--uid", "nobody", "aoe", "-i", "eth0", "-b", "memory:1M", "--state-dir", str(state)
        )
        with self.assertRaises(SystemExit) as caught:
            makeService(options)
        message = str(caught.exception.code)
        self.assertTrue(message.startswith(f"twistd aoe: --state-dir: {state}: nobody"), message)
        self.assertNotIn("\n", message)
        self.assertEqual(os.listdir(state), [])

    def test_without_uid_checks_this_process(self) -> None:
        """Without --uid the directory is checked for the user twistd runs as (root here)."""
        state = _traversable(self) / "state"
        state.mkdir(mode=0o700)
        makeService(self.twistd_options("aoe", "-i", "eth0", "-b", "memory:1M",
                                        "--state-dir", str(state)))
        self.assertEqual(os.listdir(state), ["e0.0.json"])


class TwistdStateTests(TestCase):
    """``twistd aoe --state-dir`` as a subprocess."""

    timeout = 90

    def test_corrupt_file_stops_twistd(self) -> None:
        """twistd exits 1 printing one line that names the corrupt file; the file stays."""
        from tests.test_twistd import _twistd

        work = Path(self.mktemp()).resolve()
        state = work / "state"
        state.mkdir(parents=True)
        bad = state / "e0.0.json"
        bad.write_text('{"version": 99}')
        proc = _twistd("aoe", "--iface", "lo", "--backend", "memory:1M",
                       "--state-dir", str(state), cwd=str(work))
        out, _ = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 1, out)
        lines = out.strip().splitlines()
        self.assertEqual(len(lines), 1, out)
        self.assertIn(str(bad), lines[0])
        self.assertIn('"version" must be 1, not 99', lines[0])
        self.assertEqual(bad.read_text(), '{"version": 99}')

    def run_twistd(self, *argv: str) -> tuple[int, list[str], str]:
        """
        Run ``twistd -n ARGV`` to its end; return its status, output lines and output.

        The interface is one that does not exist: these servers must stop
        before they open it, and could not send a frame anywhere if they did not.
        """
        from tests.test_twistd import _twistd

        proc = _twistd(*argv, cwd=str(_traversable(self)))
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out.strip().splitlines(), out

    def test_state_dir_not_writable_by_uid(self) -> None:
        """
        ``twistd --uid nobody`` with a state directory nobody cannot write
        exits 1 at start-up with one line naming it and nobody, no traceback.
        """
        uid, _ = _nobody()
        state = _traversable(self) / "state"
        state.mkdir(mode=0o700)
        code, lines, out = self.run_twistd(
            "--uid", "nobody", "--gid", "nogroup", "aoe", "--iface", "nosuch0",
            "--backend", "memory:1M", "--state-dir", str(state),
        )  # fmt: skip
        self.assertEqual(code, 1, out)
        self.assertEqual(
            lines,
            [
                f"twistd aoe: --state-dir: {state}: nobody (uid {uid}) cannot keep state files "
                "here: Permission denied (owned by root:root, mode 0700)"
            ],
        )
        self.assertEqual(os.listdir(state), [])

    def test_state_dir_is_a_file(self) -> None:
        """A --state-dir that is a regular file: exit 1 and one line that says so."""
        path = _traversable(self) / "state"
        path.write_text("")
        code, lines, out = self.run_twistd(
            "aoe", "--iface", "nosuch0", "--backend", "memory:1M", "--state-dir", str(path)
        )
        self.assertEqual(code, 1, out)
        self.assertEqual(
            lines, [f"twistd aoe: --state-dir: {path} is a regular file, not a directory"]
        )

    @defer.inlineCallbacks
    def test_state_survives_sigkill(self) -> defer.Generator[defer.Deferred[Any], Any, None]:
        """
        Config string, mask list and reserve list set over the wire are what a
        server killed with SIGKILL comes back with, on the wire and in the file.
        """
        from tests.netns import VethPair, require
        from tests.peer import Peer
        from tests.test_twistd import _twistd

        require(self)
        pair = VethPair.create(self)
        work = Path(self.mktemp()).resolve()
        state = work / "state"
        work.mkdir()
        image = work / "disk.img"
        image.write_bytes(bytes(256 * SECTOR_SIZE))
        argv = ("aoe", "--iface", pair.server_if, "--backend", f"file:{image}",
                "--shelf", "5", "--slot", "2", "--state-dir", str(state),
                "--config-string", "seed")

        peer = Peer(pair.client_if, pair.client_ns)
        peer.start()
        self.addCleanup(peer.stop)

        proc = _twistd(*argv, netns=pair.server_ns, cwd=str(work))
        self.addCleanup(_kill, proc)
        server = yield _discover(self, peer, proc, 5, 2)
        self.assertEqual(FileACLStore.open(state, 5, 2).config_string, b"seed")

        # Every change below is acknowledged before the next one is sent.
        replies = yield peer.config(server, 5, 2, ConfigCommand.FORCE_SET, b"persisted \xff")
        self.assertEqual(replies[0].arg.string, b"persisted \xff")
        replies = yield peer.mask(server, 5, 2, MACMaskCommand.EDIT, [
            Directive(DirectiveCommand.ADD, OTHER),
            Directive(DirectiveCommand.ADD, peer.mac),
            Directive(DirectiveCommand.ADD, THIRD),
        ])
        self.assertEqual(len(replies), 1)
        replies = yield peer.mask(
            server, 5, 2, MACMaskCommand.EDIT, [Directive(DirectiveCommand.DELETE, THIRD)]
        )
        self.assertEqual([d.mac for d in replies[0].arg.directives], [OTHER, peer.mac])
        replies = yield peer.reserve(server, 5, 2, ReserveReleaseCommand.SET, [peer.mac, OTHER])
        self.assertEqual(replies[0].arg.macs, (peer.mac, OTHER))
        replies = yield peer.write(server, 5, 2, 7, b"\x42" * SECTOR_SIZE)
        self.assertEqual(replies[0].arg.cmd_status, ATACmdStatus.READY_STATUS)

        proc.send_signal(signal.SIGKILL)
        yield _exited(self, proc)
        self.assertEqual(proc.returncode, -signal.SIGKILL)
        self.assertEqual(sorted(os.listdir(state)), ["e5.2.json"])
        on_disk = FileACLStore.open(state, 5, 2)
        self.assertEqual(
            (on_disk.config_string, on_disk.mask_list, on_disk.reserve_list),
            (b"persisted \xff", (OTHER, peer.mac), (peer.mac, OTHER)),
        )

        # The restart's --config-string "seed" must not win over the file.
        proc = _twistd(*argv, netns=pair.server_ns, cwd=str(work))
        self.addCleanup(_kill, proc)
        server = yield _discover(self, peer, proc, 5, 2)
        replies = yield peer.config(server, 5, 2, ConfigCommand.READ)
        self.assertEqual(replies[0].arg.string, b"persisted \xff")
        replies = yield peer.mask(server, 5, 2, MACMaskCommand.READ)
        self.assertEqual([d.mac for d in replies[0].arg.directives], [OTHER, peer.mac])
        replies = yield peer.reserve(server, 5, 2, ReserveReleaseCommand.READ)
        self.assertEqual(replies[0].arg.macs, (peer.mac, OTHER))
        # The restored lists hold: THIRD is off the mask list and gets nothing.
        replies = yield peer.read(server, 5, 2, 7, src=THIRD, timeout=0.3)
        self.assertEqual(replies, [])
        replies = yield peer.read(server, 5, 2, 7)
        self.assertEqual(replies[0].arg.data[:SECTOR_SIZE], b"\x42" * SECTOR_SIZE)

    @defer.inlineCallbacks
    def test_sigkill_during_changes(self) -> defer.Generator[defer.Deferred[Any], Any, None]:
        """
        SIGKILL lands while config changes stream in, one at a time: after a
        restart the string is the last one acknowledged, or the one in flight.
        """
        from tests.netns import VethPair, require
        from tests.peer import Peer
        from tests.test_twistd import _twistd

        require(self)
        pair = VethPair.create(self)
        work = Path(self.mktemp()).resolve()
        state = work / "state"
        work.mkdir()
        argv = ("aoe", "--iface", pair.server_if, "--backend", "memory:1M",
                "--shelf", "5", "--slot", "3", "--state-dir", str(state))
        peer = Peer(pair.client_if, pair.client_ns)
        peer.start()
        self.addCleanup(peer.stop)
        proc = _twistd(*argv, netns=pair.server_ns, cwd=str(work))
        self.addCleanup(_kill, proc)
        server = yield _discover(self, peer, proc, 5, 3)

        killer = reactor.callLater(1.0, proc.send_signal, signal.SIGKILL)
        self.addCleanup(lambda: killer.active() and killer.cancel())
        acknowledged = 0
        while True:
            attempt = acknowledged + 1
            replies = yield peer.config(
                server, 5, 3, ConfigCommand.FORCE_SET, b"n=%d" % attempt, timeout=0.5
            )
            if not replies:
                break
            self.assertEqual(replies[0].arg.string, b"n=%d" % attempt)
            acknowledged = attempt
        yield _exited(self, proc)
        self.assertEqual(proc.returncode, -signal.SIGKILL)
        self.assertGreater(acknowledged, 10, "too few changes before the kill to mean anything")
        allowed = {b"n=%d" % acknowledged, b"n=%d" % (acknowledged + 1)}
        self.assertIn(FileACLStore.open(state, 5, 3).config_string, allowed)

        proc = _twistd(*argv, netns=pair.server_ns, cwd=str(work))
        self.addCleanup(_kill, proc)
        server = yield _discover(self, peer, proc, 5, 3)
        replies = yield peer.config(server, 5, 3, ConfigCommand.READ)
        self.assertIn(replies[0].arg.string, allowed)
        self.assertEqual(sorted(os.listdir(state)), ["e5.3.json"])


def _kill(proc: Any) -> None:
    """Make sure the server is gone when the test ends."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@defer.inlineCallbacks
def _exited(case: TestCase, proc: Any) -> defer.Generator[defer.Deferred[Any], Any, None]:
    """Wait, without blocking the reactor, until ``proc`` has exited."""
    for _ in range(200):
        if proc.poll() is not None:
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    case.fail("twistd did not exit")


@defer.inlineCallbacks
def _discover(
    case: TestCase, peer: Any, proc: Any, shelf: int, slot: int
) -> defer.Generator[defer.Deferred[Any], Any, bytes]:
    """Return the MAC of the server answering for ``shelf``.``slot``, once it is up."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        replies = yield peer.discover(shelf, slot, timeout=0.5)
        if replies:
            return replies[0].src  # type: ignore[no-any-return]
        if proc.poll() is not None:
            case.fail(f"twistd exited early: {proc.communicate()[0]}")
    case.fail("twistd did not answer within 30 s")
