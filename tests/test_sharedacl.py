"""
Tests for ``aoe_twisted.sharedacl``: target state shared by worker processes.

The cross-process cases run real child processes that map the same
``memfd``, as ``--workers`` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    Error,
    Header,
    ReserveReleaseArg,
    ReserveReleaseCommand,
)
from aoe_twisted.interfaces import ITransactionalACLStore
from aoe_twisted.sharedacl import REGION_SIZE, SharedState, _decode, _encode
from aoe_twisted.statefile import FileACLStore

HOST = bytes.fromhex("020000000001")
OTHER = bytes.fromhex("020000000002")
_MAC = st.binary(min_size=6, max_size=6)


def _state(testcase: SynchronousTestCase, targets: int = 2) -> SharedState:
    state = SharedState.create(targets)
    testcase.addCleanup(state.close)
    return state


def _in_child(state: SharedState, script: str) -> str:
    """Run ``script`` in a new Python process, ``store`` being target 0's; return its output."""
    fd = state.fileno()
    prelude = (
        "from aoe_twisted.sharedacl import SharedState\n"
        f"state = SharedState.adopt({fd}, {state.targets})\n"
        "store = state.store(0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        pass_fds=[fd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"child failed: {result.stderr}")
    return result.stdout


class EncodingTests(SynchronousTestCase):
    """The region's state encoding."""

    @given(st.binary(max_size=1024), st.lists(_MAC, max_size=185), st.lists(_MAC, max_size=255))
    def test_round_trip(self, config: bytes, masks: list[bytes], reserves: list[bytes]) -> None:
        """Every state decodes to itself, and the largest fits in a region."""
        data = _encode(config, tuple(masks), tuple(reserves))
        self.assertLessEqual(len(data) + 16, REGION_SIZE)
        self.assertEqual(_decode(data), (config, tuple(masks), tuple(reserves)))


class StoreTests(SynchronousTestCase):
    """One process, several stores on one shared state."""

    def test_interface(self) -> None:
        """A shared store is an ``ITransactionalACLStore``, empty at first."""
        store = _state(self).store(0)
        self.assertTrue(verifyObject(ITransactionalACLStore, store))
        self.assertEqual((store.config_string, store.mask_list, store.reserve_list), (b"", (), ()))

    def test_seen_by_other_store(self) -> None:
        """A change through one store is what another store of the same target reads next."""
        state = _state(self)
        one, two = state.store(1), state.store(1)
        self.assertEqual(two.reserve_list, ())
        one.set_reserve_list((HOST,))
        one.set_config_string(b"hello")
        one.set_mask_list((HOST, OTHER))
        self.assertEqual(two.reserve_list, (HOST,))
        self.assertEqual(two.config_string, b"hello")
        self.assertEqual(two.mask_list, (HOST, OTHER))

    def test_targets_separate(self) -> None:
        """Each target has its own region."""
        state = _state(self)
        state.store(0).set_config_string(b"zero")
        self.assertEqual(state.store(1).config_string, b"")

    def test_no_such_target(self) -> None:
        """A store beyond the state's targets is refused."""
        self.assertRaises(IndexError, _state(self, 2).store, 2)

    def test_limits(self) -> None:
        """Values that could not come from the wire are refused, and nothing changes."""
        store = _state(self).store(0)
        self.assertRaises(ValueError, store.set_config_string, b"x" * 1025)
        self.assertRaises(ValueError, store.set_reserve_list, (HOST,) * 256)
        self.assertRaises(ValueError, store.set_mask_list, (HOST,) * 186)
        self.assertEqual((store.config_string, store.mask_list, store.reserve_list), (b"", (), ()))

    def test_persist_first(self) -> None:
        """Every change is persisted whole before it is published."""
        persisted: list[tuple[bytes, tuple[bytes, ...], tuple[bytes, ...]]] = []
        state = _state(self)
        store = state.store(0, lambda c, m, r: persisted.append((c, m, r)))
        store.set_mask_list((HOST,))
        store.set_config_string(b"c")
        self.assertEqual(persisted, [(b"", (HOST,), ()), (b"c", (HOST,), ())])

    def test_persist_failure_publishes_nothing(self) -> None:
        """If persisting fails, the error propagates and no store sees the change."""

        def fail(*state: object) -> None:
            raise OSError(28, "No space left on device")

        state = _state(self)
        self.assertRaises(OSError, state.store(0, fail).set_reserve_list, (HOST,))
        self.assertEqual(state.store(0).reserve_list, ())

    def test_publish_does_not_persist(self) -> None:
        """``publish`` sets a state already stored without writing it again."""
        persisted: list[object] = []
        state = _state(self)
        state.store(0, lambda *s: persisted.append(s)).publish(b"c", (HOST,), (OTHER,))
        self.assertEqual(persisted, [])
        self.assertEqual(state.store(0).reserve_list, (OTHER,))

    def test_file_store_persists(self) -> None:
        """With a ``FileACLStore``'s ``replace_state`` the file holds every change."""
        directory = self.mktemp()
        os.mkdir(directory)
        file_store = FileACLStore.open(directory, 1, 2)
        store = _state(self).store(0, file_store.replace_state)
        store.set_reserve_list((HOST,))
        store.set_config_string(b"kept")
        reopened = FileACLStore.open(directory, 1, 2)
        self.assertEqual(
            (reopened.config_string, reopened.reserve_list), (b"kept", (HOST,))
        )


class ProcessTests(SynchronousTestCase):
    """Stores in different processes on one ``memfd``."""

    def test_child_sees_parent(self) -> None:
        """A worker started after a change reads it."""
        state = _state(self)
        state.store(0).set_mask_list((HOST,))
        self.assertEqual(_in_child(state, "print(store.mask_list[0].hex())").strip(), HOST.hex())

    def test_parent_sees_child(self) -> None:
        """A change a worker makes is what the parent's store reads next."""
        state = _state(self)
        store = state.store(0)
        self.assertEqual(store.reserve_list, ())
        _in_child(state, f"store.set_reserve_list((bytes.fromhex({OTHER.hex()!r}),))")
        self.assertEqual(store.reserve_list, (OTHER,))

    def test_no_lost_edits(self) -> None:
        """Two processes adding 120 MACs each, read-modify-write in transactions, lose none."""
        state = _state(self)
        script = """
            import sys
            first = int(sys.argv[1])
            sys.stdin.read(1)  # start together
            for n in range(first, first + 120):
                with store.transaction():
                    store.set_reserve_list(store.reserve_list + (n.to_bytes(6, "big"),))
        """
        fd = state.fileno()
        prelude = (
            "from aoe_twisted.sharedacl import SharedState\n"
            f"state = SharedState.adopt({fd}, {state.targets})\n"
            "store = state.store(0)\n"
        )
        children = [
            subprocess.Popen(
                [sys.executable, "-c", prelude + textwrap.dedent(script), str(first)],
                pass_fds=[fd],
                stdin=subprocess.PIPE,
            )
            for first in (1000, 2000)
        ]
        time.sleep(1.0)
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"x")
            child.stdin.close()
        for child in children:
            self.assertEqual(child.wait(timeout=60), 0)
        macs = state.store(0).reserve_list
        self.assertEqual(
            sorted(int.from_bytes(m, "big") for m in macs),
            list(range(1000, 1120)) + list(range(2000, 2120)),
        )


class TargetTests(SynchronousTestCase):
    """Targets in different workers, each with its own store of one shared state."""

    def _targets(self) -> tuple[Target, Target]:
        state = _state(self, 1)
        backend = MemoryBackend(64 * SECTOR_SIZE)
        return (
            Target(1, 1, backend, acl=state.store(0)),
            Target(1, 1, backend, acl=state.store(0)),
        )

    def test_reservation_binds_other_worker(self) -> None:
        """A reservation made through one worker refuses another host's write in the other."""
        one, two = self._targets()
        reserve = Header(
            1, False, False, 0, 1, 1, Command.RESERVE_RELEASE, b"tag1",
            ReserveReleaseArg(ReserveReleaseCommand.SET, 1, (HOST,)),
        )
        [reply] = one.handle(HOST, reserve)
        self.assertFalse(reply.flag_error)
        write = Header(
            1, False, False, 0, 1, 1, Command.ISSUE_ATA_COMMAND, b"tag2",
            ATAArg(
                flag_write=True, sector_count=1, cmd_status=ATACmdStatus.WRITE_28BIT,
                lba=0, data=bytes(SECTOR_SIZE),
            ),
        )
        [refused] = two.handle(OTHER, write)
        self.assertTrue(refused.flag_error)
        self.assertEqual(refused.error, Error.TARGET_IS_RESERVED)

    def test_control_in_transaction(self) -> None:
        """A reserve request is decided inside the store's transaction."""
        one, _ = self._targets()
        entered: list[bool] = []
        original = one.acl.transaction  # type: ignore[attr-defined]

        def spy() -> object:
            entered.append(True)
            return original()

        one.acl.transaction = spy  # type: ignore[attr-defined]
        read = Header(
            1, False, False, 0, 1, 1, Command.RESERVE_RELEASE, b"tag1",
            ReserveReleaseArg(ReserveReleaseCommand.READ, 0, ()),
        )
        one.handle(HOST, read)
        self.assertEqual(entered, [True])
