"""
Tests for ``aoe-twisted config``, ``mask`` and ``reserve``: a target's config string,
MAC mask list and reserve list over the wire (AoEr11 sections 3.2-3.4).

Three levels, as in ``tests.test_cli``: the command line parsed on its own;
each subcommand in this process against the real server over
``MemoryPacketSystem``; and, as root, ``python -m aoe_twisted`` in a
subprocess against ``twistd aoe`` and against ``vblade`` on a real veth pair
between two network namespaces.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    ETHERTYPE,
    SECTOR_SIZE,
    Command,
    EthernetFrame,
    Header,
    format_mac,
    parse_mac,
)
from aoe_twisted.initiator import cli
from tests.netns import VethPair
from tests.test_cli import InProcessCase, MiB
from tests.test_client_vblade import SHELF, SLOT, STRANGER, VbladeCase

STRANGER_MAC = parse_mac(STRANGER)
OTHER = "02:00:5e:00:00:02"
OTHER_MAC = parse_mac(OTHER)


class ParseTests(SynchronousTestCase):
    """The three subcommands' command lines."""

    def parse(self, *argv: str) -> Any:
        return cli.build_parser().parse_args([*argv, "-i", "eth0"])

    def test_config(self) -> None:
        """One action at most; strings are bytes; no action means read."""
        args = self.parse("config", "e1.0")
        self.assertEqual((args.test, args.test_prefix, args.set, args.force_set, args.json),
                         (None, None, None, None, False))
        self.assertEqual(self.parse("config", "e1.0", "--set", "héllo").set, "héllo".encode())
        self.assertEqual(self.parse("config", "e1.0", "--force-set", "").force_set, b"")
        self.assertTrue(self.parse("config", "e1.0", "--json").json)

    def test_mask(self) -> None:
        """``--add`` and ``--delete`` keep the order given; ``self`` is kept for later."""
        args = self.parse("mask", "e1.0", "--add", STRANGER, "self", "--delete", OTHER,
                          "--add", "020000000003")
        self.assertEqual(args.edits, [(True, STRANGER_MAC), (True, None), (False, OTHER_MAC),
                                      (True, bytes.fromhex("020000000003"))])
        self.assertIsNone(self.parse("mask", "e1.0").edits)

    def test_reserve(self) -> None:
        args = self.parse("reserve", "e1.0", "--set", "self", STRANGER)
        self.assertEqual(args.set_macs, [None, STRANGER_MAC])
        self.assertTrue(self.parse("reserve", "e1.0", "--force-release").force_release)

    def test_usage_errors(self) -> None:
        """Each bad command line is one line and status 2."""
        for argv, expected in [
            (["config", "e1.0", "--set", "a", "--test", "b"], "not allowed with argument"),
            (["config", "e1.0", "--set", "x" * 1025], "at most 1024 bytes, not 1025"),
            (["mask", "e1.0", "--add", "nonsense"], "not a MAC address: 'nonsense'"),
            (["mask", "e1.0", "--add"], "expected at least one argument"),
            (["reserve", "e1.0", "--set", STRANGER, "--release"], "not allowed with argument"),
            (["reserve", "e1.0", "--force-set"], "expected at least one argument"),
        ]:
            self.assertUsageError(argv, expected)

    def test_checked_before_sending(self) -> None:
        """What argparse cannot check is refused before any socket opens, as a usage error."""
        many = [f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(186)]
        for argv, expected in [
            (["mask", "e1.0", "--read", "--add", STRANGER],
             "--read cannot be combined with --add or --delete"),
            (["mask", "e1.0", "--add", *many], "at most 185 changes in one request, not 186"),
            (["reserve", "e1.0", "--set", *many, *many[:70]],
             "a reserve list holds at most 255 MACs, not 256"),
        ]:
            self.assertUsageError([*argv, "--netns", "aoe-no-such-namespace"], expected)

    def assertUsageError(self, argv: list[str], expected: str) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            cli.main([*argv, "-i", "eth0"])
        self.assertEqual(raised.exception.code, 2, argv)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(expected, lines[0])


class InProcessControlCase(InProcessCase):
    """The real server in this process, its ACL store in memory, and helpers."""

    def make_target(self) -> Target:
        """``e1.0`` with config string "demo" and room for three MACs on its mask list."""
        return Target(1, 0, MemoryBackend(MiB), acl=MemoryACLStore(config_string=b"demo"),
                      buffer_count=8, mask_limit=3)

    @property
    def me(self) -> str:
        return format_mac(self.client_mac)

    def json_of(self, out: str) -> Any:
        lines = out.splitlines()
        self.assertEqual(len(lines), 1, out)
        return json.loads(lines[0])


class ConfigTests(InProcessControlCase):
    """``aoe-twisted config``."""

    def test_read(self) -> None:
        self.assertEqual(self.aoe("config", "e1.0"), (0, "e1.0 config string: 'demo'\n", ""))

    def test_read_empty(self) -> None:
        self.target.acl.set_config_string(b"")
        self.assertEqual(self.aoe("config", "e1.0", "--read"),
                         (0, "e1.0 config string: (empty)\n", ""))

    def test_json(self) -> None:
        """``--json``: one object with the string (text and hex) and the target's limits."""
        status, out, err = self.aoe("config", "e1.0", "--json")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(self.json_of(out), {
            "target": "e1.0", "mac": format_mac(self.server_mac), "interface": "cli0",
            "config_string": "demo", "config_string_hex": b"demo".hex(),
            "buffer_count": 8, "sector_count": 2, "firmware_version": 1,
        })

    def test_test_match(self) -> None:
        """A matching ``--test`` or ``--test-prefix`` prints the string and exits 0."""
        self.assertEqual(self.aoe("config", "e1.0", "--test", "demo"),
                         (0, "e1.0 config string: 'demo'\n", ""))
        self.assertEqual(self.aoe("config", "e1.0", "--test-prefix", "de"),
                         (0, "e1.0 config string: 'demo'\n", ""))

    def test_test_mismatch(self) -> None:
        """
        A mismatch gets no answer (AoEr11), so the command prints nothing and exits 1,
        after waiting out the timeout and every retry.
        """
        for flag, value in (("--test", "dem"), ("--test-prefix", "demox")):
            started = self.clock.seconds()
            result = self.aoe("config", "e1.0", flag, value, "--timeout", "0.1",
                              "--retries", "2")
            self.assertEqual(result, (1, "", ""), flag)
            self.assertAlmostEqual(self.clock.seconds() - started, 0.1 + 0.2 + 0.4, places=3)

    def test_test_mismatch_verbose(self) -> None:
        """With ``-v`` the mismatch is one line saying why nothing came back."""
        status, out, err = self.aoe("config", "e1.0", "--test", "nope", "--timeout", "0.1",
                                    "--retries", "0", "-v")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "aoe-twisted: e1.0: no answer in 0.1 s: the config string does "
                              "not equal 'nope'\n")

    def test_set_refused(self) -> None:
        """``--set`` over another string: one line naming it, status 1, nothing changed."""
        status, out, err = self.aoe("config", "e1.0", "--set", "mine")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "aoe-twisted: e1.0: config string already set: 'demo' "
                              "(use --force-set)\n")
        self.assertEqual(self.target.acl.config_string, b"demo")

    def test_set(self) -> None:
        """``--set`` on an empty string sets it and says what it was."""
        self.target.acl.set_config_string(b"")
        self.assertEqual(self.aoe("config", "e1.0", "--set", "mine"),
                         (0, "e1.0 config string set: 'mine' (was (empty))\n", ""))
        self.assertEqual(self.target.acl.config_string, b"mine")

    def test_set_same(self) -> None:
        """``--set`` of the string already there is accepted, and says so."""
        self.assertEqual(self.aoe("config", "e1.0", "--set", "demo"),
                         (0, "e1.0 config string: 'demo' (unchanged)\n", ""))

    def test_force_set(self) -> None:
        """``--force-set`` replaces any string; ``--json`` says whether it changed."""
        status, out, _err = self.aoe("config", "e1.0", "--force-set", "ours", "--json")
        self.assertEqual(status, 0)
        value = self.json_of(out)
        self.assertEqual((value["config_string"], value["changed"]), ("ours", True))
        self.assertEqual(self.target.acl.config_string, b"ours")
        self.assertEqual(self.aoe("config", "e1.0", "--force-set", "")[1],
                         "e1.0 config string set: (empty) (was 'ours')\n")
        self.assertEqual(self.target.acl.config_string, b"")

    def test_not_found(self) -> None:
        """No answer: one line that also names a mask list as a possible cause."""
        status, _out, err = self.aoe("config", "e1.9", "--timeout", "0.1", "--retries", "1")
        self.assertEqual((status, err), (1, "aoe-twisted: e1.9: no such AoE target answered on "
                                            "cli0 (or its mask list leaves this host out)\n"))


class MaskTests(InProcessControlCase):
    """``aoe-twisted mask``."""

    def test_read_empty(self) -> None:
        self.assertEqual(self.aoe("mask", "e1.0"),
                         (0, "e1.0 mask list: empty (every host gets answers)\n", ""))

    def test_add(self) -> None:
        """``--add`` with ``self`` adds this host's MAC; the new list is printed."""
        status, out, err = self.aoe("mask", "e1.0", "--add", "self", STRANGER)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"e1.0 mask list: 2 MACs (only these hosts get answers)\n"
                              f"  {self.me}\n  {STRANGER}\n")
        self.assertEqual(self.target.acl.mask_list, (self.client_mac, STRANGER_MAC))

    def test_read(self) -> None:
        self.target.acl.set_mask_list((self.client_mac,))
        self.assertEqual(self.aoe("mask", "e1.0", "--read"),
                         (0, f"e1.0 mask list: 1 MAC (only these hosts get answers)\n"
                             f"  {self.me}\n", ""))

    def test_json(self) -> None:
        self.target.acl.set_mask_list((self.client_mac, OTHER_MAC))
        status, out, _err = self.aoe("mask", "e1.0", "--json")
        self.assertEqual(status, 0)
        self.assertEqual(self.json_of(out)["mask_list"], [self.me, OTHER])

    def test_delete(self) -> None:
        """``--delete`` and ``--add`` in one request, in order; an absent MAC is no error."""
        self.target.acl.set_mask_list((self.client_mac, STRANGER_MAC))
        status, _out, err = self.aoe("mask", "e1.0", "--delete", STRANGER, OTHER,
                                     "--add", OTHER)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(self.target.acl.mask_list, (self.client_mac, OTHER_MAC))

    def test_locked_out_warning(self) -> None:
        """A list that leaves this host out is made, with a warning on standard error."""
        status, _out, err = self.aoe("mask", "e1.0", "--add", STRANGER)
        self.assertEqual(status, 0)
        self.assertEqual(err, f"aoe-twisted: warning: this host ({self.me}) is not on e1.0's "
                              "mask list: the target no longer answers it\n")
        self.assertEqual(self.target.acl.mask_list, (STRANGER_MAC,))

    def test_locked_out(self) -> None:
        """Once it is, the target is silent to us: one line naming the mask list."""
        self.target.acl.set_mask_list((STRANGER_MAC,))
        status, _out, err = self.aoe("mask", "e1.0", "--timeout", "0.1", "--retries", "1")
        self.assertEqual((status, err), (1, "aoe-twisted: e1.0: no such AoE target answered on "
                                            "cli0 (or its mask list leaves this host out)\n"))

    def test_full(self) -> None:
        """
        A full list stops the edit at the MAC that did not fit: one line naming it,
        status 1; the MACs before it stay added.
        """
        status, out, err = self.aoe("mask", "e1.0", "--add", "self", STRANGER, OTHER,
                                    "02:00:5e:00:00:03")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "aoe-twisted: e1.0: mask list full (at MAC 4, 02:00:5e:00:00:03); "
                              "the 3 before it were applied\n")
        self.assertEqual(self.target.acl.mask_list, (self.client_mac, STRANGER_MAC, OTHER_MAC))


class ReserveTests(InProcessControlCase):
    """``aoe-twisted reserve``."""

    def test_read_empty(self) -> None:
        self.assertEqual(self.aoe("reserve", "e1.0"),
                         (0, "e1.0 reserve list: empty (not reserved)\n", ""))

    def test_set(self) -> None:
        """``--set self OTHER`` reserves the target for both; the list is printed."""
        status, out, err = self.aoe("reserve", "e1.0", "--set", "self", OTHER)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"e1.0 reserve list: 2 MACs (only these hosts may read and "
                              f"write)\n  {self.me}\n  {OTHER}\n")
        self.assertEqual(self.target.acl.reserve_list, (self.client_mac, OTHER_MAC))

    def test_json(self) -> None:
        self.target.acl.set_reserve_list((STRANGER_MAC,))
        status, out, _err = self.aoe("reserve", "e1.0", "--read", "--json")
        self.assertEqual(status, 0)
        self.assertEqual(self.json_of(out), {"target": "e1.0", "mac": format_mac(self.server_mac),
                                             "interface": "cli0", "reserve_list": [STRANGER]})

    def test_set_refused(self) -> None:
        """Held by another host: one line naming it, status 1, nothing changed."""
        self.target.acl.set_reserve_list((STRANGER_MAC,))
        status, out, err = self.aoe("reserve", "e1.0", "--set", "self")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, f"aoe-twisted: e1.0: target is reserved by {STRANGER} "
                              "(use --force-set)\n")
        self.assertEqual(self.target.acl.reserve_list, (STRANGER_MAC,))

    def test_release_refused(self) -> None:
        self.target.acl.set_reserve_list((STRANGER_MAC, OTHER_MAC))
        status, _out, err = self.aoe("reserve", "e1.0", "--release")
        self.assertEqual((status, err), (1, f"aoe-twisted: e1.0: target is reserved by "
                                            f"{STRANGER}, {OTHER} (use --force-release)\n"))

    def test_release(self) -> None:
        """A host on the list may release it."""
        self.target.acl.set_reserve_list((self.client_mac,))
        self.assertEqual(self.aoe("reserve", "e1.0", "--release"),
                         (0, "e1.0 reserve list: empty (not reserved)\n", ""))
        self.assertEqual(self.target.acl.reserve_list, ())

    def test_force(self) -> None:
        """``--force-set`` and ``--force-release`` work whoever holds the target."""
        self.target.acl.set_reserve_list((STRANGER_MAC,))
        self.assertEqual(self.aoe("reserve", "e1.0", "--force-set", OTHER)[0], 0)
        self.assertEqual(self.target.acl.reserve_list, (OTHER_MAC,))
        self.assertEqual(self.aoe("reserve", "e1.0", "--force-release")[0], 0)
        self.assertEqual(self.target.acl.reserve_list, ())

    def test_set_retransmitted(self) -> None:
        """
        A SET for other hosts whose reply is lost is sent again; the target refuses the
        copy (we are not on the list it set), and the refusal, listing exactly what was
        asked, is the success it is.
        """
        port = self.service.ports["srv0"]
        write = port.write
        dropped = []

        def lose_first_reserve_reply(frame: bytes) -> None:
            ethernet = EthernetFrame.from_bytes(bytes(frame))
            if ethernet.ethertype == ETHERTYPE and not dropped:
                header = Header.from_bytes(ethernet.payload)
                if header.command == Command.RESERVE_RELEASE:
                    dropped.append(header)
                    return
            write(frame)

        self.patch(port, "write", lose_first_reserve_reply)
        status, out, err = self.aoe("reserve", "e1.0", "--set", STRANGER, "--timeout", "0.1")
        self.assertEqual(len(dropped), 1)
        self.assertEqual((status, err), (0, ""))
        self.assertIn(STRANGER, out)
        self.assertEqual(self.target.acl.reserve_list, (STRANGER_MAC,))


class TwistdTests(SynchronousTestCase):
    """
    ``python -m aoe_twisted config/mask/reserve`` against ``twistd aoe`` on a real veth
    pair between two namespaces.  Root only.
    """

    def setUp(self) -> None:
        self.pair = VethPair.create(self)
        log = os.path.abspath(self.mktemp())
        output = open(log, "wb")  # noqa: SIM115 - the server writes it until the cleanup
        self.addCleanup(output.close)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "aoe_twisted", "serve", "--netns", self.pair.server_ns,
             "--iface", self.pair.server_if, "--backend", "memory:1M", "--shelf", "3",
             "--slot", "2", "--config-string", "lab"],
            stdout=output, stderr=subprocess.STDOUT,
        )
        self.addCleanup(self.stop_server)
        deadline = time.monotonic() + 30
        while self.aoe("config", "e3.2", "--timeout", "0.2", "--retries", "1").returncode:
            if self.server.poll() is not None or time.monotonic() > deadline:
                with open(log) as f:
                    self.fail(f"the server did not come up: {f.read()}")
        self.me = run_in(self.pair.client_ns, self.pair.client_if)

    def stop_server(self) -> None:
        if self.server.poll() is None:
            self.server.terminate()
            self.server.wait(10)

    def aoe(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.pair, *argv)

    def test_config(self) -> None:
        """Read, a refused set, a silent test mismatch, a forced set, and a test that matches."""
        check_config(self, self.aoe, "lab")

    def test_mask(self) -> None:
        """Add, read, list full at the server's 64 MACs, delete."""
        check_mask(self, self.aoe, self.me, 64)

    def test_reserve(self) -> None:
        """Set, refused set naming the holder, refused release, forced release."""
        check_reserve(self, self.aoe, self.me)


class VbladeTests(VbladeCase):
    """The same commands against vblade 25: config strings, mask lists and reserve lists."""

    timeout = 60

    @defer.inlineCallbacks
    def setUpVblade(self) -> Generator[defer.Deferred[Any], Any, None]:
        yield self.start()
        # The command runs in its own process: our listening client is not needed.
        yield self.client.close()

    def aoe(self, *argv: str) -> defer.Deferred[subprocess.CompletedProcess[str]]:
        from twisted.internet.threads import deferToThread

        return deferToThread(run_cli, self.pair, *argv)

    def in_thread(self, check: Any, *args: Any) -> defer.Deferred[None]:
        """Run a blocking ``check`` (which runs commands) in a thread."""
        from twisted.internet.threads import deferToThread

        return deferToThread(check, self, lambda *argv: run_cli(self.pair, *argv), *args)

    @defer.inlineCallbacks
    def test_config(self) -> Generator[defer.Deferred[Any], Any, None]:
        """vblade starts with an empty string; then as against our server."""
        yield self.setUpVblade()
        result = yield self.aoe("config", f"e{SHELF}.{SLOT}")
        self.assertEqual((result.returncode, result.stdout),
                         (0, f"e{SHELF}.{SLOT} config string: (empty)\n"))
        result = yield self.aoe("config", f"e{SHELF}.{SLOT}", "--set", "vb")
        self.assertEqual(result.returncode, 0, result.stderr)
        yield self.in_thread(check_config, "vb", f"e{SHELF}.{SLOT}")

    @defer.inlineCallbacks
    def test_mask(self) -> Generator[defer.Deferred[Any], Any, None]:
        """
        vblade's mask list: two MACs added in one request, read back; full at 32.

        vblade 25 edits only the first two entries right: ``addmask`` and
        ``rmmask`` (``aoe.c``) end their scan at ``masks + nmasks`` bytes, not
        ``nmasks * 6``, so a third MAC overwrites the second, and a delete
        computes a negative length for ``memmove`` (vblade stopped answering
        when we tried).  Deletes are therefore tested against our server only;
        ``-m`` at start-up fills the list correctly, so the full list is made
        that way.
        """
        yield self.setUpVblade()
        me = run_in(self.pair.client_ns, self.pair.client_if)
        target = f"e{SHELF}.{SLOT}"
        result = yield self.aoe("mask", target)
        self.assertEqual(result.stdout, f"{target} mask list: empty (every host gets answers)\n")
        result = yield self.aoe("mask", target, "--add", "self", STRANGER)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, f"{target} mask list: 2 MACs (only these hosts get answers)\n"
                             f"  {me}\n  {STRANGER}\n", ""))
        result = yield self.aoe("mask", target, "--json")
        self.assertEqual(json.loads(result.stdout)["mask_list"], [me, STRANGER])
        # The target now answers only us.
        result = yield self.aoe("mask", target, "--read")
        self.assertEqual(result.returncode, 0, result.stderr)

    @defer.inlineCallbacks
    def test_mask_full(self) -> Generator[defer.Deferred[Any], Any, None]:
        """With 32 MACs (``-m``), the next one is refused: "mask list full (at MAC 1)"."""
        self.pair = VethPair.create(self)
        self.workdir = Path(self.mktemp())
        self.workdir.mkdir(parents=True)
        self.image = self.workdir / "disk.img"
        self.image.write_bytes(bytes(SECTOR_SIZE * 64))
        me = run_in(self.pair.client_ns, self.pair.client_if)
        yield self.spawn_vblade([me, *(f"02:00:5e:00:01:{i:02x}" for i in range(31))])
        target = f"e{SHELF}.{SLOT}"
        result = yield self.aoe("mask", target, "--add", OTHER)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (1, "", f"aoe-twisted: {target}: mask list full (at MAC 1, {OTHER})\n"))
        result = yield self.aoe("mask", target, "--json")
        self.assertEqual(len(json.loads(result.stdout)["mask_list"]), 32)

    @defer.inlineCallbacks
    def test_reserve(self) -> Generator[defer.Deferred[Any], Any, None]:
        """vblade implements reserve/release too (``aoesrr``), as AoEr11 says."""
        yield self.setUpVblade()
        me = run_in(self.pair.client_ns, self.pair.client_if)
        yield self.in_thread(check_reserve, me, f"e{SHELF}.{SLOT}")


# -- the checks both servers pass --------------------------------------------------


def run_in(namespace: str, interface: str) -> str:
    """Return the MAC of ``interface`` in ``namespace``, as text."""
    from tests.test_client_vblade import interface_mac

    return format_mac(interface_mac(namespace, interface))


def run_cli(pair: Any, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m aoe_twisted ARGV`` on the client end of ``pair``."""
    return subprocess.run(
        [sys.executable, "-m", "aoe_twisted", *argv, "-i", pair.client_if, "--netns",
         pair.client_ns],
        capture_output=True, text=True, timeout=60, check=False,
    )


def check_config(case: SynchronousTestCase, aoe: Any, current: str,
                 target: str = "e3.2") -> None:
    """Run the config checks against ``target``, whose string is ``current``."""
    result = aoe("config", target)
    case.assertEqual((result.returncode, result.stdout, result.stderr),
                     (0, f"{target} config string: '{current}'\n", ""))
    result = aoe("config", target, "--set", "other")
    case.assertEqual((result.returncode, result.stdout, result.stderr),
                     (1, "", f"aoe-twisted: {target}: config string already set: '{current}' "
                             "(use --force-set)\n"))
    started = time.monotonic()
    result = aoe("config", target, "--test", "other", "--timeout", "0.2", "--retries", "1")
    case.assertEqual((result.returncode, result.stdout, result.stderr), (1, "", ""))
    case.assertGreaterEqual(time.monotonic() - started, 0.2 + 0.4)
    result = aoe("config", target, "--force-set", "other", "--json")
    case.assertEqual(result.returncode, 0, result.stderr)
    case.assertEqual(json.loads(result.stdout)["config_string"], "other")
    result = aoe("config", target, "--test-prefix", "oth")
    case.assertEqual((result.returncode, result.stdout),
                     (0, f"{target} config string: 'other'\n"))


def check_mask(case: SynchronousTestCase, aoe: Any, me: str, limit: int,
               target: str = "e3.2") -> None:
    """Run the mask checks against ``target``, whose list holds ``limit`` MACs at most."""
    result = aoe("mask", target)
    case.assertEqual((result.returncode, result.stdout),
                     (0, f"{target} mask list: empty (every host gets answers)\n"))
    result = aoe("mask", target, "--add", "self", STRANGER)
    case.assertEqual((result.returncode, result.stderr), (0, ""))
    case.assertEqual(result.stdout, f"{target} mask list: 2 MACs (only these hosts get "
                                    f"answers)\n  {me}\n  {STRANGER}\n")
    more = [f"02:00:5e:00:01:{i:02x}" for i in range(limit - 1)]
    result = aoe("mask", target, "--add", *more)
    case.assertEqual((result.returncode, result.stdout), (1, ""))
    case.assertEqual(result.stderr, f"aoe-twisted: {target}: mask list full (at MAC "
                                    f"{limit - 1}, {more[limit - 2]}); the {limit - 2} before "
                                    "it were applied\n")
    result = aoe("mask", target, "--json")
    case.assertEqual(json.loads(result.stdout)["mask_list"], [me, STRANGER, *more[:-1]])
    result = aoe("mask", target, "--delete", STRANGER, *more)
    case.assertEqual((result.returncode, result.stdout),
                     (0, f"{target} mask list: 1 MAC (only these hosts get answers)\n  {me}\n"))
    result = aoe("mask", target, "--delete", "self")
    case.assertEqual((result.returncode, result.stdout),
                     (0, f"{target} mask list: empty (every host gets answers)\n"))


def check_reserve(case: SynchronousTestCase, aoe: Any, me: str, target: str = "e3.2") -> None:
    """Run the reserve checks against ``target``, not reserved to begin with."""
    result = aoe("reserve", target)
    case.assertEqual((result.returncode, result.stdout),
                     (0, f"{target} reserve list: empty (not reserved)\n"))
    result = aoe("reserve", target, "--set", "self")
    case.assertEqual((result.returncode, result.stdout),
                     (0, f"{target} reserve list: 1 MAC (only these hosts may read and write)"
                         f"\n  {me}\n"))
    result = aoe("reserve", target, "--force-set", STRANGER)
    case.assertEqual(result.returncode, 0, result.stderr)
    result = aoe("reserve", target, "--set", "self")
    case.assertEqual((result.returncode, result.stdout, result.stderr),
                     (1, "", f"aoe-twisted: {target}: target is reserved by {STRANGER} "
                             "(use --force-set)\n"))
    result = aoe("read", target, "--length", "512")
    case.assertEqual(result.returncode, 1)
    case.assertIn("AoE error 6", result.stderr)
    result = aoe("reserve", target, "--release")
    case.assertEqual((result.returncode, result.stderr),
                     (1, f"aoe-twisted: {target}: target is reserved by {STRANGER} "
                         "(use --force-release)\n"))
    result = aoe("reserve", target, "--force-release", "--json")
    case.assertEqual((result.returncode, json.loads(result.stdout)["reserve_list"]), (0, []))
