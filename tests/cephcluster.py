# -*- test-case-name: tests.test_rbd -*-
"""
A one-node Ceph cluster on the loopback, started by the tests: one monitor, one memstore OSD.

``CephCluster(directory).start()`` brings up, in about a second, a cluster
whose every file (configuration, monitor store, OSD data directory, logs,
admin sockets, pid files, crash dumps) lives under ``directory``, that
listens on ``127.0.0.1`` only and keeps its data in memory (``osd
objectstore = memstore``, at most ``memstore_bytes``).  It has no cephx, one
OSD, pool size 1, and a pool ``rbd`` ready for images; ``start`` returns the
path of its ``ceph.conf``, which is all a client needs (``rbd:rbd/IMAGE,
conf=PATH``).  ``stop`` kills the OSD, then the monitor: with memstore there
is nothing to save, and a clean shutdown costs 3.5 s.

The recipe is the one of issue #13: ``monmaptool --create --addv``,
``ceph-mon --mkfs``, ``ceph-mon``, ``osd new``, ``ceph-osd --mkfs``,
``ceph-osd``, ``osd pool create rbd 8 8``, ``rbd pool init``.  What makes it
fast: ``paxos propose interval = 0.05`` (1 s by default: 8 s to start),
``mon mgr mkfs grace`` large (no ceph-mgr), ``memstore page set = true``
(small random writes are twice as fast), and the commands sent by librados
from this process instead of the ``ceph`` command (0.3 s of Python start-up
each).  ``cluster addr`` and ``public addr`` keep the OSD off ``0.0.0.0``.
Memory: the daemons start at about 75 MB; the OSD then holds what is
written, about once (twice for 4 MiB writes), up to ``memstore_bytes``.  The
placement-group logs are cut to 10 entries: at the default 10,000 per
group they grow by about 11 KB per small write (550 MB per 50,000 writes).
Progress is polled (``osd stat``) against a timeout; a step that fails raises
``CephClusterError`` quoting the tails of the daemons' logs.

Trial (26.10) runs no ``setUpClass``, so ``shared_cluster(case)`` is the
once-per-run form: the first test that asks starts one cluster in a
temporary directory, every later test (of any class) reuses it, and it is
stopped when the process exits.  Each test makes its own images
(``create_image``, removed at the test's cleanup), so tests stay independent.
``require_ceph(case)`` skips a test when Ceph or python3-rbd is missing, or
fails it under ``AOE_TWISTED_REQUIRE_INTEROP=1``.

Debian packages: ceph-mon, ceph-osd (and ceph-common for the ``ceph`` and
``rbd`` commands, handy when debugging), python3-rados, python3-rbd.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

__all__ = [
    "REQUIRE_ENV",
    "CephCluster",
    "CephClusterError",
    "require_ceph",
    "shared_cluster",
    "unavailable_reason",
]

REQUIRE_ENV = "AOE_TWISTED_REQUIRE_INTEROP"
"""Set to ``1`` to make a missing prerequisite a failure instead of a skip."""

#: The daemons and tools the cluster needs, and the Debian package of each.
_PROGRAMS = {"monmaptool": "ceph-base", "ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd"}
_MODULES = {"rados": "python3-rados", "rbd": "python3-rbd"}

_POLL = 0.01
"""Seconds between two looks at a step's progress."""

_MON_ID = "a"
_LOG_TAIL_LINES = 15
_image_numbers = itertools.count(1)

_CONF_TEMPLATE = """\
[global]
fsid = {fsid}
mon host = v2:{host}:{port}
public addr = {host}
cluster addr = {host}
auth cluster required = none
auth service required = none
auth client required = none
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
pid file = {dir}/run/$name.pid
log file = {dir}/log/$name.log
mon cluster log file = {dir}/log/$cluster.$channel.log
crash dir = {dir}/crash
keyring = {dir}/keyring
mon data = {dir}/$name
osd data = {dir}/$name
paxos propose interval = 0.05
mon mgr mkfs grace = 1000000000
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
memstore page set = true
osd min pg log entries = 10
osd max pg log entries = 10
osd pg log dups tracked = 10
osd pg log trim min = 10
rbd cache = false

[client]
# One socket per client process: clients of one name would fight over one.
admin socket = {dir}/run/$name.$pid.$cctid.asok
"""


def unavailable_reason() -> str | None:
    """Return why the cluster cannot run here (a missing program or module), or ``None``."""
    for program, package in _PROGRAMS.items():
        if shutil.which(program) is None:
            return f"needs {program} (apt-get install {package})"
    for module, package in _MODULES.items():
        try:
            __import__(module)
        except ImportError:
            return (
                f"needs the {module} module (apt-get install {package}, and a virtual "
                "environment made with --system-site-packages on /usr/bin/python3)"
            )
    return None


def require_ceph(case: SynchronousTestCase) -> None:
    """Skip ``case`` (or fail it, under ``AOE_TWISTED_REQUIRE_INTEROP=1``) if Ceph cannot run."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        case.fail(f"{reason} (and {REQUIRE_ENV}=1)")
    raise SkipTest(reason)


class CephClusterError(RuntimeError):
    """The cluster did not start, or a command to it failed; the message quotes the logs."""


def _free_port(host: str) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int) -> str:
    """Return the last ``lines`` lines of the file at ``path``, or say it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"--- {path.name}: (none)"
    return f"--- {path.name}:\n" + "\n".join(text.splitlines()[-lines:])


def _rss(pid: int) -> int:
    """Return the resident memory of process ``pid`` in bytes, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class CephCluster:
    """
    One monitor and one memstore OSD under ``directory``, on ``host`` (a loopback address).

    ``start()`` returns the configuration file's path (also ``conf``) once the
    OSD is up and the pool ``rbd`` is initialised; ``stop()`` undoes it and
    can be called at any point, twice, or after a failed ``start``.
    ``startup_seconds`` says how long ``start`` took.

    @param memstore_bytes: the most data the OSD holds (in memory).
    @param timeout: seconds each start-up step may take before
        ``CephClusterError``.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        host: str = "127.0.0.1",
        memstore_bytes: int = 1 << 30,
        timeout: float = 30.0,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.conf = self.directory / "ceph.conf"
        self.host = host
        self.memstore_bytes = memstore_bytes
        self.timeout = timeout
        self.fsid = str(uuid.uuid4())
        self.port = 0
        self.startup_seconds = 0.0
        self._mon: subprocess.Popen[bytes] | None = None
        self._osd: subprocess.Popen[bytes] | None = None
        self._outputs: list[IO[bytes]] = []
        self._admin: Any = None  # rados.Rados, once the monitor answers

    # -- start and stop -------------------------------------------------------------------

    def start(self) -> Path:
        """
        Create and start the cluster; return the path of its ``ceph.conf``.

        Call it from a thread that lives as long as the cluster (the main
        thread): the daemons are started so that they die with it.

        @raise CephClusterError: if a step fails or times out; the cluster is
            stopped again and the message quotes the logs' tails.
        """
        began = time.monotonic()
        try:
            self._start_monitor()
            self._start_osd()
            self._create_rbd_pool()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self.conf

    def stop(self) -> None:
        """Disconnect the fixture's client, kill the OSD, then the monitor; wait for both."""
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.shutdown()
        daemons, self._osd, self._mon = (self._osd, self._mon), None, None
        for proc in daemons:
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        for output in self._outputs:
            output.close()
        self._outputs.clear()

    def pause_osd(self) -> None:
        """
        Stop the OSD (``SIGSTOP``) until ``resume_osd``: a cluster that does not answer.

        Requests sent meanwhile get no answer until it resumes; for the tests
        of deadlines.  Schedule the resume before waiting on anything.
        """
        assert self._osd is not None, "the cluster is not running"
        os.kill(self._osd.pid, signal.SIGSTOP)

    def resume_osd(self) -> None:
        """Let a paused OSD go on (``SIGCONT``); nothing if it is not paused or not running."""
        if self._osd is not None and self._osd.poll() is None:
            os.kill(self._osd.pid, signal.SIGCONT)

    def daemon_pids(self) -> list[int]:
        """Return the process ids of the running daemons (monitor first)."""
        return [proc.pid for proc in (self._mon, self._osd) if proc is not None]

    def memory_bytes(self) -> int:
        """Return the resident memory of the monitor and the OSD together, in bytes."""
        return sum(_rss(proc.pid) for proc in (self._mon, self._osd) if proc is not None)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of each daemon's log and output, for error messages."""
        names = [f"mon.{_MON_ID}.log", f"mon.{_MON_ID}.out", "osd.0.log", "osd.0.out"]
        return "\n".join(_tail(self.directory / "log" / name, lines) for name in names)

    def _start_monitor(self) -> None:
        """Write the configuration, make the monitor's store, start it and connect to it."""
        for sub in ("run", "log", "crash"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self.port = _free_port(self.host)
        self.conf.write_text(
            _CONF_TEMPLATE.format(
                fsid=self.fsid,
                host=self.host,
                port=self.port,
                dir=self.directory,
                memstore_bytes=self.memstore_bytes,
            )
        )
        monmap = self.directory / "monmap"
        self._run(
            "monmaptool", "--create", "--clobber", "--fsid", self.fsid,
            "--addv", _MON_ID, f"[v2:{self.host}:{self.port}]", str(monmap),
        )
        self._run(
            "ceph-mon", "-c", str(self.conf), "--mkfs", "-i", _MON_ID, "--monmap", str(monmap)
        )
        self._mon = self._spawn(f"mon.{_MON_ID}", "ceph-mon", "-i", _MON_ID)
        self._wait("the monitor to listen", self._mon, self._monitor_listens)
        self._admin = self._connect()

    def _start_osd(self) -> None:
        """Register OSD 0, make its (memory) store, start it and wait until it is up."""
        osd_uuid = str(uuid.uuid4())
        osd_id = self.command({"prefix": "osd new", "uuid": osd_uuid}).strip()
        if osd_id != "0":
            raise CephClusterError(f"osd new gave id {osd_id!r}, expected 0")
        (self.directory / "osd.0").mkdir(exist_ok=True)
        self._run(
            "ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid
        )
        self._osd = self._spawn("osd.0", "ceph-osd", "-i", "0")
        self._wait("the OSD to be up", self._osd, self._osd_up)

    def _create_rbd_pool(self) -> None:
        """Create the pool ``rbd`` (8 placement groups, size 1) and initialise it for RBD."""
        import rbd

        self.command({"prefix": "osd pool create", "pool": "rbd", "pg_num": 8, "pgp_num": 8})
        with self._admin.open_ioctx("rbd") as ioctx:
            rbd.RBD().pool_init(ioctx, False)

    def _run(self, *argv: str) -> None:
        """Run one set-up command; ``CephClusterError`` quoting its output if it fails."""
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, check=False, timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            raise CephClusterError(
                f"{' '.join(argv)} took more than {self.timeout} s\n{self.log_tail()}"
            ) from None
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip().splitlines()[:_LOG_TAIL_LINES]
            raise CephClusterError(
                f"{' '.join(argv)} exited {result.returncode}:\n"
                + "\n".join(output)
                + f"\n{self.log_tail()}"
            )

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        """
        Start a daemon in the foreground, its output in ``log/NAME.out``.

        Started from the main thread, it is wrapped in ``setpriv
        --pdeathsig KILL`` so that it dies with this process even if the
        process is killed (the signal follows the thread that started it,
        hence only from the main thread).
        """
        output = (self.directory / "log" / f"{name}.out").open("wb")
        self._outputs.append(output)
        prefix: list[str] = []
        if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
            prefix = ["setpriv", "--pdeathsig", "KILL", "--"]
        return subprocess.Popen(
            [*prefix, *argv, "-f", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )

    def _wait(self, what: str, proc: subprocess.Popen[bytes], ready: Any) -> None:
        """Poll ``ready()`` until it is true; fail if ``proc`` exits or ``timeout`` passes."""
        deadline = time.monotonic() + self.timeout
        while not ready():
            if proc.poll() is not None:
                raise CephClusterError(
                    f"waiting for {what}: the daemon exited with status {proc.returncode}\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise CephClusterError(
                    f"waiting for {what}: still not there after {self.timeout} s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(_POLL)

    def _monitor_listens(self) -> bool:
        """Return whether the monitor accepts TCP connections on its port."""
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _osd_up(self) -> bool:
        """Return whether ``osd stat`` counts one OSD up."""
        stat = json.loads(self.command({"prefix": "osd stat", "format": "json"}))
        return stat.get("num_up_osds") == 1

    # -- using the cluster -----------------------------------------------------------------

    def connect(self, **conf: str) -> Any:
        """
        Return a new connected ``rados.Rados`` client of this cluster; shut it down when done.

        ``conf`` items are set on it before it connects (``rbd_cache="true"``).
        """
        import rados

        client = rados.Rados(conffile=str(self.conf), rados_id="admin")
        client.conf_set("client_mount_timeout", str(int(self.timeout)))
        for key, value in conf.items():
            client.conf_set(key, value)
        client.connect()
        return client

    def _connect(self) -> Any:
        """Connect the fixture's own client, quoting the logs if the monitor does not answer."""
        import rados

        try:
            return self.connect()
        except rados.Error as e:
            raise CephClusterError(f"cannot connect to the monitor: {e}\n{self.log_tail()}") from e

    def command(self, cmd: dict[str, Any]) -> str:
        """
        Send one monitor command (the JSON form of a ``ceph`` command); return its output.

        @raise CephClusterError: if the monitor refuses it.
        """
        if self._admin is None:
            raise CephClusterError("the cluster is not running")
        ret, out, err = self._admin.mon_command(json.dumps(cmd), b"", timeout=self.timeout)
        if ret != 0:
            raise CephClusterError(
                f"ceph {cmd['prefix']} failed ({os.strerror(-ret)}): {err}\n{self.log_tail()}"
            )
        return out.decode()

    def create_image(
        self,
        case: SynchronousTestCase | None = None,
        size: int = 64 << 20,
        *,
        name: str | None = None,
        pool: str = "rbd",
        namespace: str = "",
        features: int | None = None,
    ) -> str:
        """
        Create an RBD image of ``size`` bytes; return its name.

        The name is ``name`` or a new unique one; ``case``'s cleanup removes
        the image (and its snapshots) again, freeing the OSD's memory.
        ``features`` are librbd's feature bits (``None``: librbd's default).
        """
        import rbd

        if name is None:
            name = f"img-{os.getpid()}-{next(_image_numbers)}"
        with self._admin.open_ioctx(pool) as ioctx:
            ioctx.set_namespace(namespace)
            rbd.RBD().create(ioctx, name, size, features=features)
        if case is not None:
            case.addCleanup(self.remove_image, name, pool=pool, namespace=namespace)
        return name

    def create_snapshot(self, image: str, snapshot: str, *, pool: str = "rbd") -> None:
        """Take snapshot ``snapshot`` of ``image``."""
        import rbd

        with self._admin.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image) as img:
            img.create_snap(snapshot)

    def remove_image(self, name: str, *, pool: str = "rbd", namespace: str = "") -> None:
        """Remove image ``name`` and its snapshots; nothing if it, or the cluster, is gone."""
        import rbd

        if self._admin is None:
            return
        with self._admin.open_ioctx(pool) as ioctx:
            ioctx.set_namespace(namespace)
            try:
                with rbd.Image(ioctx, name) as img:
                    for snap in list(img.list_snaps()):
                        img.remove_snap(snap["name"])
            except rbd.ImageNotFound:
                return
            rbd.RBD().remove(ioctx, name)


_shared: CephCluster | None = None
_shared_failure: str | None = None


def shared_cluster(case: SynchronousTestCase) -> CephCluster:
    """
    Return the cluster this test process shares, starting it on first use.

    Skips ``case`` (see ``require_ceph``) when Ceph cannot run.  The cluster
    lives in a temporary directory and is stopped, and the directory
    removed, when the process exits; a cluster that failed to start fails
    every later test that asks, with the same message, without a second try.
    """
    global _shared, _shared_failure
    require_ceph(case)
    if _shared_failure is not None:
        raise CephClusterError(_shared_failure)
    if _shared is None:
        directory = tempfile.mkdtemp(prefix="aoe-ceph-")
        cluster = CephCluster(directory)
        try:
            cluster.start()
        except CephClusterError as e:
            _shared_failure = str(e)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        atexit.register(cluster.stop)
        _shared = cluster
    return _shared
