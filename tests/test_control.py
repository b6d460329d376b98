# -*- test-case-name: tests.test_control -*-
"""
Tests for ``aoe_twisted.control``: the control socket and ``aoe-twisted ctl``.

The server side is the real ``ControlServer`` on a real UNIX socket in a
temporary directory, in front of ``FakeController`` (pure logic: the AoE
server's own controller is tested end to end against ``twistd aoe``).
``ctl`` runs either in this process (``ctl.run`` on the test's reactor) or
as the real command in a subprocess (``python -m aoe_twisted ctl ...``),
which is how its exit status, standard error and Ctrl-C are checked.  The
peer checks need a second user: as root, subprocesses run as ``nobody``
through ``setpriv``; otherwise those tests skip.
"""

from __future__ import annotations

import copy
import grp
import io
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aoe_twisted.control import ctl
from aoe_twisted.control.commands import BigJSON
from aoe_twisted.control.server import (
    ControlError,
    ControlServer,
    ControlSocketError,
    IController,
)
from aoe_twisted.initiator import cli

NOBODY = "nobody"
NOGROUP = "nogroup"


def _listing(address: str, backend: str = "memory:1M", size: int = 1 << 20) -> dict[str, Any]:
    """A target listing as the server returns it (docs/operations.md)."""
    return {
        "target": address, "backend": backend, "size": size, "read_only": False,
        "sync": False, "direct": False, "offset": 0, "length": 0, "interfaces": ["eth0"],
        "mask": [], "config_string": "", "buffer_count": 64, "max_sectors": 255,
        "state": "serving", "duplicate_of": None, "paths": [],
    }


def _target_stats(address: str, step: int) -> dict[str, Any]:
    """One target's stats after ``step`` seconds of 100 reads and 10 writes of 4 KiB a second."""
    return {
        "target": address, "backend": "memory:1M",
        "requests": {"read": 100 * step, "write": 10 * step, "identify": 1, "flush": 0,
                     "other_ata": 0, "config": 2, "mask": 0, "reserve": 0},
        "bytes": {"read": 409600 * step, "write": 40960 * step},
        "errors": {"ata": 0, "backend_ENOSPC": step},
        "in_flight": 3, "retransmits": 1,
        "service_seconds": {"buckets": [[0.001, 110 * step], ["+Inf", 110 * step]],
                            "sum": 0.011 * step, "count": 110 * step},
        "initiators": [{"mac": "52:54:00:12:34:56", "frames": 5, "last_seen": 1765000000.0}],
    }


@implementer(IController)
class FakeController:
    """
    Targets in a dict, stats whose counters advance one second per call.

    Every call is recorded in ``calls``.  ``big_stats`` replaces the
    snapshot; ``pending`` makes ``stats`` return a ``Deferred`` that never fires.
    """

    def __init__(self) -> None:
        self.listings = {"e1.0": _listing("e1.0", "file:/srv/a.img")}
        self.step = 0
        self.calls: list[tuple[Any, ...]] = []
        self.big_stats: dict[str, Any] | None = None
        self.pending: Deferred[Any] | None = None
        self.broken_reload = False

    def _find(self, address: str) -> dict[str, Any]:
        name = address if address.startswith("e") else "e" + address
        if name not in self.listings:
            raise ControlError(f"no target {name} is served")
        return self.listings[name]

    def targets(self) -> list[dict[str, Any]]:
        self.calls.append(("targets",))
        return [copy.deepcopy(self.listings[name]) for name in sorted(self.listings)]

    def stats(self) -> Any:
        self.calls.append(("stats",))
        if self.pending is not None:
            return self.pending
        if self.big_stats is not None:
            return self.big_stats
        self.step += 1
        now = 1765000000.0 + self.step
        return {
            "time": now,
            "targets": [_target_stats(name, self.step) for name in sorted(self.listings)],
            "interfaces": [{"interface": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1500,
                            "received": 1000 * self.step, "sent": 990 * self.step,
                            "ignored": 0, "dropped": 0, "malformed": 0, "stale": 0}],
            "initiators": [{"mac": "52:54:00:12:34:56", "targets": ["e1.0"], "frames": 5,
                            "last_seen": now - 3}],
        }

    def add(self, target: str, settings: list[str]) -> dict[str, Any]:
        self.calls.append(("add", target, settings))
        address, _, backend = target.partition("=")
        name = address if address.startswith("e") else "e" + address
        if name in self.listings:
            raise ControlError(f"{name} is already served")
        self.listings[name] = _listing(name, backend.split(",")[0])
        return copy.deepcopy(self.listings[name])

    def remove(self, address: str) -> dict[str, Any]:
        self.calls.append(("remove", address))
        if address == "e6.6":
            raise RuntimeError("the fake's bug")
        listing = self._find(address)
        del self.listings[listing["target"]]
        return listing

    def set(self, address: str, settings: list[str]) -> dict[str, Any]:
        self.calls.append(("set", address, settings))
        listing = self._find(address)
        masks = []
        for setting in settings:
            key, _, value = setting.partition("=")
            if key == "read_only":
                listing["read_only"] = value == "on"
            elif key == "mask":
                masks += [value] if value else []
            else:
                raise ControlError(f"unknown setting {key!r}\n(a second line)")
        listing["mask"] = masks
        return copy.deepcopy(listing)

    def reload(self) -> dict[str, Any]:
        self.calls.append(("reload",))
        if self.broken_reload:
            raise ControlError("/etc/aoe-twisted.toml: [[target]] 2: unknown key 'speed'")
        return {"added": ["e1.1"], "removed": [], "changed": ["e1.0"], "unchanged": 3,
                "message": "reloaded /etc/aoe-twisted.toml"}


# -- helpers ------------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    """This process's environment without $AOE_TWISTED_CONTROL."""
    environment = dict(os.environ)
    environment.pop("AOE_TWISTED_CONTROL", None)
    return environment


class _Process(ProcessProtocol):
    """Collects a subprocess's output; ``first`` fires at its first output, ``ended`` at exit."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.first: Deferred[None] = Deferred()
        self.ended: Deferred[tuple[str, str, int | None, int | None]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if not self.first.called:
            self.first.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback((self.out.decode(), self.err.decode(), reason.value.exitCode,
                             reason.value.signal))


def _spawn(argv: list[str], user: list[str] | None = None,
           environment: dict[str, str] | None = None) -> _Process:
    """Run ``python -m aoe_twisted ARGV`` (as ``setpriv USER...`` if given); return its protocol."""
    command = [sys.executable, "-m", "aoe_twisted", *argv]
    if user is not None:
        command = ["setpriv", *user, *command]
    process = _Process()
    reactor.spawnProcess(process, command[0], command,
                         env=_environment() if environment is None else environment, path="/")
    return process


class _RawPeer(Protocol):
    """Sends bytes on connecting; ``done`` fires with what came back when the server hangs up."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.received)


def _box(*pairs: tuple[bytes, bytes]) -> bytes:
    """Encode one AMP box by hand (so that it can be one AMP itself would not send)."""
    out = b""
    for key, value in pairs:
        out += struct.pack(">H", len(key)) + key + struct.pack(">H", len(value)) + value
    return out + b"\0\0"


def _unprivileged_problem() -> str | None:
    """Return why this test cannot run commands as ``nobody``, or ``None`` if it can."""
    if os.geteuid() != 0:
        return "needs root (to run a peer as another user)"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    try:
        grp.getgrnam(NOGROUP)
        import pwd

        pwd.getpwnam(NOBODY)
    except KeyError:
        return f"needs the user {NOBODY} and the group {NOGROUP}"
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups", sys.executable,
         "-c", "import aoe_twisted.control.ctl"],
        capture_output=True, text=True, check=False, cwd="/")
    if result.returncode != 0:
        return f"{NOBODY} cannot import the package with {sys.executable}"
    return None


class _ServerCase(TestCase):
    """A ``ControlServer`` with a ``FakeController`` on a socket in a fresh directory."""

    timeout = 60
    group: str | int | None = None

    def setUp(self) -> None:
        # A short path: a UNIX socket's name is at most 107 bytes.
        self.directory = tempfile.mkdtemp(prefix="aoectl-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "run", "control.sock")
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.controller = FakeController()
        self.server = self.start_server()

    def start_server(self, **kwargs: Any) -> ControlServer:
        server = ControlServer(self.controller, self.path, group=self.group, **kwargs)
        server.startService()
        self.addCleanup(server.stopService)
        return server

    def warnings(self) -> list[str]:
        """The warning lines the control server logged."""
        return [formatEvent(event) for event in self.events
                if event.get("log_namespace") == "aoe_twisted.control.server"
                and event.get("log_level") == LogLevel.warn]

    async def ctl(self, *argv: str) -> str:
        """Run ``ctl --socket PATH ARGV`` in this process; return its standard output."""
        out = io.StringIO()
        args = ctl.build_parser().parse_args(["--socket", self.path, *argv])
        status = await ctl.run(reactor, args, out)
        self.assertEqual(status, 0)
        return out.getvalue()

    async def ctl_fails(self, *argv: str, path: str | None = None) -> str:
        """Run ``ctl`` in this process, expecting ``CtlError``; return its line."""
        args = ctl.build_parser().parse_args(["--socket", path or self.path, *argv])
        try:
            await ctl.run(reactor, args, io.StringIO())
        except ctl.CtlError as e:
            return str(e)
        self.fail(f"ctl {' '.join(argv)} did not fail")

    async def command(self, *argv: str, user: list[str] | None = None
                      ) -> tuple[str, str, int | None]:
        """Run the real ``aoe-twisted ctl --socket PATH ARGV``; return (out, err, status)."""
        out, err, status, _ = await _spawn(["ctl", "--socket", self.path, *argv], user).ended
        return out, err, status

    def assertOneLine(self, text: str, *parts: str) -> None:
        """``text`` is exactly one line, with no traceback, holding every one of ``parts``."""
        self.assertEqual(len(text.splitlines()), 1, text)
        self.assertTrue(text.endswith("\n"), text)
        self.assertNotIn("Traceback", text)
        for part in parts:
            self.assertIn(part, text)


# -- the wire ------------------------------------------------------------------------------


class _SmallChunks(BigJSON):
    CHUNK = 7


class BigJSONTests(SynchronousTestCase):
    """``BigJSON`` carries JSON of any size over AMP's 65,535-byte values."""

    def test_splits(self) -> None:
        """A 200,000-byte text goes in keys NAME.0..NAME.3, none longer than 65,535 bytes."""
        value = "x" * 199_998
        strings: dict[bytes, bytes] = {}
        BigJSON().toBox(b"stats", strings, {"stats": value}, None)
        self.assertEqual(sorted(strings), [b"stats.0", b"stats.1", b"stats.2", b"stats.3"])
        self.assertTrue(all(len(piece) <= 0xFFFF for piece in strings.values()))
        objects: dict[str, Any] = {}
        BigJSON().fromBox(b"stats", strings, objects, None)
        self.assertEqual(objects, {"stats": value})

    @given(st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                                allow_infinity=False)
        | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20))
    def test_round_trip(self, value: Any) -> None:
        """Any JSON value comes back equal, even split inside a UTF-8 character."""
        strings: dict[bytes, bytes] = {}
        _SmallChunks().toBox(b"v", strings, {"v": value}, None)
        self.assertTrue(all(len(piece) <= 7 for piece in strings.values()))
        objects: dict[str, Any] = {}
        _SmallChunks().fromBox(b"v", strings, objects, None)
        self.assertEqual(objects["v"], value)

    def test_through_amp(self) -> None:
        """A box with a multi-megabyte ``BigJSON`` serialises and parses back as AMP."""
        value = {"targets": [{"target": f"e{n}.0", "pad": "y" * 3000} for n in range(1000)]}
        strings = amp.AmpBox()
        BigJSON().toBox(b"stats", strings, {"stats": value}, None)
        data = strings.serialize()
        self.assertGreater(len(data), 3_000_000)
        (box,) = amp._ParserHelper.parse(io.BytesIO(data))
        objects: dict[str, Any] = {}
        BigJSON().fromBox(b"stats", box, objects, None)
        self.assertEqual(objects["stats"], value)

    def test_missing(self) -> None:
        """A box without the first key is an error, not an empty value."""
        self.assertRaises(KeyError, BigJSON().fromBox, b"stats", {}, {}, None)

    def test_not_json(self) -> None:
        """NaN is not JSON: refused when sending, not sent as something ctl cannot read."""
        self.assertRaises(ValueError, BigJSON().toBox, b"v", {}, {"v": float("nan")}, None)


class FakeTests(SynchronousTestCase):
    """The fake controller provides the interface the real one must."""

    def test_interface(self) -> None:
        """``verifyObject`` accepts it (``ControlServer`` checks the same)."""
        self.assertTrue(verifyObject(IController, FakeController()))


# -- the command line ------------------------------------------------------------------------


class ParserTests(SynchronousTestCase):
    """``aoe-twisted ctl``'s command line, without a server."""

    def test_listed(self) -> None:
        """``aoe-twisted --help`` lists ``ctl``."""
        self.assertRegex(cli.build_parser().format_help(), r"\n\s+ctl\s+control a running")

    def test_socket(self) -> None:
        """``--socket`` goes before or after the command; else $AOE_TWISTED_CONTROL, else /run."""
        parser = ctl.build_parser()
        self.assertEqual(parser.parse_args(["--socket", "/a", "list"]).socket, "/a")
        self.assertEqual(parser.parse_args(["list", "--socket", "/b"]).socket, "/b")
        self.patch(os, "environ", {})
        self.assertEqual(ctl.build_parser().parse_args(["list"]).socket,
                         "/run/aoe-twisted/control.sock")
        self.patch(os, "environ", {"AOE_TWISTED_CONTROL": "/c"})
        self.assertEqual(ctl.build_parser().parse_args(["list"]).socket, "/c")

    def test_arguments(self) -> None:
        """Targets, addresses and settings are passed on as written."""
        parser = ctl.build_parser()
        args = parser.parse_args(["add", "1.0=file:/x.img,read_only=on", "mask=", "sync=on"])
        self.assertEqual((args.target, args.settings),
                         ("1.0=file:/x.img,read_only=on", ["mask=", "sync=on"]))
        args = parser.parse_args(["set", "e1.0", "read_only=on", "--json"])
        self.assertEqual((args.address, args.settings, args.json),
                         ("e1.0", ["read_only=on"], True))

    def test_usage_errors(self) -> None:
        """A bad command line is one line on standard error and status 2."""
        for argv in (["add", "1.0"], ["add", "x=file:a"], ["remove", "e1"], ["set", "e1.0"],
                     ["set", "e1.0", "=on"], ["stats", "--interval", "0"], ["bogus"], []):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            with self.assertRaises(SystemExit) as caught:
                ctl.main(argv)
            self.assertEqual(caught.exception.code, 2, argv)
            self.assertEqual(len(err.getvalue().splitlines()), 1, (argv, err.getvalue()))
            self.assertTrue(err.getvalue().startswith("aoe-twisted ctl"), err.getvalue())


class FormatTests(SynchronousTestCase):
    """What ``ctl`` prints, from dicts (the server is not needed)."""

    def test_rates(self) -> None:
        """Rates are counter differences over the snapshots' time difference."""
        report = ctl.rates(FakeController().stats(), _step_stats(3), elapsed=9.0)
        self.assertEqual(report["seconds"], 2.0)
        (row,) = report["targets"]
        self.assertAlmostEqual(row.pop("service_ms"), 0.1)
        self.assertEqual(row, {
            "target": "e1.0", "in_flight": 3, "reads_per_s": 100.0, "writes_per_s": 10.0,
            "read_kib_per_s": 400.0, "write_kib_per_s": 40.0, "errors_per_s": 1.0})
        self.assertEqual(report["interfaces"][0]["received_per_s"], 1000.0)

    def test_rates_new_target(self) -> None:
        """A target absent from the first snapshot has no rates yet, not a huge one."""
        later = _step_stats(2)
        later["targets"].append(_target_stats("e2.0", 2))
        rows = {row["target"]: row for row in ctl.rates(_step_stats(1), later)["targets"]}
        self.assertEqual(rows["e1.0"]["reads_per_s"], 100.0)
        self.assertIsNone(rows["e2.0"]["reads_per_s"])
        self.assertIn("e2.0", ctl.format_rates(ctl.rates(_step_stats(1), later)))

    def test_ago(self) -> None:
        """Initiators were last seen a readable time ago."""
        text = ctl.format_initiators(
            [{"mac": "52:54:00:00:00:01", "targets": ["e1.0", "e1.1"], "frames": 7,
              "last_seen": 997.0},
             {"mac": "52:54:00:00:00:02", "targets": [], "frames": 1, "last_seen": 1000 - 600},
             {"mac": "52:54:00:00:00:03", "targets": [], "frames": 1, "last_seen": -1e6}],
            1000.0)
        lines = text.splitlines()
        self.assertEqual(lines[0].split(), ["INITIATOR", "TARGETS", "FRAMES", "LAST", "SEEN"])
        self.assertRegex(lines[1], r"\s7\s+3 s ago$")
        self.assertIn("e1.0,e1.1", lines[1])
        self.assertTrue(lines[2].endswith("10 min ago"), lines[2])
        self.assertTrue(lines[3].endswith("12 d ago"), lines[3])

    def test_list_notes(self) -> None:
        """Slices, duplicates and other paths show in the list's notes."""
        slice_ = {**_listing("e1.0"), "offset": 4096, "length": 8192, "read_only": True,
                  "sync": True}
        duplicate = {**_listing("e1.1"), "state": "duplicate",
                     "duplicate_of": "02:00:00:00:00:09"}
        paths = {**_listing("e1.2"), "paths": ["02:00:00:00:00:07", "02:00:00:00:00:08"],
                 "mask": ["52:54:00:00:00:01", "52:54:00:00:00:02"]}
        lines = ctl.format_list([slice_, duplicate, paths]).splitlines()
        self.assertIn("ro,sync", lines[1])
        self.assertIn("slice from 4096 length 8192", lines[1])
        self.assertIn("duplicate of 02:00:00:00:00:09", lines[2])
        self.assertIn("paths 02:00:00:00:00:07,02:00:00:00:00:08", lines[3])
        self.assertRegex(lines[3], r"eth0\s+2\s")


def _step_stats(step: int) -> dict[str, Any]:
    controller = FakeController()
    controller.step = step - 1
    return controller.stats()


# -- against a server -------------------------------------------------------------------------


class CommandTests(_ServerCase):
    """Every command, through the real socket."""

    async def test_list(self) -> None:
        """``list`` prints a table; ``list --json`` the server's dicts (the real command)."""
        out, err, status = await self.command("list")
        self.assertEqual((err, status), ("", 0))
        header, row = out.splitlines()
        self.assertEqual(header.split(), ["TARGET", "STATE", "SIZE", "MODE", "BACKEND",
                                          "INTERFACES", "MASK", "NOTES"])
        self.assertEqual(row.split(), ["e1.0", "serving", "1.0", "MiB", "rw", "file:/srv/a.img",
                                       "eth0", "-"])
        out, err, status = await self.command("list", "--json")
        self.assertEqual((err, status), ("", 0))
        self.assertEqual(json.loads(out), self.controller.targets())
        self.assertEqual(len(out.splitlines()), 1)

    async def test_stats(self) -> None:
        """``stats`` prints a row per target and per interface; ``--json`` the snapshot."""
        lines = (await self.ctl("stats")).splitlines()
        self.assertEqual(lines[0].split()[:9], ["TARGET", "READS", "WRITES", "IDENT", "FLUSH",
                                                "ATA", "CONFIG", "MASK", "RESERVE"])
        self.assertEqual(lines[1].split(), ["e1.0", "100", "10", "1", "0", "0", "2", "0", "0",
                                            "400.0", "KiB", "40.0", "KiB", "3", "1", "0.100",
                                            "backend_ENOSPC=1"])
        self.assertEqual(lines[2], "")
        self.assertEqual(lines[3].split(), ["INTERFACE", "MAC", "MTU", "RECEIVED", "SENT",
                                            "IGNORED", "DROPPED", "MALFORMED", "STALE"])
        self.assertEqual(lines[4].split(), ["eth0", "02:00:00:00:00:01", "1500", "1000", "990",
                                            "0", "0", "0", "0"])
        snapshot = json.loads(await self.ctl("stats", "--json"))
        self.assertEqual(snapshot, _step_stats(2))

    async def test_initiators(self) -> None:
        """``initiators`` shows MAC, targets, frames and when, relative to the snapshot."""
        lines = (await self.ctl("initiators")).splitlines()
        self.assertEqual(lines[1].split(), ["52:54:00:12:34:56", "e1.0", "5", "3", "s", "ago"])
        (initiator,) = json.loads(await self.ctl("initiators", "--json"))
        self.assertEqual(initiator["mac"], "52:54:00:12:34:56")
        self.assertEqual(initiator["last_seen"], 1765000000.0 + 2 - 3)

    async def test_add_set_remove(self) -> None:
        """``add``, ``set`` and ``remove`` pass their arguments on and show the result."""
        out = await self.ctl("add", "1.1=memory:1M,read_only=on", "mask=52:54:00:00:00:01")
        self.assertEqual(out, "added e1.1 = memory:1M (1.0 MiB; rw; serving)\n")
        self.assertEqual(self.controller.calls[-1],
                         ("add", "1.1=memory:1M,read_only=on", ["mask=52:54:00:00:00:01"]))
        listing = json.loads(await self.ctl("set", "e1.1", "read_only=on", "mask=aa:bb:cc:dd:ee:ff",
                                            "--json"))
        self.assertEqual((listing["read_only"], listing["mask"]), (True, ["aa:bb:cc:dd:ee:ff"]))
        self.assertEqual(self.controller.calls[-1],
                         ("set", "e1.1", ["read_only=on", "mask=aa:bb:cc:dd:ee:ff"]))
        out = await self.ctl("set", "1.1", "read_only=off", "mask=")
        self.assertEqual(out, "changed e1.1 = memory:1M (1.0 MiB; rw; serving)\n")
        out = await self.ctl("remove", "e1.1")
        self.assertEqual(out, "removed e1.1 = memory:1M (1.0 MiB; rw; serving)\n")
        self.assertEqual(sorted(self.controller.listings), ["e1.0"])

    async def test_reload(self) -> None:
        """``reload`` prints the server's line and what changed; ``--json`` its dict."""
        out = await self.ctl("reload")
        self.assertEqual(out, "reloaded /etc/aoe-twisted.toml\nadded: e1.1\nchanged: e1.0\n"
                         "unchanged: 3\n")
        self.assertEqual(json.loads(await self.ctl("reload", "--json"))["unchanged"], 3)

    async def test_control_error(self) -> None:
        """``ControlError`` is one line on standard error and status 1 (the real command)."""
        self.controller.broken_reload = True
        cases = [
            (["remove", "e9.9"], "aoe-twisted ctl: no target e9.9 is served\n"),
            (["add", "1.0=memory:1M"], "aoe-twisted ctl: e1.0 is already served\n"),
            (["set", "e1.0", "speed=9"],
             "aoe-twisted ctl: unknown setting 'speed'; (a second line)\n"),
            (["reload", "--json"], "aoe-twisted ctl: /etc/aoe-twisted.toml: [[target]] 2: "
             "unknown key 'speed'\n"),
        ]
        for argv, line in cases:
            out, err, status = await self.command(*argv)
            self.assertEqual((out, err, status), ("", line, 1), argv)

    async def test_internal_error(self) -> None:
        """A controller's bug is logged there with its traceback; ctl prints one line."""
        line = await self.ctl_fails("remove", "e6.6")
        self.assertEqual(line, "remove failed in the server: RuntimeError: the fake's bug "
                         "(see its log)")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("e1.0", await self.ctl("list"))

    async def test_big_response(self) -> None:
        """Stats of 1,000 targets, several megabytes of JSON, arrive whole."""
        stats = _step_stats(1)
        stats["targets"] = [
            {**_target_stats(f"e{n // 10}.{n % 10}", 7),
             "initiators": [{"mac": f"52:54:00:00:{i:02x}:{n % 256:02x}", "frames": n * i,
                             "last_seen": 1765000000.5} for i in range(30)]}
            for n in range(1000)]
        self.controller.big_stats = stats
        out = await self.ctl("stats", "--json")
        self.assertGreater(len(out), 2_500_000)
        self.assertEqual(json.loads(out), stats)
        table = await self.ctl("stats")
        self.assertEqual(len(table.splitlines()), 1 + 1000 + 1 + 2)

    async def test_watch(self) -> None:
        """``stats --watch`` prints a report per interval: rates per target and interface."""
        out = await self.ctl("stats", "--watch", "--interval", "0.01", "--count", "3")
        rows = [line.split() for line in out.splitlines() if line.startswith("e1.0")]
        self.assertEqual(rows, [["e1.0", "100.0", "10.0", "400.0", "40.0", "3", "0.100",
                                 "1.0"]] * 3)
        interfaces = [line.split() for line in out.splitlines() if line.startswith("eth0")]
        self.assertEqual(
            interfaces, [["eth0", "1000.0", "990.0", "0.0", "0.0", "0.0", "0.0"]] * 3
        )
        # Four snapshots: the first is the base of the first report's rates.
        self.assertEqual(self.controller.calls.count(("stats",)), 4)
        reports = await self.ctl("stats", "--watch", "--json", "--interval", "0.01",
                                 "--count", "2")
        lines = [json.loads(line) for line in reports.splitlines()]
        self.assertEqual([report["targets"][0]["reads_per_s"] for report in lines], [100.0] * 2)

    async def test_watch_interrupted(self) -> None:
        """``stats --watch`` runs until Ctrl-C, and then exits 0 without a word."""
        process = _spawn(["ctl", "--socket", self.path, "stats", "--watch", "--interval", "0.05"])
        await process.first
        while process.out.count(b"r/s") < 2:
            await _sleep(0.05)
        process.transport.signalProcess("INT")
        out, err, status, _ = await process.ended
        self.assertEqual((err, status), ("", 0))
        self.assertGreaterEqual(out.count("\ne1.0 "), 1)

    async def test_interrupted(self) -> None:
        """Ctrl-C while a command waits for the server: one line, status 130."""
        self.controller.pending = Deferred()
        process = _spawn(["ctl", "--socket", self.path, "stats"])
        while ("stats",) not in self.controller.calls:
            await _sleep(0.05)
        process.transport.signalProcess(signal.SIGINT)
        out, err, status, _ = await process.ended
        self.assertEqual((out, err, status), ("", "aoe-twisted ctl: interrupted\n", 130))

    async def test_server_goes_away(self) -> None:
        """A server that stops while ctl waits: one line, status 1."""
        self.controller.pending = Deferred()
        waiting = Deferred.fromCoroutine(self.ctl_fails("stats"))
        while ("stats",) not in self.controller.calls:
            await _sleep(0.01)
        await self.server.stopService()
        self.assertEqual(await waiting, f"the server at {self.path} closed the connection")


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


class SocketTests(_ServerCase):
    """The socket file: where, which mode, and what is there before."""

    def test_mode(self) -> None:
        """The socket is mode 0600, owned by this user, in a new 0755 directory."""
        info = os.stat(self.path)
        self.assertTrue(stat.S_ISSOCK(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)
        self.assertEqual((info.st_uid, info.st_gid), (os.geteuid(), os.getegid()))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o755)

    async def test_group(self) -> None:
        """With a group, the socket is mode 0660 and belongs to that group."""
        group = os.getegid()
        if os.geteuid() == 0 and NOGROUP in {entry.gr_name for entry in grp.getgrall()}:
            group = grp.getgrnam(NOGROUP).gr_gid  # another group than this process's
        await self.server.stopService()
        self.server = ControlServer(self.controller, self.path, group=grp.getgrgid(group).gr_name)
        self.server.startService()
        self.addCleanup(self.server.stopService)
        info = os.stat(self.path)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o660, group))
        self.assertIn("e1.0", await self.ctl("list"))

    def test_unknown_group(self) -> None:
        """A group that does not exist is one line."""
        error = self.assertRaises(ControlSocketError, ControlServer, self.controller,
                                  self.path + "2", group="no-such-group-here")
        self.assertEqual(str(error), "control socket: no such group: no-such-group-here")

    async def test_stop_removes(self) -> None:
        """Stopping removes the socket file; ctl then says what is wrong."""
        await self.server.stopService()
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(await self.ctl_fails("list"),
                         f"cannot connect to {self.path}: No such file or directory "
                         "(is twistd aoe running with a control socket?)")

    async def test_no_server(self) -> None:
        """The real command without a server: one line, status 1, no traceback."""
        await self.server.stopService()
        out, err, status = await self.command("list")
        self.assertEqual((out, status), ("", 1))
        self.assertOneLine(err, f"aoe-twisted ctl: cannot connect to {self.path}: No such file "
                           "or directory (is twistd aoe running with a control socket?)")

    async def test_stale(self) -> None:
        """A socket file nobody listens on (a crashed server's) is replaced."""
        await self.server.stopService()
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        self.assertEqual(await self.ctl_fails("list"),
                         f"cannot connect to {self.path}: Connection refused "
                         "(is twistd aoe running with a control socket?)")
        self.server = self.start_server()
        self.assertIn("e1.0", await self.ctl("list"))

    def test_live(self) -> None:
        """A socket another server listens on is left alone: one line."""
        error = self.assertRaises(ControlSocketError, ControlServer(self.controller,
                                                                    self.path).startService)
        self.assertEqual(str(error), f"another server is already listening on {self.path}")
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))

    async def test_bad_paths(self) -> None:
        """ctl names what is wrong with a path that is no socket, or too long to be one."""
        path = os.path.join(self.directory, "file")
        with open(path, "w"):
            pass
        self.assertEqual(await self.ctl_fails("list", path=path),
                         f"cannot connect to {path}: not a socket")
        path = "/tmp/" + "x" * 100 + "/control.sock"
        self.assertEqual(await self.ctl_fails("list", path=path),
                         f"cannot connect to {path}: the path is longer than a UNIX socket's "
                         "107 bytes")

    def test_not_a_socket(self) -> None:
        """A path that is some other file is not removed: one line."""
        path = os.path.join(self.directory, "file")
        with open(path, "w") as f:
            f.write("keep me")
        error = self.assertRaises(ControlSocketError,
                                  ControlServer(self.controller, path).startService)
        self.assertEqual(str(error), f"{path} exists and is not a socket "
                         "(remove it or choose another path)")
        with open(path) as f:
            self.assertEqual(f.read(), "keep me")

    async def test_replaced_not_removed(self) -> None:
        """Stopping does not remove a socket file that is no longer this server's."""
        os.unlink(self.path)
        other = socket.socket(socket.AF_UNIX)
        other.bind(self.path)
        self.addCleanup(other.close)
        await self.server.stopService()
        self.assertTrue(os.path.exists(self.path))


class GarbageTests(_ServerCase):
    """Something other than ctl on the socket loses its own connection and nothing else."""

    async def send(self, data: bytes) -> bytes:
        peer = _RawPeer(data)
        await connectProtocol(UNIXClientEndpoint(reactor, self.path), peer)
        return await peer.done

    async def test_garbage(self) -> None:
        """Each kind of garbage: that connection is closed, one line logged, the next ctl works."""
        cases = [
            (b"GET / HTTP/1.0\r\n\r\n", "a 18245-byte key"),
            (_box((b"foo", b"bar")), "a box that is neither a command nor an answer"),
            (_box((b"_answer", b"99"), (b"x", b"y")), "KeyError"),
            (_box((b"_command", b"Add"), (b"_ask", b"1")), "its Add command cannot be read"),
            (_box((b"_command", b"Add")), "its Add command cannot be read"),
            (bytes(range(256)) * 64, "not AMP"),
        ]
        for data, logged in cases:
            before = len(self.warnings())
            await self.send(data)
            new = self.warnings()[before:]
            self.assertEqual(len(new), 1, (data[:40], new))
            self.assertIn(logged, new[0])
            self.assertIn(f"uid {os.geteuid()} (pid ", new[0])
            self.assertIn("e1.0", await self.ctl("list"))
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_bad_request_answered(self) -> None:
        """A command whose arguments cannot be read is answered BAD_REQUEST, then hung up on."""
        answer = await self.send(_box((b"_command", b"Remove"), (b"_ask", b"7")))
        (box,) = amp._ParserHelper.parse(io.BytesIO(answer))
        self.assertEqual((box[b"_error"], box[b"_error_code"]), (b"7", b"BAD_REQUEST"))
        self.assertEqual(box[b"_error_description"], b"bad Remove request: KeyError: b'address'")

    async def test_refused_silent(self) -> None:
        """A refused peer that sends nothing is cut off after ``REFUSED_GRACE`` seconds."""
        from aoe_twisted.control import server as server_module

        self.patch(server_module, "REFUSED_GRACE", 0.2)
        self.patch(
            self.server, "refusal", lambda pid, uid, gid, groups=None: "permission denied: by test"
        )
        started = reactor.seconds()
        self.assertEqual(await self.send(b""), b"")
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        self.assertEqual(await self.ctl_fails("list"), "permission denied: by test")
        self.assertEqual(self.controller.calls, [])
        self.assertEqual(len(self.warnings()), 2)

    async def test_unknown_command(self) -> None:
        """An unknown command, or StartTLS, is answered UNHANDLED (AMP's own answer)."""
        for name in (b"Frobnicate", b"StartTLS"):
            answer = await self.send(_box((b"_command", name), (b"_ask", b"1"))
                                     + b"GET")
            (box, *_) = amp._ParserHelper.parse(io.BytesIO(answer))
            self.assertEqual(box[b"_error_code"], b"UNHANDLED")


class PeerTests(_ServerCase):
    """Only root, the server's user and (with a group) its members may send commands."""

    def setUp(self) -> None:
        problem = _unprivileged_problem()
        if problem is not None:
            raise SkipTest(problem)
        super().setUp()
        os.chmod(self.directory, 0o755)

    async def test_refused(self) -> None:
        """Another user, even through a mode-0666 socket: one line each side, status 1."""
        os.chmod(self.path, 0o666)
        out, err, status = await self.command(
            "list", user=[f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups"])
        uid = _uid(NOBODY)
        self.assertEqual((out, status), ("", 1))
        self.assertEqual(err, f"aoe-twisted ctl: permission denied: uid {uid} is not allowed "
                         f"on {self.path}\n")
        (warning,) = self.warnings()
        self.assertRegex(warning, rf"refused uid {uid} \(pid \d+\), which is not allowed")
        self.assertEqual(self.controller.calls, [])

    async def test_owner(self) -> None:
        """
        With ``owner`` (the ``twistd --uid`` user), root makes the socket and its directory
        for that user, who is then let in.
        """
        await self.server.stopService()
        shutil.rmtree(os.path.dirname(self.path))
        nobody = (_uid(NOBODY), grp.getgrnam(NOGROUP).gr_gid)
        self.server = self.start_server(owner=nobody)
        for path in (self.path, os.path.dirname(self.path)):
            info = os.stat(path)
            self.assertEqual((info.st_uid, info.st_gid), nobody, path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode),
                         0o600 if self.group is None else 0o660)
        out, err, status = await self.command(
            "list", "--json", user=[f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups"])
        self.assertEqual((err, status), ("", 0))
        self.assertEqual(json.loads(out)[0]["target"], "e1.0")

    async def test_mode_refuses(self) -> None:
        """Through the 0600 socket another user cannot even connect: one line, status 1."""
        out, err, status = await self.command(
            "stats", user=[f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups"])
        self.assertEqual((out, status), ("", 1))
        self.assertOneLine(err, f"aoe-twisted ctl: permission denied: cannot connect to "
                           f"{self.path}: Permission denied")


class GroupPeerTests(PeerTests):
    """With ``group``, its members are let in: by their group or a supplementary one."""

    group = NOGROUP

    async def test_members(self) -> None:
        """A peer whose group or supplementary groups hold the group is served."""
        other = grp.getgrgid(0).gr_name
        for user in ([f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups"],
                     [f"--reuid={NOBODY}", f"--regid={other}", f"--groups={NOGROUP}"]):
            out, err, status = await self.command("list", "--json", user=user)
            self.assertEqual((err, status), ("", 0), user)
            self.assertEqual(json.loads(out)[0]["target"], "e1.0")
        self.assertEqual(self.warnings(), [])

    async def test_refused(self) -> None:
        """A peer outside the group is refused by its credentials (the socket made 0666)."""
        os.chmod(self.path, 0o666)
        other = grp.getgrgid(0).gr_name
        # gid 0 is not root: only uid 0 is let in whatever its groups.
        out, err, status = await self.command(
            "list", user=[f"--reuid={NOBODY}", f"--regid={other}", "--clear-groups"])
        self.assertEqual((out, status), ("", 1))
        self.assertOneLine(err, f"permission denied: uid {_uid(NOBODY)} is not allowed")
        self.assertEqual(len(self.warnings()), 1)

    async def test_mode_refuses(self) -> None:
        """Through the 0660 socket a user outside the group cannot connect."""
        out, err, status = await self.command(
            "stats", user=[f"--reuid={NOBODY}", f"--regid={grp.getgrgid(0).gr_name}",
                           "--clear-groups"])
        self.assertEqual((out, status), ("", 1))
        self.assertOneLine(err, "permission denied: cannot connect to")


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid
