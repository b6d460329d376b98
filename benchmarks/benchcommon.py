"""
Shared pieces of the server benchmarks (``raw_capacity.py``, ``linux_initiator.py``,
``profile_server.py``): the servers under test, CPU accounting from ``/proc``,
repeat statistics, the side-by-side table, a description of the machine, and
the build of ``loadgen.c`` (the compiled load generator and echo target).

Not a benchmark itself; nothing here is imported by the package or the tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aoe_twisted.initiator.cli import twistd_argv  # noqa: E402
from tests.linuxguest import terminate  # noqa: E402

#: ``twistd`` run by this interpreter (``python -m twisted.scripts.twistd`` does nothing).
TWISTD = tuple(twistd_argv())

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The PIDs of ``pid``'s live children (``/proc/PID/task/*/children``)."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return children


def cpu_split(pid: int) -> tuple[float, float]:
    """
    (user, system) CPU seconds of process ``pid`` and its live children so far.

    From ``/proc/PID/stat`` (utime, stime): the children are the workers of
    ``twistd aoe --workers N``, part of the server; vblade has none.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = data[data.rindex(b")") + 2 :].split()
    user, system = int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK
    for child in _children(pid):
        try:
            child_user, child_system = cpu_split(child)
        except OSError:
            continue
        user += child_user
        system += child_system
    return user, system


def _run_time(pid: int) -> float:
    """
    CPU seconds of every live thread of ``pid`` and its live children, to the nanosecond.

    The first field of ``/proc/PID/task/TID/schedstat`` is the time the
    thread has run.  ``/proc/PID/stat`` counts in clock ticks (10 ms), too
    coarse for a pass that costs the server a tenth of a second.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue
    seconds = total / 1e9
    for child in _children(pid):
        try:
            seconds += _run_time(child)
        except OSError:
            continue
    return seconds


def cpu_seconds(pid: int) -> float:
    """
    CPU seconds of process ``pid`` (and its children) so far.

    From the scheduler's run time (``schedstat``, nanoseconds) where the
    kernel keeps it, else ``/proc/PID/stat``'s utime+stime (clock ticks).
    """
    try:
        return _run_time(pid)
    except (OSError, ValueError, IndexError):
        user, system = cpu_split(pid)
        return user + system


def twistd_help() -> str:
    """The output of ``twistd aoe --help`` (to see which options this checkout has)."""
    proc = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "aoe", "--help"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    return proc.stdout


def has_option(option: str) -> bool:
    """True if ``twistd aoe`` accepts ``option`` (e.g. ``--sync``, ``--workers``)."""
    return option in twistd_help()


@dataclass
class ServerSpec:
    """One server under test: a name for the table and how to start it."""

    name: str
    kind: str  # "vblade", "ours" or "echo" (loadgen.c's trivial echo target, no disk)
    extra: tuple[str, ...] = ()
    #: For "ours": run the aoe-twisted of this source tree (its ``src``), not this checkout's.
    source: str | None = None
    #: raw_capacity.py: drive this server with the "c" or "python" generator (None: the run's).
    generator: str | None = None

    def argv(self, iface: str, image: Path, shelf: int = 0, slot: int = 1) -> list[str]:
        """The command line serving ``image`` as e``shelf``.``slot`` on ``iface``."""
        if self.kind == "vblade":
            return ["vblade", *self.extra, str(shelf), str(slot), iface, str(image)]
        if self.kind == "echo":
            return [str(loadgen_binary()), "echo", "--iface", iface, "--shelf", str(shelf),
                    "--slot", str(slot), *self.extra]  # fmt: skip
        return [
            *TWISTD, "-n", "--pidfile=", "aoe", "--iface", iface,
            "--backend", f"file:{image}", "--shelf", str(shelf), "--slot", str(slot),
            *self.extra,
        ]  # fmt: skip


LOADGEN_SOURCE = Path(__file__).resolve().with_name("loadgen.c")


def loadgen_cache() -> Path:
    """
    Where the compiled load generator is kept: outside the checkout, never in it.

    ``$AOE_BENCH_CACHE``, else ``$XDG_CACHE_HOME/aoe-twisted``, else
    ``~/.cache/aoe-twisted`` (under ``sudo`` that is root's).
    """
    if os.environ.get("AOE_BENCH_CACHE"):
        return Path(os.environ["AOE_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aoe-twisted"


def loadgen_binary() -> Path:
    """
    ``loadgen.c`` compiled with ``cc -O2`` (``$CC`` if set), cached by the source's hash.

    Built once per version of the source into :func:`loadgen_cache` (written
    under a temporary name, then renamed, so concurrent runs never see half a
    binary; builds of other versions are removed). Raises ``RuntimeError`` if
    there is no compiler or it fails.
    """
    source = LOADGEN_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cache = loadgen_cache()
    binary = cache / f"loadgen-{digest}"
    if os.access(binary, os.X_OK):
        return binary
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc}) to build {LOADGEN_SOURCE.name}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".loadgen-{digest}.{os.getpid()}"
    res = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(tmp), str(LOADGEN_SOURCE), "-lm"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} {LOADGEN_SOURCE.name} failed: {res.stderr.strip()[-2000:]}")
    os.replace(tmp, binary)
    for stale in cache.glob("loadgen-*"):  # builds of earlier versions of the source
        if stale != binary:
            with contextlib.suppress(OSError):
                stale.unlink()
    return binary


def start_in_netns(
    netns: str, argv: Sequence[str], log: Path, source: str | None = None
) -> subprocess.Popen[bytes]:
    """
    Start ``argv`` in ``netns`` (``ip netns exec`` execs it: the pid is the server's).

    ``source``: a ``src`` directory put first on ``PYTHONPATH`` (another
    version of aoe-twisted, for before/after comparisons).
    """
    env = None
    if source is not None:
        env = dict(os.environ, PYTHONPATH=source)
    with log.open("ab") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (a server may flush on the way out)."""
    terminate(proc, grace)


def run(*argv: str) -> str:
    """Run a command; raise ``RuntimeError`` with its stderr if it fails."""
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


@dataclass
class Veth:
    """Two namespaces joined by a veth pair (server end ``srv0``, client end ``cli0``)."""

    server_ns: str
    client_ns: str
    server_if: str = "aoebsrv0"
    client_if: str = "aoebcli0"


@contextlib.contextmanager
def veth_pair(mtu: int) -> Iterator[Veth]:
    """Create two namespaces and a veth pair at ``mtu``; delete them on exit, whatever happens."""
    base = f"aoe-bench-{os.getpid()}-{secrets.token_hex(3)}"
    pair = Veth(f"{base}-srv", f"{base}-cli")
    made: list[str] = []
    try:
        for ns in (pair.server_ns, pair.client_ns):
            run("ip", "netns", "add", ns)
            made.append(ns)
        run(
            "ip", "link", "add", pair.server_if, "netns", pair.server_ns, "mtu", str(mtu),
            "type", "veth", "peer", "name", pair.client_if, "netns", pair.client_ns,
            "mtu", str(mtu),
        )  # fmt: skip
        for ns, iface in ((pair.server_ns, pair.server_if), (pair.client_ns, pair.client_if)):
            run("ip", "-n", ns, "link", "set", "dev", iface, "up")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            states = [
                run("ip", "-n", ns, "-o", "link", "show", "dev", i)
                for ns, i in ((pair.server_ns, pair.server_if), (pair.client_ns, pair.client_if))
            ]
            if all(" state UP " in s for s in states):
                break
            time.sleep(0.02)
        yield pair
    finally:
        for ns in made:
            for pid in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
            ).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def make_image(path: Path, size: int) -> Path:
    """Write a ``size``-byte image of non-zero data (so reads come from the page cache)."""
    chunk = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
    return path


@dataclass
class Spread:
    """Median, minimum and maximum of repeated measurements."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def fmt(self, digits: int = 1) -> str:
        """``median (min-max)`` with ``digits`` decimals; ``n/a`` when empty."""
        if not self.values:
            return "n/a"
        if len(self.values) == 1:
            return f"{self.values[0]:,.{digits}f}"
        return (
            f"{self.median:,.{digits}f} ({min(self.values):,.{digits}f}"
            f"-{max(self.values):,.{digits}f})"
        )


def ratio(ours: Spread, theirs: Spread) -> str:
    """ours.median / theirs.median as ``0.42x``."""
    if not ours.values or not theirs.values or theirs.median == 0:
        return "n/a"
    return f"{ours.median / theirs.median:.2f}x"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def machine() -> str:
    """One paragraph describing this machine: CPUs, model, kernel, Python, load."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    vblade = "vblade"
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "vblade"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        vblade = f"vblade {out}" if out else vblade
    source = os.environ.get("PYTHONPATH") or str(REPO / "src")
    return (
        f"{os.cpu_count()} CPUs ({model}), kernel {platform.release()}, "
        f"Python {platform.python_version()}, {vblade}, aoe-twisted from {source}, "
        f"load average {load} at start"
    )


def now_utc() -> str:
    """The time, for the report header."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
