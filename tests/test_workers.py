"""
End-to-end tests of ``twistd aoe --workers N``: one target, several processes.

The server runs as a real ``twistd`` in a namespace of its own; the client
forges source MAC addresses that the fanout program sends to different
workers (``fanout_index``), so each check crosses from one process to the
other: data written through one worker is read through the other, and a
reservation made through one binds the other.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    LogLevel,
    eventFromJSON,
    formatEvent,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    SECTOR_SIZE,
    ATACmdStatus,
    ConfigCommand,
    Error,
    ReserveReleaseCommand,
    format_mac,
)
from aoe_twisted.net.fanout import fanout_index
from aoe_twisted.workers import WorkersService, _WorkerProcess, share_targets
from tests.netns import VethPair, require, run
from tests.peer import Peer, Reply
from tests.test_twistd import _PLUGIN, TwistdProcessMixin, _twistd, child_pids

FILE = (1, 1)
MEMORY = (1, 2)


def _mac_for(worker: int, shelf: int, slot: int, workers: int = 2) -> bytes:
    """Return a unicast MAC whose frames for ``shelf``.``slot`` go to ``worker``."""
    for last in range(1, 256):
        mac = bytes([2, 0, 0, 0, 0x77, last])
        if fanout_index(mac, shelf, slot, workers) == worker:
            return mac
    raise AssertionError("no MAC found")


class WorkersTests(TwistdProcessMixin, TestCase):
    """Two workers serve a file disk and a memory disk as one target each."""

    timeout = 120

    def setUp(self) -> None:
        require(self)
        self.pair = VethPair.create(self)
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir()
        self.image = self.work / "disk.img"
        self.image.write_bytes(bytes(1 << 20))
        self.state = self.work / "state"
        self.peer = Peer(self.pair.client_if, self.pair.client_ns)
        self.peer.start()
        self.addCleanup(self.peer.stop)

    def start(self) -> subprocess.Popen[str]:
        """Start ``twistd aoe --workers 2`` and return it once both targets answer."""
        proc = _twistd(
            "aoe", "--iface", self.pair.server_if, "--workers", "2",
            "--target", f"{FILE[0]}.{FILE[1]}=file:{self.image}",
            "--target", f"{MEMORY[0]}.{MEMORY[1]}=memory:1M",
            "--state-dir", str(self.state),
            netns=self.pair.server_ns,
        )
        self.addCleanup(self._kill, proc)
        return proc

    @defer.inlineCallbacks
    def discover(self, proc: subprocess.Popen[str]) -> Any:
        """Wait until both targets answer a broadcast query; return the server's MAC."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            replies = yield self.peer.discover(timeout=0.5)
            if len({(r.header.major, r.header.minor) for r in replies}) == 2:
                return replies[0].src
            if proc.poll() is not None:
                self.fail(f"twistd exited early: {proc.communicate()[0]}")
        self.fail("the targets did not answer")

    @defer.inlineCallbacks
    def until_answered(self, request: Any, timeout: float = 20.0) -> Any:
        """Repeat ``request()`` until it gets a reply; return the replies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replies = yield request()
            if replies:
                return replies
        self.fail(f"no reply within {timeout} s")

    def ok(self, replies: list[Reply]) -> None:
        """Assert one successful ATA reply."""
        self.assertEqual(len(replies), 1)
        self.assertFalse(replies[0].header.flag_error)
        self.assertEqual(replies[0].arg.cmd_status, ATACmdStatus.READY_STATUS)

    @defer.inlineCallbacks
    def test_workers_are_one_target(self) -> Any:
        """
        Writes through one worker read back through the other (file and
        memory disks), a reservation and a config string set through one
        worker hold in the other, a killed worker is restarted, SIGTERM
        stops every worker, and the state directory keeps what they set.
        """
        proc = self.start()
        server = yield self.discover(proc)
        [worker] = child_pids(proc.pid)

        at_seven = {}
        for shelf, slot in (FILE, MEMORY):
            first, second = _mac_for(0, shelf, slot), _mac_for(1, shelf, slot)
            payload = os.urandom(2 * SECTOR_SIZE)
            replies = yield self.peer.write(server, shelf, slot, 100, payload, src=first)
            self.ok(replies)
            replies = yield self.peer.read(server, shelf, slot, 100, count=2, src=second)
            self.ok(replies)
            self.assertEqual(replies[0].arg.data, payload, f"e{shelf}.{slot}")
            payload = at_seven[shelf, slot] = os.urandom(SECTOR_SIZE)
            replies = yield self.peer.write(server, shelf, slot, 7, payload, src=second)
            self.ok(replies)
            replies = yield self.peer.read(server, shelf, slot, 7, src=first)
            self.assertEqual(replies[0].arg.data, payload, f"e{shelf}.{slot}")

        # A reservation made through worker 1 refuses worker 0's initiator.
        owner, other = _mac_for(1, *FILE), _mac_for(0, *FILE)
        replies = yield self.peer.reserve(
            server, *FILE, ReserveReleaseCommand.SET, [owner], src=owner
        )
        self.assertFalse(replies[0].header.flag_error)
        replies = yield self.peer.write(server, *FILE, 3, bytes(SECTOR_SIZE), src=other)
        self.assertTrue(replies[0].header.flag_error)
        self.assertEqual(replies[0].header.error, Error.TARGET_IS_RESERVED)
        replies = yield self.peer.write(server, *FILE, 3, bytes(SECTOR_SIZE), src=owner)
        self.ok(replies)

        # A config string set (by whichever worker our own MAC reaches) is in every answer.
        replies = yield self.peer.config(server, *MEMORY, ConfigCommand.SET, b"shared")
        self.assertFalse(replies[0].header.flag_error)
        replies = yield self.peer.discover(*MEMORY)
        self.assertEqual([r.arg.string for r in replies], [b"shared"])

        # Kill worker 1: its initiators go unanswered until it is back.
        os.kill(worker, signal.SIGKILL)
        replies = yield self.until_answered(
            lambda: self.peer.read(server, *MEMORY, 100, src=_mac_for(1, *MEMORY), timeout=0.5)
        )
        self.ok(replies)
        [restarted] = child_pids(proc.pid)
        self.assertNotEqual(restarted, worker)

        out = yield self.stop_cleanly(proc)
        self.assertIn("aoe worker 1", out)
        self.assertIn("restarting it in", out)
        self.assertFalse(os.path.exists(f"/proc/{restarted}"), "a worker outlived the server")
        state = json.loads((self.state / f"e{FILE[0]}.{FILE[1]}.json").read_text())
        self.assertEqual(state["reserve_list"], [format_mac(owner)])
        state = json.loads((self.state / f"e{MEMORY[0]}.{MEMORY[1]}.json").read_text())
        self.assertEqual(state["config_string"], "shared")
        self.assertEqual(
            self.image.read_bytes()[7 * SECTOR_SIZE : 8 * SECTOR_SIZE], at_seven[FILE]
        )

    @defer.inlineCallbacks
    def test_link_bounce(self) -> Any:
        """
        After the interface goes down and up, both workers serve again (the
        issue: every socket closed and no worker was restarted), and no
        worker was restarted to get there.
        """
        proc = self.start()
        server = yield self.discover(proc)
        workers = child_pids(proc.pid)
        ns, interface = self.pair.server_ns, self.pair.server_if
        run("ip", "-n", ns, "link", "set", "dev", interface, "down")
        yield task.deferLater(reactor, 0.5, lambda: None)
        run("ip", "-n", ns, "link", "set", "dev", interface, "up")
        self.pair.wait_until_up()
        for worker in (0, 1):
            src = _mac_for(worker, *FILE)
            data = bytes([0x30 + worker]) * SECTOR_SIZE
            replies = yield self.until_answered(
                lambda src=src, data=data: self.peer.write(server, *FILE, 20, data, src=src,
                                                           timeout=0.3),
                timeout=5,
            )
            self.ok(replies)
        self.assertIsNone(proc.poll())
        self.assertEqual(child_pids(proc.pid), workers)

    @defer.inlineCallbacks
    def test_third_party_backend(self) -> Any:
        """A plugin backend (no descriptor to pass) is opened again by each worker from its spec."""
        plugins = self.work / "thirdparty" / "twisted" / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "aoe_test_fives.py").write_text(_PLUGIN)
        proc = _twistd(
            "aoe", "--iface", self.pair.server_if, "--workers", "2",
            "--target", "3.2=fives:64K",
            netns=self.pair.server_ns, pythonpath=str(self.work / "thirdparty"),
        )
        self.addCleanup(self._kill, proc)
        server = None
        deadline = time.monotonic() + 30
        while server is None and time.monotonic() < deadline:
            replies = yield self.peer.discover(timeout=0.5)
            server = replies[0].src if replies else None
        self.assertIsNotNone(server, "e3.2 did not answer")
        for worker in (0, 1):
            replies = yield self.peer.read(server, 3, 2, 5, src=_mac_for(worker, 3, 2))
            self.ok(replies)
            self.assertEqual(replies[0].arg.data, b"\x5a" * SECTOR_SIZE, f"worker {worker}")
        out = yield self.stop_cleanly(proc)
        self.assertIn("aoe worker 1] serving e3.2", out)

    @defer.inlineCallbacks
    def test_orphaned_worker_stops(self) -> Any:
        """A worker whose main process is killed outright stops by itself."""
        proc = self.start()
        yield self.discover(proc)
        [worker] = child_pids(proc.pid)
        proc.kill()
        proc.wait()
        for _ in range(200):
            if not os.path.exists(f"/proc/{worker}"):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        else:
            os.kill(worker, signal.SIGKILL)
            self.fail("the worker outlived its main process by 10 s")


class _FakeTransport:
    """What the service does to a worker's process transport, recorded."""

    def __init__(self) -> None:
        self.stdin_closed = False
        self.signals: list[str] = []

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _ProcessReactor(MemoryReactorClock):
    """A memory reactor that records ``spawnProcess`` calls, or fails them with ``error``."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any]]] = []
        self.error: OSError | None = None

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None, **kwargs: Any) -> _FakeTransport:
        if self.error is not None:
            raise self.error
        transport = _FakeTransport()
        protocol.transport = transport
        self.spawned.append((protocol, args, childFDs))
        return transport


class WorkersServiceTests(SynchronousTestCase):
    """Starting, restarting and stopping workers, on a memory reactor (no processes)."""

    def service(self, workers: int = 3, exit_on_error: bool = True) -> WorkersService:
        target = Target(1, 1, MemoryBackend(64 * SECTOR_SIZE))
        state = share_targets([target])
        self.addCleanup(target.backend.close)
        self.reactor = _ProcessReactor()
        service = WorkersService(
            "eth9", [target], ["memory:32K"], state, workers, reactor=self.reactor,
            exit_on_error=exit_on_error,
        )
        service.local = object()  # type: ignore[assignment]  # no port: privileged start skipped
        return service

    def test_starts_workers(self) -> None:
        """Each worker but the first is started as ``python -m aoe_twisted.workers CONFIG``."""
        service = self.service()
        service.startService()
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, (_, args, fds) in enumerate(self.reactor.spawned, start=1):
            self.assertEqual(args[1:3], ["-m", "aoe_twisted.workers"])
            config = json.loads(args[3])
            self.assertEqual(config["index"], index)
            self.assertIn(service.state.fileno(), fds)
            disk = config["targets"][0]["backend"]["fd"]
            self.assertEqual(fds[disk], disk, "the shared memory disk is passed on")

    def test_cannot_start(self) -> None:
        """A worker that cannot be started at all stops the server with one line."""
        service = self.service()
        self.reactor.error = OSError(13, "Permission denied")
        with self.assertRaises(SystemExit) as caught:
            service.startService()
        message = str(caught.exception.code)
        self.assertIn("cannot start worker 1", message)
        self.assertIn("Permission denied", message)
        self.assertNotIn("\n", message)

    def test_restart_backs_off(self) -> None:
        """A worker that keeps dying young is restarted after 1, 2, 4 s; one that lived, after 1."""
        service = self.service(workers=2)
        service.startService()
        delays = []
        for _ in range(3):
            protocol = self.reactor.spawned[-1][0]
            before = len(self.reactor.spawned)
            protocol.processEnded(Failure(ProcessTerminated(signal=9)))
            waited = 0.0
            while len(self.reactor.spawned) == before:
                self.reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0])
        self.reactor.advance(60)
        self.reactor.spawned[-1][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 5)
        self.assertEqual(service.restarts, 4)

    def test_stop_closes_stdin_then_kills(self) -> None:
        """Stopping closes each worker's standard input, and kills one still there 10 s later."""
        service = self.service(workers=2)
        service.startService()
        protocol = self.reactor.spawned[0][0]
        d = service.stopService()
        self.assertTrue(protocol.transport.stdin_closed)
        self.assertNoResult(d)
        self.reactor.advance(10)
        self.assertEqual(protocol.transport.signals, ["KILL"])
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 1, "no restart while stopping")

    def test_relays_log_events(self) -> None:
        """A worker's JSON log events, however its output is split, are logged under its name."""
        service = self.service()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        process = _WorkerProcess(service, 2)
        output = io.StringIO()
        observer = jsonFileLogObserver(output)
        observer({"log_format": "hello {who}", "who": "there", "log_level": LogLevel.info,
                  "log_namespace": "x", "log_time": 0.0})
        observer({"log_format": "second", "log_level": LogLevel.warn, "log_namespace": "x",
                  "log_time": 0.0})
        data = output.getvalue().encode()
        for i in range(0, len(data), 7):
            process.outReceived(data[i : i + 7])
        relayed = [e for e in events if e.get("log_system") == "aoe worker 2"]
        self.assertEqual([formatEvent(e) for e in relayed], ["hello there", "second"])


class WorkerProcessTests(SynchronousTestCase):
    """``python -m aoe_twisted.workers CONFIG`` on its own."""

    def test_unopenable_backend(self) -> None:
        """A backend the worker cannot open is one critical log event and exit status 1."""
        from aoe_twisted.sharedacl import SharedState

        state = SharedState.create(1)
        self.addCleanup(state.close)
        config = {
            "index": 1, "sockets": {"eth9": -1}, "state_fd": state.fileno(),
            "max_sectors": None, "sync": False, "state_dir": None,
            "targets": [{
                "shelf": 1, "slot": 1, "buffer_count": 64,
                "backend": {"spec": "file:/nonexistent/disk.img", "read_only": False,
                            "direct": False},
            }],
        }  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "aoe_twisted.workers", json.dumps(config)],
            pass_fds=[state.fileno()], capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        events = [json.loads(r) for r in result.stdout.split("\x1e") if r.strip()]
        [event] = [e for e in events if e["log_level"]["name"] == "critical"]
        self.assertIn("cannot open the targets", formatEvent(eventFromJSON(json.dumps(event))))
        self.assertIn("/nonexistent/disk.img", formatEvent(eventFromJSON(json.dumps(event))))


class WorkersSeveralInterfacesTests(TwistdProcessMixin, TestCase):
    """``--workers 2`` with two ``--iface``: one fanout group per interface."""

    timeout = 120

    @defer.inlineCallbacks
    def test_every_worker_serves_every_interface(self) -> Any:
        """
        Each interface answers from its own MAC, and frames that the fanout
        hash gives to either worker are answered on both interfaces; an
        interface removed and created again stops the server with one
        critical line (its sockets cannot be bound again without privilege).
        """
        require(self)
        first = VethPair.create(self)
        second = VethPair.create(self)
        run("ip", "-n", second.server_ns, "link", "set", second.server_if, "netns",
            first.server_ns, "name", "aoesrv1")  # fmt: skip
        run("ip", "-n", first.server_ns, "link", "set", "aoesrv1", "up")
        proc = _twistd(
            "aoe", "--iface", first.server_if, "--iface", "aoesrv1", "--workers", "2",
            "--target", f"{FILE[0]}.{FILE[1]}=memory:1M",
            netns=first.server_ns,
        )  # fmt: skip
        self.addCleanup(self._kill, proc)
        servers = []
        for pair in (first, second):
            peer = Peer(pair.client_if, pair.client_ns)
            peer.start()
            self.addCleanup(peer.stop)
            deadline = time.monotonic() + 30
            replies: list[Reply] = []
            while not replies and time.monotonic() < deadline:
                replies = yield peer.discover(*FILE, timeout=0.5)
            self.assertTrue(replies, "an interface did not answer")
            servers.append(replies[0].src)
            for worker in (0, 1):
                src = _mac_for(worker, *FILE)
                written = yield peer.write(
                    replies[0].src, *FILE, worker, bytes([worker + 1]) * SECTOR_SIZE, src=src
                )
                self.assertEqual(len(written), 1, f"worker {worker} did not answer")
                self.assertEqual(written[0].arg.cmd_status, ATACmdStatus.READY_STATUS)
        self.assertNotEqual(servers[0], servers[1])
        self.assertEqual(len(child_pids(proc.pid)), 1)
        run("ip", "-n", first.server_ns, "link", "delete", "aoesrv1")
        run("ip", "-n", first.server_ns, "link", "add", "aoesrv1", "type", "veth", "peer",
            "name", second.client_if, "netns", second.client_ns)  # fmt: skip
        code = yield self._exit_status(proc)
        out = proc.communicate()[0]
        self.assertIn("interface aoesrv1 was removed and created again", out)
        self.assertNotIn("Traceback", out)
        self.assertIsNotNone(code)
