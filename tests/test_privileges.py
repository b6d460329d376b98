# -*- test-case-name: tests.test_privileges -*-
"""
Least privilege: the server needs ``CAP_NET_RAW`` and its own files, nothing more.

Three ways to run it without root are checked:

- ``twistd --uid nobody --gid nogroup``: started as root, the server opens its
  raw socket, backends and state files, then ``twistd`` drops to ``nobody``
  (no capability left) and it goes on serving reads, writes and state changes.
- Never root at all: ``nobody`` with ``CAP_NET_RAW`` as its only (ambient)
  capability, as the systemd unit runs it, started here with ``setpriv``.
- The systemd unit shipped in ``docs/systemd/`` passes ``systemd-analyze verify``
  and keeps its exposure score low (skipped without ``systemd-analyze``).

The first two need root and network namespaces (``tests.netns.require``), and
a package ``nobody`` can import: a checkout or virtual environment under a
mode-0700 home directory skips them, saying so (even under
``AOE_TWISTED_REQUIRE_INTEROP=1``: that is where the code lives, not a
missing tool).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from aoe_twisted.core.wire import SECTOR_SIZE, ATACmdStatus, ConfigCommand
from aoe_twisted.initiator.cli import twistd_argv
from aoe_twisted.statefile import FileACLStore

_ROOT = Path(__file__).resolve().parent.parent
UNIT = _ROOT / "docs" / "systemd" / "aoe-twisted@.service"

#: How to run twistd with this interpreter (``python -m twisted.scripts.twistd`` runs nothing).
TWISTD = twistd_argv()
USER, GROUP = "nobody", "nogroup"
CAP_NET_RAW = 13

Gen = defer.Generator[defer.Deferred[Any], Any, None]


def _ids() -> tuple[int, int] | None:
    """Return the uid of ``nobody`` and the gid of ``nogroup``, or ``None`` if either is missing."""
    import grp
    import pwd

    try:
        return pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return None


def _status(pid: int) -> dict[str, str]:
    """Return ``/proc/PID/status`` as a dict of field to value text."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _unprivileged_import_problem() -> str | None:
    """Return why ``nobody`` cannot run this interpreter and import the package, or ``None``."""
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    if _ids() is None:
        return f"needs the user {USER} and the group {GROUP}"
    result = subprocess.run(
        ["setpriv", f"--reuid={USER}", f"--regid={GROUP}", "--clear-groups", sys.executable,
         "-c", "import aoe_twisted.tap, aoe_twisted.server, twisted.scripts.twistd"],
        capture_output=True, text=True, check=False, cwd="/",
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"{USER} cannot import the package with {sys.executable} ({last}); "
            "the interpreter or checkout is probably under a mode-0700 directory such as /root"
        )
    return None


class _ServerCase(TestCase):
    """Run ``twistd aoe`` in a namespace with a file disk and a state dir; talk to it."""

    timeout = 90

    def setUp(self) -> None:
        from tests.netns import require

        require(self)
        problem = _unprivileged_import_problem()
        if problem is not None:
            # A property of where the code lives, not a missing tool: skip even in CI.
            raise SkipTest(problem)
        ids = _ids()
        assert ids is not None
        self.uid, self.gid = ids

    def prepare(self, owner: tuple[int, int] | None) -> None:
        """
        Make a 128-sector disk image and an empty state dir owned by ``nobody``.

        The image belongs to ``owner`` (root with mode 0600 if ``None``: only a
        descriptor opened before the privileges were dropped can use it).
        """
        from tests.netns import VethPair
        from tests.peer import Peer

        self.pair = VethPair.create(self)
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        # trial's mktemp() parent is a mode-0700 mkdtemp() directory: let nobody through.
        self.work.parent.chmod(0o711)
        self.work.chmod(0o755)
        self.image = self.work / "disk.img"
        self.image.write_bytes(bytes(128 * SECTOR_SIZE))
        self.image.chmod(0o600)
        if owner is not None:
            os.chown(self.image, *owner)
        self.state = self.work / "state"
        self.state.mkdir(mode=0o700)
        os.chown(self.state, self.uid, self.gid)
        self.peer = Peer(self.pair.client_if, self.pair.client_ns)
        self.peer.start()
        self.addCleanup(self.peer.stop)

    def start(
        self, wrapper: list[str], twistd_options: list[str], aoe_options: tuple[str, ...] = ()
    ) -> subprocess.Popen[str]:
        """Start ``[ip netns exec NS] WRAPPER twistd -n OPTIONS aoe ... AOE_OPTIONS`` (e4.4)."""
        from tests.test_statefile import _kill

        argv = [
            "ip", "netns", "exec", self.pair.server_ns, *wrapper, *TWISTD,
            "-n", "--pidfile=", *twistd_options,
            "aoe", "--iface", self.pair.server_if, "--backend", f"file:{self.image}",
            "--shelf", "4", "--slot", "4", "--state-dir", str(self.state), *aoe_options,
        ]
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(self.work)
        )
        self.addCleanup(_kill, proc)
        return proc

    @defer.inlineCallbacks
    def serve_and_check(self, proc: subprocess.Popen[str]) -> Gen:
        """Discover e4.4, write, read back and set the config string; then stop it."""
        from tests.test_statefile import _discover, _exited

        server = yield _discover(self, self.peer, proc, 4, 4)
        self.server = server
        data = bytes(range(256)) * 2
        replies = yield self.peer.write(server, 4, 4, 9, data)
        self.assertEqual(replies[0].arg.cmd_status, ATACmdStatus.READY_STATUS, proc)
        replies = yield self.peer.read(server, 4, 4, 9)
        self.assertEqual(replies[0].arg.data[:SECTOR_SIZE], data)
        # A state change made after the drop is written, as the unprivileged user.
        replies = yield self.peer.config(server, 4, 4, ConfigCommand.FORCE_SET, b"unprivileged")
        self.assertEqual(len(replies), 1, "the state write as the service user failed")
        self.assertEqual(FileACLStore.open(self.state, 4, 4).config_string, b"unprivileged")
        state_file = self.state / "e4.4.json"
        self.assertEqual(state_file.stat().st_uid, self.uid)
        self.status = _status(proc.pid)

        proc.send_signal(signal.SIGTERM)
        yield _exited(self, proc)
        out = proc.communicate()[0]
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), out)
        self.assertNotIn("Traceback", out)
        self.assertEqual(self.image.read_bytes()[9 * SECTOR_SIZE : 10 * SECTOR_SIZE], data)

    def assertRunsAs(self, status: dict[str, str], capabilities: int) -> None:
        """Check real, effective, saved and fs uid/gid are nobody's and the effective caps."""
        self.assertEqual(status["Uid"].split(), [str(self.uid)] * 4, status)
        self.assertEqual(status["Gid"].split(), [str(self.gid)] * 4, status)
        self.assertEqual(int(status["CapEff"], 16), capabilities, status)
        self.assertEqual(int(status["CapPrm"], 16), capabilities, status)


class DropPrivilegesTests(_ServerCase):
    """``twistd --uid nobody --gid nogroup``: open everything as root, then serve as nobody."""

    @defer.inlineCallbacks
    def test_serves_after_drop(self) -> Gen:
        """
        The server keeps serving reads, writes and state changes after the
        drop, with no capability left, from an image only root may open.
        """
        self.prepare(owner=None)
        proc = self.start([], ["--uid", USER, "--gid", GROUP])
        yield self.serve_and_check(proc)
        self.assertRunsAs(self.status, 0)


    @defer.inlineCallbacks
    def test_links_after_drop(self) -> Gen:
        """
        Running as nobody with no capability, the server serves again after
        its link goes down and up, and after its interface is removed and
        created again (binding needs no privilege): the process never exits.
        """
        from tests.netns import run
        from tests.peer import Peer
        from tests.test_statefile import _discover

        self.prepare(owner=None)
        proc = self.start([], ["--uid", USER, "--gid", GROUP])
        server = yield _discover(self, self.peer, proc, 4, 4)
        ns, interface = self.pair.server_ns, self.pair.server_if
        run("ip", "-n", ns, "link", "set", "dev", interface, "down")
        run("ip", "-n", ns, "link", "set", "dev", interface, "up")
        self.pair.wait_until_up()
        self.assertEqual((yield _discover(self, self.peer, proc, 4, 4)), server)
        run("ip", "-n", ns, "link", "delete", interface)
        run(
            "ip", "link", "add", interface, "netns", ns, "type", "veth", "peer",
            "name", self.pair.client_if, "netns", self.pair.client_ns,
        )  # fmt: skip
        for namespace, name in self.pair.ends():
            run("ip", "-n", namespace, "link", "set", "dev", name, "up")
        self.pair.wait_until_up()
        peer = Peer(self.pair.client_if, self.pair.client_ns)
        peer.start()
        self.addCleanup(peer.stop)
        server = yield _discover(self, peer, proc, 4, 4)
        data = b"\x7e" * SECTOR_SIZE
        replies = yield peer.write(server, 4, 4, 11, data)
        self.assertEqual(replies[0].arg.cmd_status, ATACmdStatus.READY_STATUS)
        self.assertIsNone(proc.poll())
        self.assertRunsAs(_status(proc.pid), 0)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
        self.assertIn("link aoesrv0: removed", out)
        self.assertIn("link aoesrv0: up", out)
        self.assertNotIn("Traceback", out)
        self.assertEqual(self.image.read_bytes()[11 * SECTOR_SIZE : 12 * SECTOR_SIZE], data)

    @defer.inlineCallbacks
    def test_workers_after_drop(self) -> Gen:
        """
        With ``--workers 2`` the worker process is started after the drop: it
        runs as nobody with no capability, serves its initiators from the
        socket the main process opened, and writes the state file as nobody.
        """
        result = subprocess.run(
            ["setpriv", f"--reuid={USER}", f"--regid={GROUP}", "--clear-groups", sys.executable,
             "-c", "import os, sys; sys.exit(not os.access(sys.executable, os.X_OK))"],
            check=False, cwd="/",
        )  # fmt: skip
        if result.returncode != 0:
            # Where the interpreter lives, not a missing tool: skip even in CI.
            raise SkipTest(f"{USER} may not execute {sys.executable} to start a worker")
        self.prepare(owner=None)
        proc = self.start([], ["--uid", USER, "--gid", GROUP], ("--workers", "2"))
        yield self.serve_and_check_worker(proc)

    @defer.inlineCallbacks
    def serve_and_check_worker(self, proc: subprocess.Popen[str]) -> Gen:
        """Serve through worker 1 (a forged initiator MAC), check how it runs, then stop."""
        from tests.test_statefile import _discover, _exited
        from tests.test_twistd import child_pids
        from tests.test_workers import _mac_for

        server = yield _discover(self, self.peer, proc, 4, 4)
        src = _mac_for(1, 4, 4)
        data = bytes(range(256)) * 2
        replies = yield self.peer.write(server, 4, 4, 9, data, src=src)
        self.assertEqual(replies[0].arg.cmd_status, ATACmdStatus.READY_STATUS)
        replies = yield self.peer.read(server, 4, 4, 9)
        self.assertEqual(replies[0].arg.data[:SECTOR_SIZE], data)
        replies = yield self.peer.reserve(server, 4, 4, 2, [src], src=src)
        self.assertEqual(len(replies), 1, "the state write by the unprivileged worker failed")
        self.assertEqual(FileACLStore.open(self.state, 4, 4).reserve_list, (src,))
        [worker] = child_pids(proc.pid)
        self.assertRunsAs(_status(worker), 0)
        self.assertRunsAs(_status(proc.pid), 0)
        proc.send_signal(signal.SIGTERM)
        yield _exited(self, proc)
        out = proc.communicate()[0]
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), out)
        self.assertNotIn("Traceback", out)


class OnlyNetRawTests(_ServerCase):
    """Never root: ``nobody`` with ``CAP_NET_RAW`` alone, as the systemd unit runs it."""

    @defer.inlineCallbacks
    def test_serves_with_only_cap_net_raw(self) -> Gen:
        """With CAP_NET_RAW as its only (ambient) capability the server serves as usual."""
        self.prepare(owner=(self.uid, self.gid))
        wrapper = [
            "setpriv", f"--reuid={USER}", f"--regid={GROUP}", "--clear-groups",
            "--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw",
            "--bounding-set=-all,+net_raw", "--no-new-privs",
        ]
        proc = self.start(wrapper, [])
        yield self.serve_and_check(proc)
        self.assertRunsAs(self.status, 1 << CAP_NET_RAW)
        self.assertEqual(int(self.status["CapBnd"], 16), 1 << CAP_NET_RAW)
        self.assertEqual(self.status["NoNewPrivs"], "1")

    def test_fails_without_cap_net_raw(self) -> None:
        """Without CAP_NET_RAW it stops at once, naming the interface it cannot open."""
        from tests.netns import VethPair

        pair = VethPair.create(self)
        argv = [
            "ip", "netns", "exec", pair.server_ns,
            "setpriv", f"--reuid={USER}", f"--regid={GROUP}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", *TWISTD, "-n", "--pidfile=",
            "aoe", "--iface", pair.server_if, "--backend", "memory:1M",
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
        out = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, out)
        self.assertNotIn("Traceback", out)
        self.assertIn(pair.server_if, out)


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Return each ``Key=value`` of a unit file as key to the list of its values."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


class SystemdUnitTests(SynchronousTestCase):
    """The unit in ``docs/systemd/`` runs the server as a dedicated user with CAP_NET_RAW alone."""

    def setUp(self) -> None:
        self.text = UNIT.read_text()
        self.settings = _unit_settings(self.text)

    def test_least_privilege(self) -> None:
        """A dedicated user, CAP_NET_RAW only, no new privileges, a read-only system."""
        s = self.settings
        self.assertEqual(s["User"], ["aoe-twisted"])
        self.assertEqual(s["AmbientCapabilities"], ["CAP_NET_RAW"])
        self.assertEqual(s["CapabilityBoundingSet"], ["CAP_NET_RAW"])
        self.assertEqual(
            s["RestrictAddressFamilies"], ["AF_PACKET AF_UNIX AF_NETLINK AF_INET AF_INET6"]
        )
        for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                           ("ProtectHome", "yes"), ("PrivateTmp", "yes")):
            self.assertEqual(s[key], [value], key)
        self.assertIn("ReadWritePaths", s)
        self.assertNotIn("PrivateNetwork", s)

    def _installed_copy(self) -> Path:
        """
        Return a copy of the unit whose ExecStart runs a twistd that exists here.

        ``systemd-analyze verify`` fails on a missing program, and the unit
        names the documented install location ``/opt/aoe-twisted``.
        """
        twistd = Path(sys.executable).with_name("twistd")
        program = str(twistd) if twistd.exists() else (shutil.which("twistd") or "/bin/true")
        directory = Path(self.mktemp())
        directory.mkdir()
        copy = directory / UNIT.name
        copy.write_text(self.text.replace("/opt/aoe-twisted/bin/twistd", program))
        return copy

    def test_systemd_analyze_verify(self) -> None:
        """``systemd-analyze verify`` accepts the unit, with no warning."""
        if shutil.which("systemd-analyze") is None:
            raise SkipTest("systemd-analyze is not installed")
        copy = self._installed_copy()
        result = subprocess.run(
            ["systemd-analyze", "verify", f"./{copy.name}"],
            capture_output=True, text=True, cwd=copy.parent, timeout=60, check=False,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual((result.stdout + result.stderr).strip(), "")

    def test_systemd_analyze_security(self) -> None:
        """``systemd-analyze security --offline`` rates the unit's exposure 2.0 or less ("OK")."""
        if shutil.which("systemd-analyze") is None:
            raise SkipTest("systemd-analyze is not installed")
        copy = self._installed_copy()
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--no-pager", f"./{copy.name}"],
            capture_output=True, text=True, cwd=copy.parent, timeout=60, check=False,
        )
        found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        if found is None:
            raise SkipTest(f"this systemd-analyze cannot rate a unit offline: {result.stderr}")
        self.assertLessEqual(float(found.group(1)), 2.0, result.stdout)
