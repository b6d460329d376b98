# -*- test-case-name: tests.test_shared_wire -*-
"""
Two ``twistd aoe`` servers on one interface: the idle one must not pay for the busy one.

Both serve a memory disk from the same end of a veth pair, in a namespace of
the test's own, at different addresses (e1.0 and e2.0).  The user-space
initiator benchmarks e1.0 for a few seconds from the other end; every
request frame reaches both servers' sockets unless a kernel filter
(``aoe_twisted.net.bpf``) keeps e1.0's frames away from e2.0's server.  The
CPU seconds each server used meanwhile (``utime + stime`` from
``/proc/PID/stat``) are compared: the idle one must have used a small
fraction of what the busy one did.  Root only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.netns import VethPair, require
from tests.test_twistd import TwistdProcessMixin, _twistd

#: The idle server may use at most this fraction of the busy one's CPU time.
IDLE_SHARE = 0.25
#: The busy server must have used at least this much (CPU seconds), or the bench did not load it.
BUSY_FLOOR = 0.3


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system, seconds) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # Fields after the command name (which may hold spaces, in parentheses):
    # state is field 3, utime field 14, stime field 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SharedWireTests(TwistdProcessMixin, TestCase):
    """Two servers, one interface: frames for one do not wake the other."""

    timeout = 120

    def aoe(
        self, pair: VethPair, *argv: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``aoe-twisted`` command on the client end of ``pair``."""
        return subprocess.run(
            [sys.executable, "-m", "aoe_twisted", *argv, "-i", pair.client_if,
             "--netns", pair.client_ns],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    @defer.inlineCallbacks
    def test_idle_server_stays_idle(self) -> defer.Generator[defer.Deferred[object], object, None]:
        """
        While e1.0 is benchmarked, the server of e2.0 on the same interface
        uses less than a quarter of the CPU time e1.0's server uses.
        """
        require(self)
        pair = VethPair.create(self)
        work = Path(self.mktemp()).resolve()
        work.mkdir()
        servers = {}
        for shelf in (1, 2):
            proc = _twistd(
                "aoe", "--iface", pair.server_if, "--backend", "memory:64M",
                "--shelf", str(shelf), "--slot", "0", netns=pair.server_ns, cwd=str(work),
            )  # fmt: skip
            self.addCleanup(self._kill, proc)
            servers[shelf] = proc

        deadline = time.monotonic() + 60
        while True:
            found = self.aoe(pair, "discover", "--wait", "0.5").stdout
            if "e1.0" in found and "e2.0" in found:
                break
            for proc in servers.values():
                if proc.poll() is not None:
                    self.fail(f"twistd exited early: {proc.communicate()[0]}")
            if time.monotonic() > deadline:
                self.fail(f"the servers did not both come up: {found!r}")

        busy, idle = servers[1].pid, servers[2].pid
        before = cpu_seconds(busy), cpu_seconds(idle)
        bench = self.aoe(pair, "bench", "e1.0", "--size", "4M", "--duration", "1.5")
        after = cpu_seconds(busy), cpu_seconds(idle)
        self.assertEqual(bench.returncode, 0, bench.stderr)
        busy_cpu, idle_cpu = after[0] - before[0], after[1] - before[1]
        figures = (
            f"CPU seconds during the bench: busy server (e1.0) {busy_cpu:.2f}, "
            f"idle server (e2.0) {idle_cpu:.2f}"
        )
        print(figures)
        print(bench.stdout)

        for proc in servers.values():
            yield self.stop_cleanly(proc)
        self.assertGreater(busy_cpu, BUSY_FLOOR, f"the bench did not load e1.0; {figures}")
        self.assertLess(idle_cpu, IDLE_SHARE * busy_cpu, figures)
