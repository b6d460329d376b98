# -*- test-case-name: tests.test_tap -*-
"""Tests for ``twistd aoe``'s options, plugin registration and service construction."""

from __future__ import annotations

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aoe_twisted.tap import Options, makeService


def TargetSpec(shelf: int, slot: int, backend: str) -> tuple[int, int, str]:
    """What a target's address and backend are, as compared in these tests."""
    return (shelf, slot, backend)


def specs(options: Options) -> list[tuple[int, int, str]]:
    """The address and backend of each target the options describe."""
    return [(t.shelf, t.slot, t.backend) for t in options["targets"]]


def parse(*argv: str) -> Options:
    """Parse ``argv`` as ``twistd aoe`` would."""
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    """``Options`` turns a command line into targets, or one line naming the bad option."""

    def assertExitNames(self, argv: list[str], option: str) -> str:
        """Parsing ``argv`` exits with a one-line message that names ``option``."""
        with self.assertRaises(SystemExit) as caught:
            parse(*argv)
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("twistd aoe: "), message)
        self.assertIn(option, message)
        return message

    def test_defaults(self) -> None:
        """With only --iface and --backend the target is e0.0 with buffer count 64."""
        options = parse("--iface", "eth0", "--backend", "memory:1M")
        self.assertEqual(specs(options), [TargetSpec(0, 0, "memory:1M")])
        self.assertEqual(options["buffer-count"], 64)
        self.assertIsNone(options["max-sectors"])
        self.assertFalse(options["read-only"])
        self.assertEqual(options["masks"], [])
        self.assertEqual(options["workers"], 1)

    def test_shelf_slot(self) -> None:
        """--shelf and --slot address the --backend target."""
        options = parse("-i", "eth0", "-b", "file:x.img", "--shelf", "7", "--slot", "3")
        self.assertEqual(specs(options), [TargetSpec(7, 3, "file:x.img")])

    def test_several_targets(self) -> None:
        """
        --target repeats, after the --backend target, each with its own address
        (in ``aoe_twisted.units.parse_address``'s grammar: ``1.2``, ``0x10.0``, ``e5.06``).
        """
        options = parse(
            "-i", "eth0", "-b", "memory:1M",
            "--target", "1.2=memory:2M", "--target", "0x10.0=file:/tmp/d.img",
            "--target", "e5.06=memory:1MB",
        )
        self.assertEqual(
            specs(options),
            [
                TargetSpec(0, 0, "memory:1M"),
                TargetSpec(1, 2, "memory:2M"),
                TargetSpec(16, 0, "file:/tmp/d.img"),
                TargetSpec(5, 6, "memory:1MB"),
            ],
        )

    def test_targets_without_backend(self) -> None:
        """--target alone is enough; no e0.0 is added."""
        options = parse("-i", "eth0", "--target", "3.4=memory:1M")
        self.assertEqual(specs(options), [TargetSpec(3, 4, "memory:1M")])

    def test_masks(self) -> None:
        """--mask repeats and accepts MACs with or without separators."""
        options = parse(
            "-i", "eth0", "-b", "memory:1M", "--mask", "52:54:00:ae:00:01", "--mask", "525400ae0002"
        )
        self.assertEqual(
            options["masks"], [bytes.fromhex("525400ae0001"), bytes.fromhex("525400ae0002")]
        )

    def test_config_string(self) -> None:
        """--config-string becomes bytes."""
        options = parse("-i", "eth0", "-b", "memory:1M", "--config-string", "hello")
        self.assertEqual(options["config-string"], b"hello")

    def test_bad_values_name_the_option(self) -> None:
        """Every bad value exits with one line that names the option."""
        base = ["-i", "eth0", "-b", "memory:1M"]
        cases = [
            (["-b", "memory:1M"], "--iface"),
            (["-i", "eth0"], "--backend"),
            ([*base, "--shelf", "x"], "--shelf"),
            ([*base, "--shelf", "65535"], "--shelf"),
            ([*base, "--slot", "255"], "--slot"),
            ([*base, "--slot", "-1"], "--slot"),
            ([*base, "--buffer-count", "0"], "--buffer-count"),
            ([*base, "--max-sectors", "256"], "--max-sectors"),
            ([*base, "--mask", "zz:zz"], "--mask"),
            ([*base, "--config-string", "x" * 1025], "--config-string"),
            ([*base, "--target", "1.2"], "--target"),
            ([*base, "--target", "1=memory:1M"], "--target"),
            ([*base, "--target", "0.0=memory:1M"], "--target"),
            ([*base, "--target", "1.255=memory:1M"], "--target"),
            ([*base, "--target", "x.2=memory:1M"], "--target"),
            ([*base, "--target", "=memory:1M"], "--target"),
            ([*base, "--workers", "0"], "--workers"),
            ([*base, "--workers", "65"], "--workers"),
            ([*base, "--workers", "two"], "--workers"),
            ([*base, "--stale-after", "-1"], "--stale-after"),
            ([*base, "--stale-after", "3601"], "--stale-after"),
            ([*base, "--stale-after", "0.5"], "--stale-after"),
            ([*base, "--bogus"], "bogus"),
        ]
        for argv, option in cases:
            with self.subTest(argv=argv):
                self.assertExitNames(argv, option)


class RepeatedOptionTests(SynchronousTestCase):
    """An option that holds one value, given twice, is refused: not "the last one wins"."""

    base = ("-i", "eth0", "-b", "memory:1M")

    def assertRefusedTwice(self, argv: list[str], option: str) -> str:
        """Parsing ``argv`` exits with one line saying ``--option`` was given twice."""
        with self.assertRaises(SystemExit) as caught:
            parse(*argv)
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(f"twistd aoe: --{option}: given twice"), message)
        return message

    def test_every_parameter(self) -> None:
        """
        Every option with a value (each ``optParameters`` entry, those added
        later included) is refused when given twice, whatever the values.
        """
        for long, *_ in Options.optParameters:
            if long == "backend":
                argv = ["-i", "eth0", "--backend", "memory:1M", "--backend", "memory:2M"]
            else:
                argv = [*self.base, f"--{long}", "1", f"--{long}", "2"]
            with self.subTest(option=long):
                self.assertRefusedTwice(argv, long)

    def test_same_value_twice(self) -> None:
        """The same value twice is refused too: the command line has a mistake in it."""
        self.assertRefusedTwice([*self.base, "--slot", "1", "--slot", "1"], "slot")

    def test_short_and_long(self) -> None:
        """``-s`` and ``--shelf`` are one option."""
        self.assertRefusedTwice([*self.base, "-s", "1", "--shelf", "2"], "shelf")

    def test_abbreviated(self) -> None:
        """An abbreviation getopt accepts (``--work``) is the option it stands for."""
        self.assertRefusedTwice([*self.base, "--workers", "2", "--work", "3"], "workers")

    def test_message_shows_both_values_and_what_to_do(self) -> None:
        """The line quotes both values and, for --backend, points at --target."""
        message = self.assertRefusedTwice(
            ["-i", "eth0", "-b", "file:a.img", "--backend", "file:b.img"], "backend"
        )
        self.assertIn("'file:a.img', then 'file:b.img'", message)
        self.assertIn("--target SHELF.SLOT=SCHEME:SPEC", message)

    def test_long_value_shortened(self) -> None:
        """A long value (a config string) is shortened so the message stays one short line."""
        message = self.assertRefusedTwice(
            [*self.base, "-c", "x" * 1000, "-c", "y"], "config-string"
        )
        self.assertLess(len(message), 200)

    def test_repeatable_options_still_repeat(self) -> None:
        """--iface, --target and --mask take several values; flags may be given twice."""
        options = parse(
            *self.base, "-i", "eth1", "--target", "1.1=memory:1M", "--target", "1.2=memory:1M",
            "--mask", "02:00:00:00:00:01", "--mask", "02:00:00:00:00:02",
            "--read-only", "--read-only",
        )  # fmt: skip
        self.assertEqual(options["iface"], ["eth0", "eth1"])
        self.assertEqual(len(options["targets"]), 3)
        self.assertEqual(len(options["masks"]), 2)
        self.assertTrue(options["read-only"])


class PluginTests(SynchronousTestCase):
    """The ``aoe`` twistd plugin is installed and declares the tap module."""

    def test_found(self) -> None:
        """getPlugins(IServiceMaker) yields exactly one plugin named 'aoe'."""
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "aoe"]
        self.assertEqual(len(makers), 1)
        verifyObject(IServiceMaker, makers[0])
        verifyObject(IPlugin, makers[0])
        self.assertIs(makers[0].options, Options)


class MakeServiceTests(SynchronousTestCase):
    """``makeService`` opens the backends or exits with one line naming the bad one."""

    def test_bad_backend_exits(self) -> None:
        """An unknown scheme exits with a line naming the target and its backend."""
        options = parse("-i", "eth0", "-b", "nosuch:thing")
        with self.assertRaises(SystemExit) as caught:
            makeService(options)
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertIn("e0.0 = nosuch:thing", message)

    def test_missing_file_exits(self) -> None:
        """A file: backend whose file is missing exits naming the path."""
        path = self.mktemp()
        options = parse("-i", "eth0", "-b", f"file:{path}")
        with self.assertRaises(SystemExit) as caught:
            makeService(options)
        self.assertIn(path, str(caught.exception.code))

    def test_builds_targets(self) -> None:
        """Each target gets its address, buffer count, config string and mask list."""
        options = parse(
            "-i", "eth0", "-b", "memory:1M", "--target", "2.3=memory:2M",
            "--buffer-count", "32", "--config-string", "cfg", "--mask", "02:00:00:00:00:01",
            "--read-only",
        )
        service = makeService(options)
        targets = service.targets
        self.assertEqual([(t.shelf, t.slot) for t in targets], [(0, 0), (2, 3)])
        self.assertEqual([t.backend.size for t in targets], [1 << 20, 2 << 20])
        for target in targets:
            self.assertEqual(target.buffer_count, 32)
            self.assertTrue(target.backend.read_only)
            self.assertEqual(target.acl.config_string, b"cfg")
            self.assertEqual(target.acl.mask_list, (bytes.fromhex("020000000001"),))


    def test_stale_after(self) -> None:
        """
        --stale-after reaches every port the service opens (default 5 s; 0: never),
        as the config file's ``stale_after`` does.
        """
        from aoe_twisted.net.ring import STALE_AFTER

        self.assertEqual(makeService(parse("-i", "eth0", "-b", "memory:1M")).stale_after,
                         STALE_AFTER)
        for text, seconds in (("0", 0), ("12", 12)):
            service = makeService(parse("-i", "eth0", "-b", "memory:1M", "--stale-after", text))
            self.assertEqual(service.stale_after, seconds)

    def test_service_handles_sighup(self) -> None:
        """The service is the server's (``AoEService``), with SIGHUP handling mixed in."""
        from aoe_twisted.server import AoEService
        from aoe_twisted.tap import HangupHandler, ServesUnderTwistd

        service = makeService(parse("-i", "eth0", "-b", "memory:1M"))
        self.assertIsInstance(service, AoEService)
        self.assertIsInstance(service, ServesUnderTwistd)
        self.assertIsInstance(service.hangup, HangupHandler)  # type: ignore[attr-defined]
        self.assertFalse(service.hangup.installed)  # type: ignore[attr-defined]


class WorkersServiceTests(SynchronousTestCase):
    """``--workers N`` builds a ``WorkersService`` whose targets can be shared."""

    def test_builds_workers_service(self) -> None:
        """The targets' disks and state move to shared memory, seeded from the options."""
        from aoe_twisted.backends.shared_memory import SharedMemoryBackend
        from aoe_twisted.sharedacl import SharedACLStore
        from aoe_twisted.tap import ServesUnderTwistd
        from aoe_twisted.workers import WorkersService

        options = parse(
            "-i", "eth0", "-b", "memory:1M", "--workers", "3", "--config-string", "cfg",
            "--mask", "02:00:00:00:00:01",
        )
        service = makeService(options)
        self.assertIsInstance(service, WorkersService)
        self.assertIsInstance(service, ServesUnderTwistd)
        self.addCleanup(service.state.close)
        self.assertEqual(service.workers, 3)
        self.assertEqual(service.specs, ["memory:1M"])
        [target] = service.targets
        self.addCleanup(target.backend.close)
        self.assertIsInstance(target.backend, SharedMemoryBackend)
        self.assertEqual(target.backend.size, 1 << 20)
        self.assertIsInstance(target.acl, SharedACLStore)
        self.assertEqual(target.acl.config_string, b"cfg")
        self.assertEqual(target.acl.mask_list, (bytes.fromhex("020000000001"),))
        config = service.worker_config(1)
        self.assertEqual(config["stale_after"], 5)
        self.assertEqual(config["targets"][0]["backend"]["handoff"]["size"], 1 << 20)
        self.assertEqual(config["targets"][0]["backend"]["fd"], target.backend.fileno())
