"""
Tests for ``aoe_twisted.manager``: targets opened from their configuration, changed while serving.

A ``TargetManager`` drives a started ``AoEService`` on ``MemoryPacketSystem``
(a ``MemoryReactorClock`` as its reactor), as ``tap.makeService`` builds
them, from a config file written to a temporary directory and read with
``aoe_twisted.config``, so that ``reload`` reads it again.  Disks are
``file:`` images in the same directory (each sector filled with its own
byte, so a slice's data can be told apart) and ``memory:`` disks; what the
initiators see is checked with frames on the fake interface.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.config import TargetConfig, parse_config
from aoe_twisted.control.server import ControlError
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    ATAError,
    ConfigArg,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    EthernetFrame,
    Header,
    MACMaskCommand,
    format_mac,
)
from aoe_twisted.manager import TargetError, TargetManager, open_target
from aoe_twisted.server import AoEService
from aoe_twisted.testing import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    MemoryPacketSystem,
    ata_request,
    config_request,
    ethernet_frame,
    mask_request,
)

#: The size of each disk image: 128 sectors, sector ``i`` filled with byte ``i + 1`` (a.img).
IMAGE_SIZE = 64 * 1024
SECOND_MAC = bytes.fromhex("02bb00000001")

#: Every key of a target's listing (the contract with ``ctl list``).
LISTING_KEYS = {
    "target", "backend", "size", "read_only", "sync", "direct", "offset", "length",
    "interfaces", "mask", "config_string", "buffer_count", "max_sectors", "state",
    "duplicate_of", "paths",
}  # fmt: skip

BASE = """\
[server]
interfaces = ["eth0"]
removed_grace = 0
duplicate_wait = 0
{server}

[[target]]
address = "1.0"
backend = "file:{a}"
{first}

[[target]]
address = "1.1"
backend = "memory:64K"

[[target]]
address = "1.2"
backend = "file:{b}"
offset = "8K"
length = "16K"
{third}
"""


#: One more target, to append to the base config.
MEMORY_1_4 = '\n[[target]]\naddress = "1.4"\nbackend = "memory:64K"\n'


def sector_image(base: int) -> bytes:
    """An image whose sector ``i`` is filled with byte ``(base + i) % 256``."""
    return b"".join(
        bytes([(base + i) % 256]) * SECTOR_SIZE for i in range(IMAGE_SIZE // SECTOR_SIZE)
    )


def decode(frame: bytes) -> Header:
    """The AoE message of a frame the server sent."""
    return Header.from_bytes(EthernetFrame.from_bytes(frame).payload)


def ata_of(frame: bytes) -> ATAArg:
    """The ATA argument of a reply frame."""
    arg = decode(frame).arg
    assert isinstance(arg, ATAArg), arg
    return arg


def read(shelf: int, slot: int, lba: int = 0, tag: int = 0x100) -> bytes:
    """A READ SECTORS EXT of one sector, from the initiator."""
    return ethernet_frame(ata_request(lba=lba, shelf=shelf, slot=slot, tag=tag))


def write(shelf: int, slot: int, lba: int = 0, fill: int = 0xEE, tag: int = 0x200) -> bytes:
    """A WRITE SECTORS EXT of one sector of ``fill``, from the initiator."""
    data = bytes([fill]) * SECTOR_SIZE
    return ethernet_frame(
        ata_request(ATACmdStatus.WRITE_48BIT, lba=lba, data=data, shelf=shelf, slot=slot, tag=tag)
    )


def identify(shelf: int, slot: int, tag: int = 0x300) -> bytes:
    """An IDENTIFY DEVICE, from the initiator."""
    return ethernet_frame(ata_request(ATACmdStatus.IDENTIFY, shelf=shelf, slot=slot, tag=tag))


def announced(frames: list[bytes]) -> list[tuple[bytes, int, int]]:
    """The announcements among ``frames`` (tag-0 config replies): destination and address."""
    found = []
    for frame in frames:
        header = decode(frame)
        if header.flag_response and header.tag == bytes(4) and isinstance(header.arg, ConfigArg):
            found.append((EthernetFrame.from_bytes(frame).dst, header.major, header.minor))
    return found


def open_descriptors() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


class ManagerHarness:
    """A manager and a started service on ``eth0`` (and ``eth1``) of a fake packet system."""

    def setUp(self) -> None:
        self.dir = Path(os.path.abspath(self.mktemp()))  # type: ignore[attr-defined]
        self.dir.mkdir(parents=True)
        self.a = self.dir / "a.img"
        self.a.write_bytes(sector_image(1))
        self.b = self.dir / "b.img"
        self.b.write_bytes(sector_image(0x81))
        self.path = self.dir / "aoe.toml"
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem()
        self.nic = self.system.add_interface("eth0", mac=TARGET_MAC)
        self.system.add_interface("eth1", mac=SECOND_MAC)

    def config_text(
        self, server: str = "", first: str = "", third: str = "", more: str = ""
    ) -> str:
        """The base config (e1.0 = a.img, e1.1 = memory, e1.2 = a slice of b.img), amended."""
        text = BASE.format(a=self.a, b=self.b, server=server, first=first, third=third)
        return text + more

    def write_config(self, text: str) -> None:
        """Write ``text`` as the config file."""
        self.path.write_text(text)

    def start(self, text: str | None = None) -> TargetManager:
        """Write the config, open its targets and serve them as ``twistd aoe --config`` does."""
        self.write_config(self.config_text() if text is None else text)
        config = parse_config(self.path.read_text(), str(self.path))
        manager = TargetManager(config)
        targets = manager.open_all()
        interfaces = list(config.interfaces)
        for target in config.targets:
            interfaces += [name for name in target.interfaces if name not in interfaces]
        service = AoEService(
            interfaces,
            targets,
            reactor=self.reactor,
            system=self.system,
            placement={t.key: t.interfaces for t in config.targets},
            removed_grace=config.removed_grace,
            duplicate_wait=config.duplicate_wait,
        )
        manager.service = service
        service.privilegedStartService()
        service.startService()
        self.service = service
        self.manager = manager
        self.addCleanup(self._stop)  # type: ignore[attr-defined]
        return manager

    def _stop(self) -> None:
        if self.service.running:
            self.service.stopService()
            self.reactor.advance(0)

    def sent(self, interface: str = "eth0") -> list[bytes]:
        """Every frame sent on ``interface``."""
        return self.system.socket_for(self.service.ports[interface]).sent

    def answer(self, *frames: bytes) -> list[bytes]:
        """Deliver ``frames`` to ``eth0`` in one drain; return what was sent back."""
        before = len(self.sent())
        for frame in frames:
            self.nic.receive(frame)
        self.service.ports["eth0"].doRead()
        return list(self.sent()[before:])

    def listing(self, address: str) -> dict[str, Any]:
        """The listing of the target at ``address`` (``e1.0``)."""
        (found,) = [t for t in self.manager.targets() if t["target"] == address]
        return found

    def served(self) -> dict[str, Any]:
        """The targets served, by address: ``{"e1.0": Target, ...}``."""
        return {t.address: t for t in self.service.targets}

    def assert_one_line(self, error: Exception, *words: str) -> None:
        """Check ``error``'s message is one line holding every one of ``words``."""
        message = str(error)
        case: Any = self
        case.assertNotIn("\n", message)
        for word in words:
            case.assertIn(word, message)


class ListingTests(ManagerHarness, SynchronousTestCase):
    """``targets()``/``listing``: what ``ctl list`` shows."""

    def test_format(self) -> None:
        """Every target's listing has exactly the keys of the format, with its values."""
        manager = self.start()
        listings = manager.targets()
        self.assertEqual([t["target"] for t in listings], ["e1.0", "e1.1", "e1.2"])
        for listing in listings:
            self.assertEqual(set(listing), LISTING_KEYS)
        self.assertEqual(
            listings[0],
            {"target": "e1.0", "backend": f"file:{self.a}", "size": IMAGE_SIZE,
             "read_only": False, "sync": False, "direct": False, "offset": 0, "length": 0,
             "interfaces": ["eth0"], "mask": [], "config_string": "", "buffer_count": 64,
             "max_sectors": 255, "state": "serving", "duplicate_of": None, "paths": []},
        )  # fmt: skip

    def test_slice(self) -> None:
        """
        A slice of a file reports the slice's size (listing and IDENTIFY) and
        serves the slice's bytes; a sector past the slice is refused.
        """
        self.start()
        listing = self.listing("e1.2")
        self.assertEqual(
            (listing["size"], listing["offset"], listing["length"]), (16384, 8192, 16384)
        )
        image = self.b.read_bytes()
        (reply,) = self.answer(read(1, 2, lba=0))
        self.assertEqual(ata_of(reply).data, image[8192 : 8192 + SECTOR_SIZE])
        (reply,) = self.answer(read(1, 2, lba=31))
        self.assertEqual(ata_of(reply).data, image[8192 + 31 * SECTOR_SIZE : 8192 + 16384])
        (reply,) = self.answer(identify(1, 2))
        page = ata_of(reply).data
        self.assertEqual(int.from_bytes(page[200:208], "little"), 32)
        (reply,) = self.answer(read(1, 2, lba=32))
        self.assertEqual(ata_of(reply).cmd_status & ATACmdStatus.ERR_STATUS, 1)

    def test_slice_past_end(self) -> None:
        """A slice past the end of its file is a one-line ``TargetError``; no descriptor leaks."""
        before = open_descriptors()
        config = TargetConfig(1, 7, f"file:{self.a}", offset=48 * 1024, length=32 * 1024)
        error = self.assertRaises(TargetError, open_target, config)
        self.assert_one_line(error, "e1.7", "past the end", str(IMAGE_SIZE))
        self.assertEqual(open_descriptors(), before)


class AddRemoveTests(ManagerHarness, SynchronousTestCase):
    """``add`` and ``remove``."""

    def test_add(self) -> None:
        """
        ``add`` serves a new target (announced, answering) and returns its
        listing, with the settings given and the ``[server]`` defaults.
        """
        manager = self.start()
        before = len(self.sent())
        mask = f"mask={format_mac(INITIATOR_MAC)}"
        listing = manager.add("1.5=memory:1M", ["buffer_count=8", mask])
        self.assertEqual(set(listing), LISTING_KEYS)
        self.assertEqual(
            {k: listing[k] for k in ("target", "backend", "size", "interfaces", "mask",
                                     "buffer_count", "state")},
            {"target": "e1.5", "backend": "memory:1M", "size": 1 << 20, "interfaces": ["eth0"],
             "mask": [format_mac(INITIATOR_MAC)], "buffer_count": 8, "state": "serving"},
        )  # fmt: skip
        self.assertEqual(announced(self.sent()[before:]), [(INITIATOR_MAC, 1, 5)])
        self.assertEqual(len(self.answer(read(1, 5))), 1)
        self.assertEqual(self.listing("e1.5"), listing)

    def test_add_taken_address(self) -> None:
        """Adding at an address served is a one-line ``ControlError``; nothing changes."""
        manager = self.start()
        before = self.served()
        error = self.assertRaises(ControlError, manager.add, "1.0=memory:1M", [])
        self.assertEqual(str(error), "add: e1.0 is already served")
        self.assertEqual(self.served(), before)

    def test_add_missing_file(self) -> None:
        """A backend that cannot be opened is a one-line ``ControlError`` naming the target."""
        manager = self.start()
        missing = self.dir / "missing.img"
        error = self.assertRaises(ControlError, manager.add, f"1.5=file:{missing}", [])
        self.assert_one_line(error, "e1.5", str(missing), "No such file or directory")
        self.assertNotIn("e1.5", self.served())

    def test_add_slice_past_end(self) -> None:
        """A slice past the end is refused in one line, and the opened file is closed again."""
        manager = self.start()
        before = open_descriptors()
        error = self.assertRaises(
            ControlError, manager.add, f"1.5=file:{self.a}", ["offset=60K", "length=8K"]
        )
        self.assert_one_line(error, "e1.5", "past the end")
        self.assertEqual(open_descriptors(), before)
        self.assertNotIn("e1.5", self.served())

    def test_add_on_new_interface(self) -> None:
        """``iface=`` serves the new target on that interface alone, opening it."""
        manager = self.start()
        listing = manager.add("1.5=memory:1M", ["iface=eth1"])
        self.assertEqual(listing["interfaces"], ["eth1"])
        self.assertIn("eth1", self.service.ports)
        self.assertEqual(self.answer(read(1, 5)), [])

    def test_add_on_missing_interface(self) -> None:
        """An interface that cannot be opened: one line naming it; the disk is closed again."""
        manager = self.start()
        before = open_descriptors()
        error = self.assertRaises(ControlError, manager.add, f"1.5=file:{self.a}", ["iface=eth9"])
        self.assert_one_line(error, "e1.5", "eth9")
        self.assertEqual(open_descriptors(), before)
        self.assertIsNone(self.service.target(1, 5))

    def test_remove(self) -> None:
        """``remove`` stops the target (silent here: no grace), closes its file, lists it."""
        manager = self.start()
        before = open_descriptors()
        listing = manager.remove("e1.0")
        self.assertEqual((listing["target"], listing["state"]), ("e1.0", "removed"))
        self.assertEqual(set(listing), LISTING_KEYS)
        self.assertNotIn("e1.0", self.served())
        self.assertEqual(self.answer(read(1, 0)), [])
        self.assertEqual(open_descriptors(), before - 1)
        self.assertEqual([t["target"] for t in manager.targets()], ["e1.1", "e1.2"])

    def test_remove_unknown(self) -> None:
        """Removing an address not served, or not an address: one-line ``ControlError``."""
        manager = self.start()
        error = self.assertRaises(ControlError, manager.remove, "1.9")
        self.assertEqual(str(error), "remove: no target is served at e1.9")
        error = self.assertRaises(ControlError, manager.remove, "x.y")
        self.assert_one_line(error, "remove:")


class SetTests(ManagerHarness, SynchronousTestCase):
    """``set``: a served target's options changed."""

    def initiator_sets_state(self) -> None:
        """An initiator sets e1.0's config string and puts itself on its mask list, on the wire."""
        replies = self.answer(
            ethernet_frame(config_request(ConfigCommand.FORCE_SET, b"hello", shelf=1, slot=0)),
            ethernet_frame(
                mask_request(
                    MACMaskCommand.EDIT,
                    [Directive(DirectiveCommand.ADD, INITIATOR_MAC)],
                    shelf=1,
                    slot=0,
                )
            ),
        )
        self.assertEqual(len(replies), 2)
        listing = self.listing("e1.0")
        self.assertEqual(listing["config_string"], "hello")
        self.assertEqual(listing["mask"], [format_mac(INITIATOR_MAC)])

    def test_read_only_reopens_keeping_state(self) -> None:
        """
        ``read_only=on`` opens the disk again read-only: writes are refused and
        the file is unchanged; the config string and mask list an initiator
        set survive; the old file is closed (no descriptor more).
        """
        manager = self.start()
        self.initiator_sets_state()
        old = self.service.target(1, 0)
        before = open_descriptors()
        listing = manager.set("e1.0", ["read_only=on"])
        self.assertTrue(listing["read_only"])
        self.assertEqual(listing["config_string"], "hello")
        self.assertEqual(listing["mask"], [format_mac(INITIATOR_MAC)])
        new = self.service.target(1, 0)
        self.assertIsNot(new.backend, old.backend)
        self.assertIs(new.acl, old.acl)
        self.assertEqual(open_descriptors(), before)
        (reply,) = self.answer(write(1, 0, lba=0))
        arg = ata_of(reply)
        self.assertEqual(arg.cmd_status & ATACmdStatus.ERR_STATUS, 1)
        self.assertEqual(arg.err_feature, ATAError.ABRT)
        self.assertEqual(self.a.read_bytes(), sector_image(1))
        (reply,) = self.answer(read(1, 0, lba=2))
        self.assertEqual(ata_of(reply).data, b"\x03" * SECTOR_SIZE)

    def test_buffer_count_keeps_backend(self) -> None:
        """``buffer_count`` keeps the same disk object; config replies carry the new count."""
        manager = self.start()
        old = self.service.target(1, 0)
        listing = manager.set("1.0", ["buffer_count=9"])
        self.assertEqual(listing["buffer_count"], 9)
        new = self.service.target(1, 0)
        self.assertIsNot(new, old)
        self.assertIs(new.backend, old.backend)
        self.assertIs(new.stats, old.stats)
        (reply,) = self.answer(ethernet_frame(config_request(shelf=1, slot=0)))
        arg = decode(reply).arg
        assert isinstance(arg, ConfigArg)
        self.assertEqual(arg.buffer_count, 9)
        (reply,) = self.answer(read(1, 0, lba=1))
        self.assertEqual(ata_of(reply).data, b"\x02" * SECTOR_SIZE)

    def test_mask_set_replaces_live_list(self) -> None:
        """
        ``set mask=`` sets the live mask list, whatever the configuration said:
        an initiator's mask list is cleared by ``mask=`` alone (the file had
        none) and other hosts are answered again.
        """
        manager = self.start()
        self.initiator_sets_state()
        other = ethernet_frame(
            ata_request(ATACmdStatus.IDENTIFY, shelf=1, slot=0), src=OTHER_MAC
        )
        self.assertEqual(self.answer(other), [])
        listing = manager.set("1.0", ["mask="])
        self.assertEqual(listing["mask"], [])
        self.assertEqual(len(self.answer(other)), 1)

    def test_config_string_set_replaces_live_string(self) -> None:
        """``set config_string=`` sets the live string, even to what the file said."""
        manager = self.start()
        self.initiator_sets_state()
        listing = manager.set("1.0", ["config_string="])
        self.assertEqual(listing["config_string"], "")

    def test_missing_interface(self) -> None:
        """An interface that cannot be opened: a one-line ``ControlError``; the target unchanged."""
        manager = self.start()
        old = self.service.target(1, 0)
        error = self.assertRaises(ControlError, manager.set, "1.0", ["iface=eth9"])
        self.assert_one_line(error, "eth9")
        self.assertIs(self.service.target(1, 0), old)
        self.assertEqual(self.listing("e1.0")["interfaces"], ["eth0"])

    def test_bad_settings(self) -> None:
        """Bad settings, none, or the address: one-line ``ControlError``s; nothing changes."""
        manager = self.start()
        old = self.service.target(1, 0)
        for settings, words in (
            (["buffer_count=many"], ("e1.0", "buffer_count", "not a number")),
            ([], ("nothing to set",)),
            (["address=2.0"], ("address",)),
            (["colour=red"], ("colour", "unknown key")),
        ):
            error = self.assertRaises(ControlError, manager.set, "1.0", settings)
            self.assert_one_line(error, *words)
        self.assertIs(self.service.target(1, 0), old)


class ReloadTests(ManagerHarness, SynchronousTestCase):
    """``reload`` and ``hangup``: the config file read again, its difference applied."""

    def test_applies_difference(self) -> None:
        """
        Added targets are served and announced, removed ones stop, a changed
        one changes, and the unchanged one is the very same ``Target`` (its
        disk not opened again); the result says which is which.
        """
        manager = self.start()
        unchanged = self.service.target(1, 0)
        old_slice = self.service.target(1, 2)
        text = self.config_text(third="read_only = true").replace(
            '[[target]]\naddress = "1.1"\nbackend = "memory:64K"\n',
            '[[target]]\naddress = "1.3"\nbackend = "memory:128K"\n',
        )
        self.write_config(text)
        before = len(self.sent())
        result = manager.reload()
        self.assertEqual(
            {k: result[k] for k in ("added", "removed", "changed", "unchanged", "restart")},
            {"added": ["e1.3"], "removed": ["e1.1"], "changed": ["e1.2"], "unchanged": 1,
             "restart": []},
        )  # fmt: skip
        self.assertIn("added e1.3", result["message"])
        self.assertIs(self.service.target(1, 0), unchanged)
        self.assertEqual(sorted(self.served()), ["e1.0", "e1.2", "e1.3"])
        self.assertEqual(announced(self.sent()[before:]), [(BROADCAST_MAC, 1, 3)])
        self.assertEqual(self.answer(read(1, 1)), [])
        self.assertEqual(len(self.answer(read(1, 3))), 1)
        self.assertTrue(self.listing("e1.2")["read_only"])
        self.assertIsNot(self.service.target(1, 2).backend, old_slice.backend)
        (reply,) = self.answer(write(1, 2))
        self.assertEqual(ata_of(reply).err_feature, ATAError.ABRT)
        self.assertEqual(self.b.read_bytes(), sector_image(0x81))

    def test_unchanged_file(self) -> None:
        """Reloading the same file changes nothing: every ``Target`` stays the same object."""
        manager = self.start()
        before = self.served()
        result = manager.reload()
        self.assertEqual((result["added"], result["removed"], result["changed"]), ([], [], []))
        self.assertEqual(result["unchanged"], 3)
        after = self.served()
        self.assertEqual(after.keys(), before.keys())
        for name in before:
            self.assertIs(after[name], before[name])

    def test_restores_file(self) -> None:
        """What ``ctl`` changed is put back as the file says by a reload."""
        manager = self.start()
        manager.add("1.5=memory:1M", [])
        self.assertEqual(manager.set("1.0", ["buffer_count=9"])["buffer_count"], 9)
        result = manager.reload()
        self.assertEqual((result["removed"], result["changed"]), (["e1.5"], ["e1.0"]))
        self.assertEqual(self.listing("e1.0")["buffer_count"], 64)
        self.assertNotIn("e1.5", self.served())

    def test_broken_file(self) -> None:
        """A broken file: one-line ``ControlError`` naming it; nothing changed."""
        manager = self.start()
        before = self.served()
        config = manager.config
        self.write_config(self.config_text(more="[[target]]\naddress = 1.4\n"))
        error = self.assertRaises(ControlError, manager.reload)
        self.assert_one_line(error, "reload:", str(self.path), "nothing changed")
        self.assertEqual(self.served(), before)
        self.assertIs(manager.config, config)

    def test_backend_cannot_open(self) -> None:
        """
        A new target whose file is missing: one-line ``ControlError`` naming it;
        nothing changed (the other new target is not served, the removed one
        still is) and no descriptor is left open.
        """
        manager = self.start()
        before = self.served()
        missing = self.dir / "missing.img"
        text = self.config_text().replace('address = "1.1"', 'address = "1.3"') + (
            f'\n[[target]]\naddress = "1.4"\nbackend = "file:{missing}"\n'
        )
        self.write_config(text)
        descriptors = open_descriptors()
        error = self.assertRaises(ControlError, manager.reload)
        self.assert_one_line(error, "reload:", "e1.4", str(missing), "nothing changed")
        self.assertEqual(self.served(), before)
        self.assertEqual(self.answer(read(1, 3)), [])
        self.assertEqual(len(self.answer(read(1, 1))), 1)
        self.assertEqual(open_descriptors(), descriptors)

    def test_changed_backend_cannot_open(self) -> None:
        """
        A changed target whose new file is missing, beside a new target that
        opens: nothing changed, and the new target's file is not left open.
        """
        manager = self.start()
        before = self.served()
        missing = self.dir / "missing.img"
        c = self.dir / "c.img"
        c.write_bytes(sector_image(7))
        text = self.config_text(more=f'\n[[target]]\naddress = "1.4"\nbackend = "file:{c}"\n')
        self.write_config(text.replace(f"file:{self.b}", f"file:{missing}"))
        descriptors = open_descriptors()
        error = self.assertRaises(ControlError, manager.reload)
        self.assert_one_line(error, "e1.2", str(missing), "nothing changed")
        self.assertEqual(self.served(), before)
        self.assertEqual(open_descriptors(), descriptors)

    def test_interface_cannot_open(self) -> None:
        """
        A new target on an interface that cannot be opened: one-line
        ``ControlError``, and nothing changed: the target the file removes
        is still served.
        """
        manager = self.start()
        before = self.served()
        text = self.config_text().replace('address = "1.1"', 'address = "1.3"') + (
            '\n[[target]]\naddress = "1.4"\nbackend = "memory:64K"\ninterfaces = ["eth9"]\n'
        )
        self.write_config(text)
        error = self.assertRaises(ControlError, manager.reload)
        self.assert_one_line(error, "eth9")
        self.assertEqual(self.served(), before)
        self.assertEqual(len(self.answer(read(1, 1))), 1)

    def test_restart_keys_reported(self) -> None:
        """A changed restart key (``workers``) is reported and logged, not applied."""
        manager = self.start()
        self.write_config(self.config_text(server="workers = 2"))
        with capturedLogs() as events:
            result = manager.reload()
        self.assertEqual(result["restart"], ["workers"])
        self.assertIn("workers", result["message"])
        self.assertEqual(manager.config.workers, 1)
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("workers", warnings[0])
        self.assertEqual(manager.reload()["restart"], ["workers"])

    def test_removed_grace_applied(self) -> None:
        """
        A reload that changes ``removed_grace`` applies it: a target removed
        afterwards answers ``ABRT`` during the new grace.
        """
        manager = self.start()
        self.write_config(self.config_text().replace("removed_grace = 0", "removed_grace = 30"))
        manager.reload()
        manager.remove("1.1")
        (reply,) = self.answer(read(1, 1))
        self.assertEqual(ata_of(reply).err_feature, ATAError.ABRT)
        self.reactor.advance(31)
        self.assertEqual(self.answer(read(1, 1)), [])

    def test_hangup_broken_file(self) -> None:
        """``hangup`` on a broken file logs one error line naming it and raises nothing."""
        manager = self.start()
        self.write_config("[server\n")
        with capturedLogs() as events:
            manager.hangup()
        errors = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(errors), 1, errors)
        self.assertEqual(events[-1]["log_level"], LogLevel.error)
        self.assertIn("SIGHUP", errors[0])
        self.assertIn(str(self.path), errors[0])
        self.assertNotIn("\n", errors[0])

    def test_hangup_applies(self) -> None:
        """``hangup`` on a good file reloads it and logs what changed."""
        manager = self.start()
        self.write_config(self.config_text(more=MEMORY_1_4))
        with capturedLogs() as events:
            manager.hangup()
        self.assertIn("e1.4", self.served())
        lines = [formatEvent(e) for e in events if e["log_format"].startswith("reload:")]
        self.assertEqual(lines, ["reload: added e1.4; 3 unchanged"])

    def test_new_target_announced_to_broadcast(self) -> None:
        """A target added by a reload announces itself to broadcast."""
        manager = self.start()
        before = len(self.sent())
        self.write_config(self.config_text(more=MEMORY_1_4))
        manager.reload()
        self.assertEqual(announced(self.sent()[before:]), [(BROADCAST_MAC, 1, 4)])

    def test_duplicate_wait_applied(self) -> None:
        """
        A reload that changes ``duplicate_wait`` applies it: a target added
        afterwards is asked about for the new wait before it is served.
        """
        manager = self.start()
        self.write_config(self.config_text().replace("duplicate_wait = 0", "duplicate_wait = 2"))
        manager.reload()
        self.assertEqual(manager.add("1.5=memory:1M", [])["state"], "probing")
        self.reactor.pump([0.1] * 10)
        self.assertEqual(self.listing("e1.5")["state"], "probing")
        self.assertEqual(self.answer(read(1, 5)), [])
        self.reactor.pump([0.1] * 11)
        self.assertEqual(self.listing("e1.5")["state"], "serving")
        self.assertEqual(len(self.answer(read(1, 5))), 1)
