# -*- test-case-name: tests.test_signals -*-
"""
``SIGHUP`` does not end the server: it says, in one log line, that there is nothing to reload.

Without a handler the signal's default action ended ``twistd aoe`` with
exit status 129 and no log line.  Until the server can read a config file
(and so has something to reload), a SIGHUP is answered with one warning and
the server keeps serving.  Unit tests of ``aoe_twisted.tap.HangupHandler``
and ``ServesUnderTwistd`` send real signals to this process; the end-to-end
tests send them to a real ``twistd -n aoe`` serving on a veth pair in
namespaces the test creates, and check it still answers a discovery and
still stops cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from aoe_twisted.tap import HangupHandler, ServesUnderTwistd, _under_twistd, nothing_to_reload
from tests.test_twistd import TwistdProcessMixin, _twistd, child_pids

Gen = defer.Generator[defer.Deferred[Any], Any, None]

#: What the server logs on SIGHUP (a fragment of it, stable across wording changes around it).
NOTHING_TO_RELOAD = "SIGHUP: nothing to reload"


def _keep_sighup(case: TestCase) -> None:
    """Make sure SIGHUP's handler is, after the test, what it was before it."""
    previous = signal.getsignal(signal.SIGHUP)
    case.addCleanup(signal.signal, signal.SIGHUP, previous)


class HangupHandlerTests(TestCase):
    """``HangupHandler`` turns a real SIGHUP into a call in the reactor thread."""

    timeout = 10

    def setUp(self) -> None:
        _keep_sighup(self)

    @defer.inlineCallbacks
    def test_signal_calls_on_hangup(self) -> Gen:
        """A SIGHUP sent to the process calls ``on_hangup`` once, from the reactor."""
        called: defer.Deferred[None] = defer.Deferred()
        handler = HangupHandler(lambda: called.callback(None), reactor)
        handler.install()
        self.addCleanup(handler.restore)
        os.kill(os.getpid(), signal.SIGHUP)
        yield called

    def test_restore(self) -> None:
        """``restore`` puts back the handler ``install`` replaced."""

        def before(signum: int, frame: object) -> None:
            """The handler in place before (never called)."""

        signal.signal(signal.SIGHUP, before)
        handler = HangupHandler(lambda: None, reactor)
        handler.install()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
        handler.restore()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    def test_nothing_to_reload_logs_one_line(self) -> None:
        """The default action is one warning naming what is still served."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        nothing_to_reload(3, ["eth0", "eth1"])()
        ours = [e for e in events if e.get("log_namespace") == "aoe_twisted.tap"]
        self.assertEqual(len(ours), 1, events)
        from twisted.logger import LogLevel, formatEvent

        self.assertEqual(ours[0]["log_level"], LogLevel.warn)
        text = formatEvent(ours[0])
        self.assertIn(NOTHING_TO_RELOAD, text)
        self.assertIn("--config", text)
        self.assertIn("still serving 3 targets on eth0, eth1", text)


class ServesUnderTwistdTests(TestCase):
    """The service ``makeService`` returns handles SIGHUP while it runs, and only then."""

    def setUp(self) -> None:
        _keep_sighup(self)

    def _service(self) -> Any:
        """A real ``service.Service`` with ``ServesUnderTwistd`` mixed in, as makeService does."""
        served = _under_twistd(service.Service)()
        served.hangup = HangupHandler(lambda: None, reactor)
        return served

    def test_mixed_in(self) -> None:
        """The class keeps its name and is both the server's and ``ServesUnderTwistd``."""
        cls = _under_twistd(service.Service)
        self.assertEqual(cls.__name__, "Service")
        self.assertTrue(issubclass(cls, service.Service))
        self.assertTrue(issubclass(cls, ServesUnderTwistd))
        self.assertIs(_under_twistd(service.Service), cls)

    def test_installed_on_start(self) -> None:
        """``startService`` installs the handler."""
        served = self._service()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), served.hangup._received)
        served.startService()
        self.addCleanup(served.stopService)
        self.assertEqual(signal.getsignal(signal.SIGHUP), served.hangup._received)

    def test_restored_once_stopped(self) -> None:
        """Once the service has stopped, SIGHUP's handler is the one it had before."""
        previous = signal.getsignal(signal.SIGHUP)
        served = self._service()
        served.startService()
        self.successResultOf(served.stopService())
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    def test_kept_while_stopping(self) -> None:
        """While the server's stop has not finished (ports closing, disks flushing) it stays."""

        class SlowStop(service.Service):
            """A service whose stop finishes when the test says."""

            stopped: defer.Deferred[None]

            def stopService(self) -> defer.Deferred[None]:
                super().stopService()
                self.stopped = defer.Deferred()
                return self.stopped

        served = _under_twistd(SlowStop)()
        served.hangup = HangupHandler(lambda: None, reactor)
        served.startService()
        d = served.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), served.hangup._received)
        served.stopped.callback(None)
        self.successResultOf(d)
        self.assertFalse(served.hangup.installed)


class TwistdHangupTests(TwistdProcessMixin, TestCase):
    """A real ``twistd -n aoe`` on a veth pair: SIGHUP is one log line, and it keeps serving."""

    timeout = 90

    @defer.inlineCallbacks
    def _serve(self, *options: str) -> defer.Generator[defer.Deferred[Any], Any, Any]:
        """Start ``twistd aoe`` serving e7.1 (and ``options``); return it once it answers."""
        from tests.netns import VethPair, require
        from tests.peer import Peer
        from tests.test_statefile import _discover

        require(self)
        pair = VethPair.create(self)
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        self.proc = _twistd(
            "aoe", "--iface", pair.server_if, "--target", "7.1=memory:1M", *options,
            netns=pair.server_ns, cwd=str(work),
        )  # fmt: skip
        self.addCleanup(self._kill, self.proc)
        self.peer = Peer(pair.client_if, pair.client_ns)
        self.peer.start()
        self.addCleanup(self.peer.stop)
        yield _discover(self, self.peer, self.proc, 7, 1)
        return self.proc

    @defer.inlineCallbacks
    def _hangup_and_answer(self, proc: subprocess.Popen[str]) -> Gen:
        """Send SIGHUP; check the server lives and answers a discovery afterwards."""
        from tests.test_statefile import _discover

        proc.send_signal(signal.SIGHUP)
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertIsNone(proc.poll(), "twistd ended on SIGHUP")
        yield _discover(self, self.peer, proc, 7, 1)

    @defer.inlineCallbacks
    def test_sighup_keeps_serving(self) -> Gen:
        """
        Each SIGHUP is one warning line and nothing else; the server still
        answers, and SIGTERM still stops it cleanly.
        """
        proc = yield self._serve()
        yield self._hangup_and_answer(proc)
        yield self._hangup_and_answer(proc)
        out = yield self.stop_cleanly(proc)
        self.assertIn("Main loop terminated", out)
        lines = [line for line in out.splitlines() if "SIGHUP" in line]
        self.assertEqual(len(lines), 2, out)
        for line in lines:
            self.assertIn(NOTHING_TO_RELOAD, line)
            self.assertIn("still serving 1 target on aoesrv", line)

    @defer.inlineCallbacks
    def test_sighup_with_workers(self) -> Gen:
        """
        With ``--workers 2`` the main process logs the line and keeps serving;
        its worker is the same process after the SIGHUP as before.
        """
        proc = yield self._serve("--workers", "2")
        before = child_pids(proc.pid)
        self.assertEqual(len(before), 1, before)
        yield self._hangup_and_answer(proc)
        self.assertEqual(child_pids(proc.pid), before)
        out = yield self.stop_cleanly(proc)
        self.assertIn("Main loop terminated", out)
        self.assertEqual(out.count(NOTHING_TO_RELOAD), 1, out)
