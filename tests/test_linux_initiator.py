"""
Interop with the real Linux AoE initiator: Debian's ``aoe.ko`` in a QEMU guest
against our ``twistd aoe`` target.

Each test creates a private network namespace with a tap device
(``tests/linuxguest.py``), starts ``twistd -n aoe --iface TAP --backend
file:IMAGE --shelf 0 --slot 1`` inside it with the interpreter running the
tests, boots the guest on the tap and runs a shell script there: discover
``e0.1``, check its size and frame payload, write and read back a
pseudo-random pattern with direct I/O, measure throughput, build, fill,
unmount and remount an ext2 file system.  The host then checks the backing
file, and that the server survived the whole session, stops cleanly on
SIGTERM and logged no error.

The tests skip, saying why, where QEMU, root, busybox or the kernel are
missing, unless ``AOE_TWISTED_REQUIRE_INTEROP=1`` makes that a failure.
``TwistdTarget`` and ``run_session`` are reused by ``tests/test_tshark.py``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from twisted.trial import unittest

from aoe_twisted.initiator.cli import twistd_argv
from tests import linuxguest

MIB = 1024 * 1024
SECTOR = 512
# An odd sector count: the guest must see exactly the file's size, not a rounded one.
DISK_SECTORS = 64 * 2048 + 7
DISK_BYTES = DISK_SECTORS * SECTOR
PATTERN_OFFSET_MIB = 32
PATTERN_MIB = 4
SPEED_OFFSET_MIB = 40
SPEED_MIB = 24
FS_BLOCKS_1K = 16 * 1024  # the ext2 file system covers only the first 16 MiB
HELLO = "hello from the linux aoe initiator"

# Data bytes per AoE frame the initiator settles on: (MTU - 22) // 512 sectors,
# which is also what our target advertises in its config reply.
EXPECTED_PAYLOAD = {1500: 1024, 9000: 8704}

TWISTD: tuple[str, ...] = tuple(twistd_argv())
"""``twistd`` run by the interpreter running the tests."""

_GUEST_CMDLINE = "loglevel=1"
"""Added to every guest's kernel command line by ``run_session``."""

# Twisted's log lines look like "2026-... [system#level] text".
_LOG_LEVEL_RE = re.compile(r"^\S+ \[[^\]#]*#(\w+)\] ")
_LOG_BAD_LEVELS = {"warn", "error", "critical"}
_LOG_BAD_WORDS = ("Traceback", "Unhandled")
_READY_RE = re.compile(r"serving e(\d+)\.(\d+) .* \(([0-9a-f:]{17}), MTU (\d+), (\d+) sectors")
_COUNTERS_RE = re.compile(
    r"stopped serving on \S+: (\d+) frames received, (\d+) answered, (\d+) malformed"
)

DATA_SCRIPT = r"""
D=/dev/etherd/e0.1
S='/sys/block/etherd!e0.1'
md5() { set -- $(md5sum "$1"); echo "$1"; }
aoe_wait_disk e0.1 20 || exit 10
echo SIZE=$(cat "$S/size") PAYLOAD=$(cat "$S/payload") NETIF=$(cat "$S/netif")
echo MAC=$(cat "$S/mac") STATE=$(cat "$S/state")
echo PATTERN_MD5=$(md5 /pattern.bin)

t0=$(now_us)
dd if=/pattern.bin of=$D bs=1M seek=__POFF__ oflag=direct 2>/dev/null || exit 11
t1=$(now_us)
dd if=$D of=/tmp/readback bs=1M skip=__POFF__ count=__PMIB__ iflag=direct 2>/dev/null || exit 12
t2=$(now_us)
echo READBACK_MD5=$(md5 /tmp/readback)
echo PATTERN_WRITE_US=$((t1 - t0)) PATTERN_READ_US=$((t2 - t1))

t0=$(now_us)
dd if=/dev/zero of=$D bs=1M seek=__SOFF__ count=__SMIB__ oflag=direct 2>/dev/null || exit 13
t1=$(now_us)
dd if=$D of=/dev/null bs=1M skip=__SOFF__ count=__SMIB__ iflag=direct 2>/dev/null || exit 14
t2=$(now_us)
echo SPEED_WRITE_US=$((t1 - t0)) SPEED_READ_US=$((t2 - t1))

mke2fs -q -b 1024 $D __FSBLOCKS__ || exit 20
mount -t ext2 $D /mnt || exit 21
echo "__HELLO__" > /mnt/hello.txt || exit 22
cp /pattern.bin /mnt/pattern.bin || exit 23
umount /mnt || exit 24
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 $D /mnt || exit 25
echo FS_HELLO=$(cat /mnt/hello.txt)
echo FS_PATTERN_MD5=$(md5 /mnt/pattern.bin)
umount /mnt || exit 26
set -- $(cat "$S/stat")
echo SECTORS_READ=$3 SECTORS_WRITTEN=$7
"""


DATA_KEYS = ("PATTERN_WRITE_US", "PATTERN_READ_US", "SPEED_WRITE_US", "SPEED_READ_US")
"""Numbers ``DATA_SCRIPT`` prints that the throughput line needs."""


def fill(script: str, values: Mapping[str, object]) -> str:
    """Return ``script`` with each ``__KEY__`` placeholder replaced by ``values[KEY]``."""
    for key, value in values.items():
        script = script.replace(f"__{key}__", str(value))
    return script


def data_script() -> str:
    """Return ``DATA_SCRIPT`` with the disk layout filled in."""
    return fill(
        DATA_SCRIPT,
        {
            "POFF": PATTERN_OFFSET_MIB,
            "PMIB": PATTERN_MIB,
            "SOFF": SPEED_OFFSET_MIB,
            "SMIB": SPEED_MIB,
            "FSBLOCKS": FS_BLOCKS_1K,
            "HELLO": HELLO,
        },
    )


def mbps(nbytes: int, micros: str | int) -> float:
    """MB/s (10**6 bytes per second) for ``nbytes`` moved in ``micros`` microseconds."""
    return nbytes / max(int(micros), 1)


def make_image(path: Path, size: int = DISK_BYTES) -> Path:
    """Create a sparse backing file of ``size`` bytes at ``path`` and return it."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


def check_image(case: unittest.TestCase, image: Path, pattern_md5: str) -> None:
    """Check on the host what ``DATA_SCRIPT`` left in ``image``: the pattern and the ext2 fs."""
    with image.open("rb") as f:
        f.seek(PATTERN_OFFSET_MIB * MIB)
        on_disk = f.read(PATTERN_MIB * MIB)
    case.assertEqual(hashlib.md5(on_disk).hexdigest(), pattern_md5)
    if shutil.which("e2fsck"):
        fsck = subprocess.run(
            ["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False
        )
        case.assertEqual(fsck.returncode, 0, fsck.stdout + fsck.stderr)
    if shutil.which("debugfs"):
        cat = subprocess.run(
            ["debugfs", "-R", "cat /hello.txt", str(image)],
            capture_output=True,
            text=True,
            check=False,
        )
        case.assertEqual(cat.stdout.strip(), HELLO)


def require_interop(case: unittest.TestCase, reason: str | None) -> None:
    """Skip ``case`` for ``reason`` (fail under ``AOE_TWISTED_REQUIRE_INTEROP=1``); None: run."""
    if reason is None:
        return
    if os.environ.get(linuxguest.REQUIRE_ENV) == "1":
        case.fail(f"{linuxguest.REQUIRE_ENV}=1 but {reason}")
    raise unittest.SkipTest(reason)


@functools.cache
def twistd_unavailable_reason() -> str | None:
    """Say why our ``twistd aoe`` cannot be started here, or None if it can (asked once)."""
    proc = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "aoe", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0 or "--iface" not in proc.stdout:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return f"twistd aoe --help failed (rc={proc.returncode}): {' '.join(tail)}"
    return None


def log_problems(log: str) -> list[str]:
    """Return the lines of a twistd log at warn level or worse, or naming a traceback."""
    bad = []
    for line in log.splitlines():
        level = _LOG_LEVEL_RE.match(line)
        if (level and level.group(1) in _LOG_BAD_LEVELS) or any(
            word in line for word in _LOG_BAD_WORDS
        ):
            bad.append(line)
    return bad


class TwistdTarget:
    """Our ``twistd aoe`` serving one file-backed target on interface ``iface`` of ``netns``.

    ``start`` runs it inside the namespace (``ip netns exec``) and waits for
    its "serving" log line; ``stop`` sends SIGTERM and returns the exit
    status.  The whole log (stdout and stderr) is written to ``log_path``.
    """

    def __init__(
        self,
        netns: str,
        iface: str,
        image: Path,
        log_path: Path,
        shelf: int = 0,
        slot: int = 1,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.netns = netns
        self.iface = iface
        self.image = image
        self.log_path = log_path
        self.shelf = shelf
        self.slot = slot
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.mac = ""
        self.mtu = 0
        self.sectors_per_frame = 0
        self.ready_cpu_seconds = 0.0
        self.final_cpu_seconds = 0.0

    @property
    def argv(self) -> list[str]:
        """The command line, without the namespace prefix."""
        return [
            *TWISTD,
            "-n",
            "--pidfile=",
            "aoe",
            "--iface",
            self.iface,
            "--backend",
            f"file:{self.image}",
            "--shelf",
            str(self.shelf),
            "--slot",
            str(self.slot),
            *self.extra_args,
        ]

    @property
    def log(self) -> str:
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30.0, targets: int = 1) -> None:
        """
        Start the server and wait until it serves; if it does not, stop it and raise.

        ``targets``: how many "serving" lines to wait for (the ``--target``
        options are served one after the other, after the first).
        """
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log
            ready = _READY_RE.search(log)
            if ready and len(_READY_RE.findall(log)) >= targets:
                self.mac = ready.group(3)
                self.mtu = int(ready.group(4))
                self.sectors_per_frame = int(ready.group(5))
                self.ready_cpu_seconds = self.cpu_seconds()
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise linuxguest.GuestError(
            f"twistd aoe did not start serving (rc={self.proc.poll()}); log:\n{self.log}"
        )

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """User plus system CPU seconds the server has used so far (0.0 once it is gone)."""
        if self.proc is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 15.0) -> int | None:
        """Send SIGTERM, wait for the exit and return its status (None: had to SIGKILL)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.final_cpu_seconds = self.cpu_seconds()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None
        return proc.returncode

    def counters(self) -> dict[str, int]:
        """The frame counters of the server's last "stopped serving" log line ({} if none)."""
        found = _COUNTERS_RE.findall(self.log)
        if not found:
            return {}
        received, answered, malformed = (int(x) for x in found[-1])
        return {"received": received, "answered": answered, "malformed": malformed}


@dataclass
class Session:
    """What one guest session against our server produced (see ``run_session``)."""

    result: linuxguest.GuestResult
    server: TwistdTarget
    alive_after_guest: bool
    returncode: int | None
    log: str
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, str]:
        """The ``KEY=value`` pairs the guest script printed."""
        return self.result.values

    def require_values(self, case: unittest.TestCase, *keys: str) -> dict[str, str]:
        """Return ``values``; fail ``case``, quoting the console, if any of ``keys`` is empty."""
        missing = [key for key in keys if not self.result.values.get(key)]
        if missing:
            tail = "\n".join(self.result.console.splitlines()[-40:])
            case.fail(f"the guest printed no {', '.join(missing)}; console tail:\n{tail}")
        return self.result.values

    def server_cpu_seconds(self) -> float:
        """CPU seconds the server spent from serving until SIGTERM (start-up excluded)."""
        return max(0.0, self.server.final_cpu_seconds - self.server.ready_cpu_seconds)


def run_session(
    workdir: Path,
    image: Path,
    mtu: int,
    script: str,
    *,
    extra_files: Mapping[str, bytes] | None = None,
    timeout: float = 90.0,
    append: str = "",
    around_server: Callable[[linuxguest.GuestNetwork], contextlib.AbstractContextManager[object]]
    | None = None,
) -> Session:
    """Serve ``image`` with twistd on a fresh tap at ``mtu``, boot the guest, run ``script``.

    ``around_server(net)``, if given, is entered before the server starts and
    left after it has stopped (``tests/test_tshark.py`` captures there).
    ``append`` is added to the guest kernel's command line (after
    ``loglevel=1``: kernel warnings, e.g. about timing under TCG on a busy
    host, would otherwise land in the middle of the script's output lines;
    ``dmesg`` still has them).
    The guest's console goes to ``workdir/console.log``, the server's log to
    ``workdir/twistd.log``.
    """
    with linuxguest.GuestNetwork(mtu=mtu) as net:
        around = around_server(net) if around_server else contextlib.nullcontext()
        with around:
            server = TwistdTarget(net.netns, net.tap, image, workdir / "twistd.log")
            try:
                server.start()
                result = net.boot(
                    script,
                    timeout=timeout,
                    extra_files=extra_files,
                    console_log=workdir / "console.log",
                    append=f"{_GUEST_CMDLINE} {append}".strip(),
                )
                alive = server.alive()
            finally:
                returncode = server.stop()
    return Session(
        result=result,
        server=server,
        alive_after_guest=alive,
        returncode=returncode,
        log=server.log,
        counters=server.counters(),
    )


def check_server_clean(case: unittest.TestCase, session: Session) -> None:
    """Assert the server outlived the guest, stopped cleanly on SIGTERM and logged no problem."""
    log = session.log
    case.assertTrue(session.alive_after_guest, f"twistd exited during the session; log:\n{log}")
    # twistd ends its clean shutdown by re-raising the signal that stopped it.
    case.assertIn(
        session.returncode,
        (0, -signal.SIGTERM),
        f"twistd did not stop cleanly on SIGTERM:\n{log}",
    )
    case.assertEqual(log_problems(log), [], f"twistd logged problems:\n{log}")
    case.assertIn("Server Shut Down.", log)
    counters = session.counters
    case.assertTrue(counters, f"no 'stopped serving' counters in the log:\n{log}")
    case.assertEqual(counters["malformed"], 0, counters)
    # Every frame the initiator sent (config queries, ATA commands) got an answer.
    case.assertEqual(counters["answered"], counters["received"], counters)


class InteropTestCase(unittest.TestCase):
    """Skip unless the guest and our twistd plugin can run (fail if interop is required)."""

    def setUp(self) -> None:
        linuxguest.skip_unless_available()
        require_interop(self, twistd_unavailable_reason())

    def workdir(self) -> Path:
        """Return a fresh directory for this test's files."""
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path


class LinuxInitiatorTests(InteropTestCase):
    """The Linux initiator in a QEMU guest uses our twistd target correctly."""

    def _exercise(self, mtu: int) -> None:
        """Run ``DATA_SCRIPT`` against twistd at ``mtu`` and check guest, file and server."""
        workdir = self.workdir()
        image = make_image(workdir / "disk.img")
        pattern = random.Random(0xA0E).randbytes(PATTERN_MIB * MIB)
        pattern_md5 = hashlib.md5(pattern).hexdigest()

        session = run_session(
            workdir, image, mtu, data_script(), extra_files={"/pattern.bin": pattern}
        )
        session.result.check()
        check_server_clean(self, session)
        v = session.require_values(
            self, *DATA_KEYS, "SIZE", "PAYLOAD", "MAC", "SECTORS_READ", "SECTORS_WRITTEN"
        )

        self.assertEqual(session.server.sectors_per_frame, EXPECTED_PAYLOAD[mtu] // SECTOR)
        self.assertEqual(int(v["SIZE"]) * SECTOR, image.stat().st_size)
        self.assertEqual(v["PAYLOAD"], str(EXPECTED_PAYLOAD[mtu]))
        self.assertEqual(v["NETIF"], "eth0")
        self.assertEqual(v["MAC"], session.server.mac.replace(":", ""))
        self.assertEqual(v["STATE"], "up")
        self.assertEqual(v["PATTERN_MD5"], pattern_md5)
        self.assertEqual(v["READBACK_MD5"], pattern_md5)
        self.assertEqual(v["FS_HELLO"], HELLO)
        self.assertEqual(v["FS_PATTERN_MD5"], pattern_md5)

        check_image(self, image, pattern_md5)
        self.assertEqual(image.stat().st_size, DISK_BYTES, "the backing file changed size")

        result = session.result
        moved = (int(v["SECTORS_READ"]) + int(v["SECTORS_WRITTEN"])) * SECTOR
        cpu = session.server_cpu_seconds()
        print(
            f"\n  [linux initiator, twistd aoe, mtu={mtu}] boot {result.boot_seconds:.1f}s,"
            f" script {result.script_seconds:.1f}s, qemu {result.total_seconds:.1f}s;"
            f" direct I/O {SPEED_MIB} MiB write"
            f" {mbps(SPEED_MIB * MIB, v['SPEED_WRITE_US']):.0f} MB/s,"
            f" read {mbps(SPEED_MIB * MIB, v['SPEED_READ_US']):.0f} MB/s;"
            f" {PATTERN_MIB} MiB pattern write"
            f" {mbps(PATTERN_MIB * MIB, v['PATTERN_WRITE_US']):.0f} MB/s,"
            f" read {mbps(PATTERN_MIB * MIB, v['PATTERN_READ_US']):.0f} MB/s;"
            f" server CPU {cpu:.2f}s for {moved / MIB:.0f} MiB"
            f" ({cpu / max(moved, 1) * 1e9:.1f} s/GB)",
            flush=True,
        )

    def test_mtu1500(self) -> None:
        """At MTU 1500: the file's exact size, 2-sector (1024-byte) frames, intact data and fs."""
        self._exercise(1500)

    def test_mtu9000(self) -> None:
        """At MTU 9000 (jumbo frames): 17-sector (8704-byte) frames, intact data and fs."""
        self._exercise(9000)


SESSION_SCRIPT = r"""
D=/dev/etherd/e0.1
S='/sys/block/etherd!e0.1'
md5() { set -- $(md5sum "$1"); echo "$1"; }
aoe_wait_disk e0.1 20 || exit 10
SIZE=$(cat "$S/size")
echo SIZE=$SIZE
# The last 8 sectors, through the page cache: LBAs right at the end of the disk.
dd if=/tail.bin of=$D bs=512 seek=$((SIZE - 8)) 2>/dev/null || exit 11
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=$D of=/tmp/tail bs=512 skip=$((SIZE - 8)) count=8 2>/dev/null || exit 12
echo TAIL1_MD5=$(md5 /tmp/tail)
# Rediscovery and revalidation: config queries and IDENTIFYs while in use.
for i in 1 2 3; do
    echo > /dev/etherd/discover
    echo e0.1 > /dev/etherd/revalidate
    dd if=$D of=/dev/null bs=4096 count=4 skip=$i 2>/dev/null || exit 13
done
usleep 300000
echo STATE1=$(cat "$S/state")
# Unload and reload the driver: it forgets the target and discovers it again.
rmmod aoe || exit 14
insmod /lib/modules/aoe.ko aoe_iflist=eth0 || exit 15
aoe_wait_disk e0.1 20 || exit 16
echo SIZE2=$(cat "$S/size")
dd if=$D of=/tmp/tail2 bs=512 skip=$((SIZE - 8)) count=8 2>/dev/null || exit 17
echo TAIL2_MD5=$(md5 /tmp/tail2)
echo STATE2=$(cat "$S/state")
"""


class ServerSessionTests(InteropTestCase):
    """Our server survives everything a Linux initiator does in a session."""

    def test_whole_session(self) -> None:
        """
        Writes at the disk's last LBAs, rediscovery, revalidation and a driver
        reload leave the server running, answering every frame, and its log
        free of warnings, errors and tracebacks; SIGTERM then stops it with
        status 0 (or the signal re-raised, as twistd does).
        """
        workdir = self.workdir()
        image = make_image(workdir / "disk.img")
        tail = random.Random(0x7A11).randbytes(8 * SECTOR)
        tail_md5 = hashlib.md5(tail).hexdigest()

        session = run_session(
            workdir, image, 1500, SESSION_SCRIPT, extra_files={"/tail.bin": tail}, timeout=60
        )
        session.result.check()
        check_server_clean(self, session)
        v = session.require_values(self, "SIZE", "SIZE2")
        self.assertEqual(int(v["SIZE"]) * SECTOR, image.stat().st_size)
        self.assertEqual(v["SIZE2"], v["SIZE"])
        self.assertEqual(v["TAIL1_MD5"], tail_md5)
        self.assertEqual(v["TAIL2_MD5"], tail_md5)
        self.assertEqual(v["STATE1"], "up")
        self.assertEqual(v["STATE2"], "up")
        with image.open("rb") as f:
            f.seek(DISK_BYTES - len(tail))
            self.assertEqual(hashlib.md5(f.read()).hexdigest(), tail_md5)
        self.assertEqual(image.stat().st_size, DISK_BYTES, "the backing file changed size")
        print(
            f"\n  [linux initiator session, twistd aoe] qemu {session.result.total_seconds:.1f}s;"
            f" server {session.counters}",
            flush=True,
        )
