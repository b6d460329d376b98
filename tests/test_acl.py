"""Tests for the MAC mask list and reserve list rules and ``MemoryACLStore``."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aoe_twisted.core.acl import (
    MASK_LIST_CEILING,
    MASK_LIST_LIMIT,
    RESERVE_LIST_LIMIT,
    MaskEditResult,
    MemoryACLStore,
    edit_mask_list,
    mask_allows,
    reserve_allows,
)
from aoe_twisted.core.wire import (
    DIRECTIVE_SIZE,
    ETHERNET_HEADER_SIZE,
    HEADER_SIZE,
    MACMASK_ARG_SIZE,
    Directive,
    DirectiveCommand,
    MACMaskError,
)
from aoe_twisted.interfaces import IACLStore

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
C = bytes.fromhex("020000000003")

NONE = DirectiveCommand.NONE
ADD = DirectiveCommand.ADD
DELETE = DirectiveCommand.DELETE


def _d(command: int, mac: bytes) -> Directive:
    """Return one directive."""
    return Directive(command, mac)


class MemoryACLStoreTests(SynchronousTestCase):
    """``MemoryACLStore`` keeps the three values an initiator can change."""

    def test_provides_interface(self) -> None:
        """It provides ``IACLStore`` fully."""
        self.assertTrue(verifyObject(IACLStore, MemoryACLStore()))

    def test_defaults_empty(self) -> None:
        """A new store has no config string, an empty mask list and no reservation."""
        store = MemoryACLStore()
        self.assertEqual((store.config_string, store.mask_list, store.reserve_list), (b"", (), ()))

    def test_initial_lists_are_tuples(self) -> None:
        """Lists given at construction are kept as tuples of bytes."""
        store = MemoryACLStore(mask_list=[bytearray(A)], reserve_list=[B])
        self.assertEqual((store.mask_list, store.reserve_list), ((A,), (B,)))

    def test_set_config_string(self) -> None:
        """``set_config_string`` replaces the config string."""
        store = MemoryACLStore(config_string=b"old")
        store.set_config_string(b"new")
        self.assertEqual(store.config_string, b"new")

    def test_set_mask_list(self) -> None:
        """``set_mask_list`` replaces the mask list."""
        store = MemoryACLStore(mask_list=(A,))
        store.set_mask_list((B, C))
        self.assertEqual(store.mask_list, (B, C))

    def test_set_reserve_list(self) -> None:
        """``set_reserve_list`` replaces the reserve list."""
        store = MemoryACLStore(reserve_list=(A,))
        store.set_reserve_list(())
        self.assertEqual(store.reserve_list, ())


class EditMaskListTests(SynchronousTestCase):
    """``edit_mask_list`` applies directives in order as vblade's ``aoemask`` does."""

    def check(
        self,
        current: tuple[bytes, ...],
        directives: list[Directive],
        expected: MaskEditResult,
        limit: int = 4,
    ) -> None:
        """Assert that editing ``current`` with ``directives`` gives ``expected``."""
        self.assertEqual(edit_mask_list(current, directives, limit), expected)

    def test_none_skipped(self) -> None:
        """A NONE directive changes nothing, whatever its MAC."""
        self.check((A,), [_d(NONE, B)], MaskEditResult((A,)))

    def test_add_appends(self) -> None:
        """ADD appends a MAC not yet on the list, after the ones there."""
        self.check((A,), [_d(ADD, B)], MaskEditResult((A, B)))

    def test_add_duplicate(self) -> None:
        """ADD of a MAC already listed is fine and does not list it twice."""
        self.check((A, B), [_d(ADD, A)], MaskEditResult((A, B)))

    def test_delete_present(self) -> None:
        """DELETE removes a listed MAC and keeps the others in order."""
        self.check((A, B, C), [_d(DELETE, B)], MaskEditResult((A, C)))

    def test_delete_absent(self) -> None:
        """DELETE of a MAC not on the list is fine."""
        self.check((A,), [_d(DELETE, B)], MaskEditResult((A,)))

    def test_in_order(self) -> None:
        """Directives apply one after the other: add then delete leaves nothing."""
        self.check((), [_d(ADD, A), _d(DELETE, A), _d(ADD, B)], MaskEditResult((B,)))

    def test_bad_command(self) -> None:
        """An unknown DCmd stops the edit with BAD_COMMAND at its index."""
        self.check(
            (),
            [_d(ADD, A), _d(3, B), _d(ADD, C)],
            MaskEditResult((A,), MACMaskError.BAD_COMMAND, 1),
        )

    def test_list_full(self) -> None:
        """ADD to a list already at the limit stops with LIST_FULL at its index."""
        self.check(
            (A,),
            [_d(NONE, C), _d(ADD, B), _d(ADD, C)],
            MaskEditResult((A, B), MACMaskError.LIST_FULL, 2),
            limit=2,
        )

    def test_duplicate_on_full_list(self) -> None:
        """ADD of a listed MAC succeeds even when the list is full."""
        self.check((A, B), [_d(ADD, B)], MaskEditResult((A, B)), limit=2)

    def test_delete_makes_room(self) -> None:
        """A DELETE before an ADD frees the slot the ADD needs."""
        self.check((A, B), [_d(DELETE, A), _d(ADD, C)], MaskEditResult((B, C)), limit=2)

    def test_partial_application(self) -> None:
        """Directives before the failing one stay applied; those after it are not."""
        self.check(
            (A,),
            [_d(DELETE, A), _d(ADD, B), _d(0xFF, C), _d(ADD, C)],
            MaskEditResult((B,), MACMaskError.BAD_COMMAND, 2),
        )

    def test_no_directives(self) -> None:
        """No directives leave the list as it is."""
        self.check((A, B), [], MaskEditResult((A, B)))

    @given(
        st.lists(st.sampled_from([A, B, C]), unique=True).map(tuple),
        st.lists(st.builds(Directive, st.integers(0, 3), st.sampled_from([A, B, C]))),
        st.integers(0, 3),
    )
    def test_properties(
        self, current: tuple[bytes, ...], directives: list[Directive], limit: int
    ) -> None:
        """The result never lists a MAC twice nor grows past the limit (or the list's size)."""
        result = edit_mask_list(current, directives, limit)
        self.assertEqual(len(set(result.macs)), len(result.macs))
        self.assertLessEqual(len(result.macs), max(limit, len(current)))
        self.assertEqual(result.error == 0, result.failed_index is None)


class AllowsTests(SynchronousTestCase):
    """``mask_allows`` and ``reserve_allows``: an empty list lets everyone in."""

    def test_mask_empty(self) -> None:
        """An empty mask list allows every host."""
        self.assertTrue(mask_allows((), A))

    def test_mask_member(self) -> None:
        """A host on the mask list is allowed."""
        self.assertTrue(mask_allows((B, A), A))

    def test_mask_other(self) -> None:
        """A host not on a non-empty mask list is not."""
        self.assertFalse(mask_allows((B,), A))

    def test_reserve_empty(self) -> None:
        """An empty reserve list means the target is free for everyone."""
        self.assertTrue(reserve_allows((), A))

    def test_reserve_member(self) -> None:
        """A host on the reserve list may use the target."""
        self.assertTrue(reserve_allows((A,), A))

    def test_reserve_other(self) -> None:
        """A host not on a non-empty reserve list may not."""
        self.assertFalse(reserve_allows((B,), A))


class LimitTests(SynchronousTestCase):
    """The list limits fit the wire."""

    def test_mask_limit_fits_frame(self) -> None:
        """A reply listing ``MASK_LIST_LIMIT`` MACs fits a 1500-byte frame, Ethernet header too."""
        size = ETHERNET_HEADER_SIZE + HEADER_SIZE + MACMASK_ARG_SIZE
        self.assertLessEqual(size + DIRECTIVE_SIZE * MASK_LIST_LIMIT, 1500)

    def test_mask_ceiling_fits_payload(self) -> None:
        """``MASK_LIST_CEILING`` is the most a 1500-byte Ethernet payload holds."""
        reply = HEADER_SIZE + MACMASK_ARG_SIZE
        self.assertLessEqual(reply + DIRECTIVE_SIZE * MASK_LIST_CEILING, 1500)
        self.assertGreater(reply + DIRECTIVE_SIZE * (MASK_LIST_CEILING + 1), 1500)

    def test_reserve_limit_is_a_byte(self) -> None:
        """The reserve list holds as many MACs as its one-byte count can say."""
        self.assertEqual(RESERVE_LIST_LIMIT, 0xFF)
