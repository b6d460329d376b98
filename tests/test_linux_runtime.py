"""
Targets added and removed at run time, seen by the real Linux AoE initiator (issue #12).

One QEMU guest (Debian's ``aoe.ko``, see ``tests/linuxguest.py``) on a tap
in a test-made namespace, against ``twistd aoe --config FILE`` serving
``e1.0`` and listening on a control socket.  The guest runs all phases in
one boot; at each ``@@MP-SYNC name@@`` marker it waits for the host's
``go`` on the serial console (``SerialGuest`` of
``tests/test_linux_multipath.py``), so the host changes the server at
exactly that point:

1. ``add``: the host runs ``aoe-twisted ctl add 2.0=file:IMAGE``.  The new
   target is asked about on the segment for ``duplicate_wait`` seconds, then
   served and announced with a broadcast config reply: the guest waits
   ``ANNOUNCE_WAIT`` seconds for ``/dev/etherd/e2.0`` to appear by itself
   (``ADD2_HOW=announce``), and only then falls back to
   ``echo > /dev/etherd/discover`` (``ADD2_HOW=discover``, a failure here).
   It checks the size, writes and reads back a random pattern with direct
   I/O; the host finds the pattern in the image.
2. ``remove-grace``: ``e2.0`` holds a mounted ext2 file system with a dirty
   (unwritten) file, and a loop of direct reads of ``e2.0`` is running, when
   the host runs ``ctl remove 2.0`` (``removed_grace = GRACE_SECONDS``).  The
   server answers the driver's ATA requests to the removed address with
   ``ERR``/``ABRT``; the driver fails the bio at once, so the reading ``dd``
   ends with an I/O error within ``ERROR_BOUND`` seconds although the guest's
   ``aoe_deadsecs`` is the default (180 s); ``umount`` (whose write-back
   fails), a new read and a new write end within the bound too.  Meanwhile
   the guest answers: it keeps reading ``e1.0``, which keeps serving.
3. ``silent``: for comparison, the host restarts the server with
   ``removed_grace = 0`` (a restart: ``ctl reload`` does not yet change the
   grace of a running server) and adds ``3.0=memory:16M``; the guest sets
   ``aoe_deadsecs`` to ``DEADSECS`` (a module parameter, writable in sysfs)
   and reads ``e3.0`` in a loop; the host removes it.  Now the address is
   silent: the driver retransmits until ``aoe_deadsecs`` has passed, and only
   then fails the device (state ``down``) and the ``dd``.  The test checks it
   blocked at least that long: without the grace, I/O to a removed disk
   (and a ``umount`` of it) hangs for ``aoe_deadsecs``, 180 s by default.

The figures (discovery time, time to the I/O error with and without the
grace) are printed.  Skips (or fails under ``AOE_TWISTED_REQUIRE_INTEROP=1``)
like ``tests/test_linux_initiator.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import linuxguest
from tests.test_linux_initiator import (
    TWISTD,
    InteropTestCase,
    TwistdTarget,
    fill,
    log_problems,
    make_image,
)
from tests.test_linux_multipath import SerialGuest

MIB = 1024 * 1024
SECTOR = 512
MTU = 1500
DISK_MIB = 16
PATTERN_MIB = 4
FS_MIB = 8
"""The ext2 file system on ``e2.0`` covers the first 8 MiB; the pattern follows it."""

GRACE_SECONDS = 60
"""``removed_grace`` of the first server: longer than anything the guest does after removal."""
DUPLICATE_WAIT = 0.2
"""``duplicate_wait``: seconds a new target is asked about before it is served."""
ANNOUNCE_WAIT = 8
"""Seconds the guest waits for an added target to appear without ``/dev/etherd/discover``."""
ERROR_BOUND = 10
"""Seconds within which a read of a removed target must fail during the grace."""
DEADSECS = 8
"""The guest's ``aoe_deadsecs`` for the silent case (the driver's default is 180)."""
SILENT_BOUND = DEADSECS + 30
"""Seconds the guest waits for the read of a silently removed target to end."""

GUEST_SCRIPT = r"""
D1=/dev/etherd/e1.0
D2=/dev/etherd/e2.0
D3=/dev/etherd/e3.0
md5() { set -- $(md5sum "$1"); echo "$1"; }
sync_host() {
    echo "@@MP-SYNC $1@@"
    read -t 120 _go || { echo "no go from the host at $1" >&2; exit 90; }
}
# appear eX.Y PREFIX: wait for an added target, first without asking, then asking.
appear() {
    t0=$(now_us); n=0
    while [ ! -b /dev/etherd/$1 ] && [ $n -lt __ANNOUNCE_TENTHS__ ]; do
        usleep 100000; n=$((n + 1))
    done
    if [ -b /dev/etherd/$1 ]; then echo $2_HOW=announce
    else echo $2_HOW=discover; aoe_wait_disk $1 10 || return 1; fi
    echo $2_APPEAR_US=$(( $(now_us) - t0 ))
}
# reader DEV TAG: read DEV with direct I/O, again and again, until a read fails.
reader() {
    n=0
    while :; do
        dd if=$1 of=/dev/null bs=64k count=16 iflag=direct 2>/tmp/$2.err
        rc=$?
        [ $rc -eq 0 ] || break
        n=$((n + 1)); echo $n > /tmp/$2.n
    done
    now_us > /tmp/$2.end
    echo $rc > /tmp/$2.rc
}
# gone TAG SECONDS PREFIX: once the host has removed the target, wait (at
# most SECONDS) for reader TAG to end, and read e1.0 meanwhile (the guest
# answers, the other target serves): 5 times at least.  The time to the
# end is counted from the sync marker ($ts, before the host ran ctl remove:
# an upper bound) and from the host's go ($tg, after it: a lower bound).
gone() {
    k=0; ok=0; lim=$(( $2 * 10 ))
    while [ $k -lt $lim ]; do
        if [ -e /tmp/$1.rc ] && [ $k -ge 5 ]; then break; fi
        dd if=$D1 of=/dev/null bs=4k count=1 skip=$k iflag=direct 2>/dev/null && ok=$((ok + 1))
        usleep 100000; k=$((k + 1))
    done
    echo $3_E1_READS=$ok $3_READS_BEFORE=$(cat /tmp/$1.n)
    if [ -e /tmp/$1.rc ]; then
        end=$(cat /tmp/$1.end)
        echo $3_RC=$(cat /tmp/$1.rc) $3_SYNC_US=$((end - ts)) $3_GO_US=$((end - tg))
        echo "$3_ERR=$(head -n 1 /tmp/$1.err | tr ' ' _)"
    else
        end=$(now_us)
        echo $3_RC=hung $3_SYNC_US=$((end - ts)) $3_GO_US=$((end - tg))
    fi
}
# timed PREFIX COMMAND...: run COMMAND, print its status and run time.
timed() {
    _p=$1; shift; _t=$(now_us)
    "$@" >/dev/null 2>/tmp/timed.err
    _rc=$?
    echo ${_p}_RC=$_rc ${_p}_US=$(( $(now_us) - _t ))
}

insmod /lib/modules/aoe.ko aoe_iflist=eth0 || exit 4
aoe_wait_disk e1.0 20 || exit 10
echo DEADSECS0=$(cat /sys/module/aoe/parameters/aoe_deadsecs)
[ ! -e $D2 ] || exit 11

# 1. A target added at run time: the pattern after the first __FSMIB__ MiB.
sync_host add
appear e2.0 ADD2 || exit 20
echo SIZE2=$(cat '/sys/block/etherd!e2.0/size')
dd if=/dev/urandom of=/tmp/p2 bs=1M count=__PMIB__ 2>/dev/null || exit 21
echo P2_MD5=$(md5 /tmp/p2)
dd if=/tmp/p2 of=$D2 bs=1M seek=__FSMIB__ oflag=direct 2>/dev/null || exit 22
dd if=$D2 of=/tmp/r2 bs=1M skip=__FSMIB__ count=__PMIB__ iflag=direct 2>/dev/null || exit 23
echo R2_MD5=$(md5 /tmp/r2)
rm /tmp/p2 /tmp/r2

# 2. Removed during the grace, mounted, with dirty data and reads under way:
# the reads fail at once, and so do later reads and writes; umount ends.
mke2fs -q -b 1024 $D2 $((__FSMIB__ * 1024)) || exit 24
mount -t ext2 $D2 /mnt || exit 25
echo hello > /mnt/hello || exit 26
sync
reader $D2 g &
wait_for_path /tmp/g.n 20 || exit 30
dd if=/dev/urandom of=/mnt/dirty bs=64k count=16 2>/dev/null || exit 31
ts=$(now_us)
sync_host remove-grace
tg=$(now_us)
gone g __ERROR_BOUND__ GRACE
[ ! -e /tmp/g.rc ] || wait
timed UMOUNT umount /mnt
echo UMOUNT_WRITE_ERRORS=$(dmesg | grep -c 'ata error cmd=34h .* from e2.0')
timed AGAIN_READ dd if=$D2 of=/dev/null bs=4k count=1 iflag=direct
timed AGAIN_WRITE dd if=/dev/zero of=$D2 bs=4k count=1 seek=5000 oflag=direct
echo STATE2=$(cat '/sys/block/etherd!e2.0/state')

# 3. Removed with no grace: the address is silent.
sync_host silent
echo __DEADSECS__ > /sys/module/aoe/parameters/aoe_deadsecs || exit 40
echo DEADSECS1=$(cat /sys/module/aoe/parameters/aoe_deadsecs)
appear e3.0 ADD3 || exit 41
reader $D3 s &
wait_for_path /tmp/s.n 20 || exit 42
ts=$(now_us)
sync_host remove-silent
tg=$(now_us)
gone s __SILENT_BOUND__ SILENT
echo STATE3=$(cat '/sys/block/etherd!e3.0/state')
echo STATE1=$(cat '/sys/block/etherd!e1.0/state')
dmesg | grep -i aoe | tail -n 8 | sed 's/^/dmesg: /'
"""


def guest_script() -> str:
    """Return ``GUEST_SCRIPT`` with the sizes and bounds filled in."""
    return fill(
        GUEST_SCRIPT,
        {
            "ANNOUNCE_TENTHS": ANNOUNCE_WAIT * 10,
            "PMIB": PATTERN_MIB,
            "FSMIB": FS_MIB,
            "ERROR_BOUND": ERROR_BOUND,
            "DEADSECS": DEADSECS,
            "SILENT_BOUND": SILENT_BOUND,
        },
    )


def write_config(path: Path, tap: str, control: str, image: Path, grace: float) -> None:
    """Write the server's config file: ``e1.0`` on ``image``, the control socket, ``grace``."""
    path.write_text(
        "[server]\n"
        f"interfaces = [{json.dumps(tap)}]\n"
        f"control = {json.dumps(control)}\n"
        f"removed_grace = {grace}\n"
        f"duplicate_wait = {DUPLICATE_WAIT}\n"
        "\n[[target]]\n"
        'address = "1.0"\n'
        f"backend = {json.dumps(f'file:{image}')}\n"
    )


class ConfigTwistd(TwistdTarget):
    """``TwistdTarget`` started as ``twistd -n aoe --config FILE``."""

    def __init__(self, netns: str, config: Path, image: Path, log_path: Path) -> None:
        super().__init__(netns, "", image, log_path)
        self.config = config

    @property
    def argv(self) -> list[str]:
        """The command line, without the namespace prefix."""
        return [*TWISTD, "-n", "--pidfile=", "aoe", "--config", str(self.config)]


class OneNicGuest(SerialGuest):
    """``SerialGuest`` with one virtio NIC, on the network's only tap."""

    def argv(self, kernel: linuxguest.Kernel, initrd: Path) -> list[str]:
        """The QEMU command line: ``run_guest``'s, answering on the serial console."""
        cmdline = "console=ttyS0 panic=-1 mitigations=off quiet loglevel=1"
        net = self.net
        return [
            linuxguest.QEMU, "-accel", "tcg", "-m", "512", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel.image), "-initrd", str(initrd), "-append", cmdline,
            "-netdev", f"tap,id=n0,ifname={net.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={linuxguest.DEFAULT_GUEST_MAC},host_mtu={net.mtu}",
        ]  # fmt: skip


def ctl(socket: str, *argv: str) -> tuple[str, float]:
    """Run ``aoe-twisted ctl --socket SOCKET ARGV``; return its output and how long it took."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "aoe_twisted", "ctl", "--socket", socket, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise linuxguest.GuestError(
            f"ctl {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout, time.monotonic() - started


def seconds(values: dict[str, str], key: str) -> float:
    """The guest's microsecond figure ``key`` in seconds."""
    return int(values[key]) / 1e6


class LinuxRuntimeTests(InteropTestCase):
    """The Linux initiator sees targets added at run time and does not hang on removed ones."""

    def control_directory(self) -> str:
        """A short private directory for the control socket (at most 107 bytes of path)."""
        directory = tempfile.mkdtemp(prefix="aoert-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        return directory

    def test_add_and_remove_at_run_time(self) -> None:
        """
        A target added with ``ctl add`` appears in the guest by itself (the
        server's announcement), with its size, and keeps what is written to
        it.  Removed with ``ctl remove`` while the guest reads it, the read
        fails with an I/O error within ``ERROR_BOUND`` seconds (with the
        driver's default ``aoe_deadsecs``), while the guest keeps reading the
        other target.  With ``removed_grace = 0`` the same read blocks for
        the guest's ``aoe_deadsecs`` instead.
        """
        # Absolute paths: ``ctl add`` hands its backend path to the server to open.
        workdir = self.workdir().resolve()
        image1 = make_image(workdir / "disk1.img", DISK_MIB * MIB)
        image2 = make_image(workdir / "disk2.img", DISK_MIB * MIB)
        socket = str(Path(self.control_directory()) / "control.sock")
        config = workdir / "aoe.toml"
        started = time.monotonic()
        marks: dict[str, float] = {}
        replies: dict[str, str] = {}
        servers: list[ConfigTwistd] = []
        returncodes: list[int | None] = []
        with linuxguest.GuestNetwork(mtu=MTU) as net:
            write_config(config, net.tap, socket, image1, GRACE_SECONDS)
            servers.append(ConfigTwistd(net.netns, config, image1, workdir / "twistd1.log"))
            guest = OneNicGuest(net, workdir)  # type: ignore[arg-type]  # one tap is enough

            def on_sync(name: str) -> str:
                marks[name] = time.monotonic() - started
                if name == "add":
                    replies[name], marks["ctl-add"] = ctl(socket, "add", f"2.0=file:{image2}")
                elif name == "remove-grace":
                    replies[name], marks["ctl-remove"] = ctl(socket, "remove", "2.0")
                elif name == "silent":
                    returncodes.append(servers[-1].stop())
                    write_config(config, net.tap, socket, image1, 0)
                    servers.append(ConfigTwistd(net.netns, config, image1, workdir / "twistd2.log"))
                    servers[-1].start()
                    replies[name], _ = ctl(socket, "add", "3.0=memory:16M")
                elif name == "remove-silent":
                    replies[name], _ = ctl(socket, "remove", "3.0")
                return "go"

            try:
                servers[0].start()
                code = guest.run(guest_script(), on_sync, timeout=240)
                alive = servers[-1].alive()
            finally:
                returncodes.append(servers[-1].stop())
        total = time.monotonic() - started
        logs = [server.log for server in servers]
        if code != 0:
            self.fail(f"guest script exited {code}; console tail:\n{guest.tail()}\n{logs[-1]}")
        v = guest.values()

        # Both servers ran the whole session, stopped cleanly and logged no problem.
        self.assertTrue(alive, f"twistd exited during the session; log:\n{logs[-1]}")
        self.assertEqual(len(returncodes), 2)
        for returncode, log in zip(returncodes, logs, strict=True):
            self.assertIn(returncode, (0, -signal.SIGTERM), log)
            self.assertEqual(log_problems(log), [], log)

        # 1. The added target appeared by itself, with its size and data.
        self.assertEqual(v["DEADSECS0"], "180")
        self.assertEqual(v["ADD2_HOW"], "announce", "the guest had to ask for the added target")
        self.assertEqual(int(v["SIZE2"]) * SECTOR, DISK_MIB * MIB)
        self.assertEqual(v["R2_MD5"], v["P2_MD5"])
        with image2.open("rb") as f:
            f.seek(FS_MIB * MIB)
            self.assertEqual(hashlib.md5(f.read(PATTERN_MIB * MIB)).hexdigest(), v["P2_MD5"])
        self.assertIn("serving e2.0", logs[0])

        # 2. Removed during the grace: an I/O error, promptly (the time from
        # the guest's sync marker, before ctl remove even started, bounds it);
        # umount, a new read and a new write end promptly too; the guest
        # answered and e1.0 kept serving.
        self.assertIn("removed e2.0", logs[0])
        self.assertIn("removed e2.0", replies["remove-grace"])
        self.assertNotEqual(v["GRACE_RC"], "hung", f"the read of e2.0 did not end: {v}")
        self.assertNotEqual(v["GRACE_RC"], "0")
        self.assertIn("Input/output_error", v["GRACE_ERR"])
        self.assertLess(seconds(v, "GRACE_SYNC_US"), ERROR_BOUND)
        self.assertGreater(int(v["GRACE_READS_BEFORE"]), 0)
        self.assertGreaterEqual(int(v["GRACE_E1_READS"]), 5, "e1.0 not read after the removal")
        self.assertLess(seconds(v, "UMOUNT_US"), ERROR_BOUND)
        # ...having written the dirty file back: answered with ATA errors (WRITE EXT, 34h).
        self.assertGreater(int(v["UMOUNT_WRITE_ERRORS"]), 0)
        for op in ("AGAIN_READ", "AGAIN_WRITE"):
            self.assertNotEqual(v[f"{op}_RC"], "0", op)
            self.assertLess(seconds(v, f"{op}_US"), ERROR_BOUND, op)
        self.assertEqual(v["STATE2"], "up")

        # 3. Removed with no grace: the read blocks until aoe_deadsecs (the
        # time from the host's go, after ctl remove, bounds it from below),
        # then the driver fails the device and the read.
        self.assertEqual(v["DEADSECS1"], str(DEADSECS))
        self.assertEqual(v["ADD3_HOW"], "announce", "the guest had to ask for the added target")
        self.assertIn("removed e3.0", logs[1])
        self.assertNotEqual(v["SILENT_RC"], "hung", f"the read of e3.0 did not end: {v}")
        self.assertNotEqual(v["SILENT_RC"], "0")
        self.assertGreaterEqual(seconds(v, "SILENT_GO_US"), DEADSECS - 1)
        self.assertGreaterEqual(int(v["SILENT_E1_READS"]), 5, "e1.0 not read after the removal")
        self.assertEqual(v["STATE3"], "down")
        self.assertEqual(v["STATE1"], "up")

        print(
            f"\n  [linux runtime] total {total:.1f}s; ctl add e2.0 took {marks['ctl-add']:.2f}s,"
            f" e2.0 appeared {seconds(v, 'ADD2_APPEAR_US'):.2f}s after it ({v['ADD2_HOW']}),"
            f" e3.0 {seconds(v, 'ADD3_APPEAR_US'):.2f}s ({v['ADD3_HOW']});"
            f"\n  removed during the grace ({GRACE_SECONDS}s; guest aoe_deadsecs"
            f" {v['DEADSECS0']}): the read failed at most {seconds(v, 'GRACE_SYNC_US'):.2f}s"
            f" after ctl remove started (ctl took {marks['ctl-remove']:.2f}s;"
            f" {seconds(v, 'GRACE_GO_US'):+.2f}s from the host's go reaching the guest;"
            f" {v['GRACE_ERR']}); then umount rc {v['UMOUNT_RC']} in"
            f" {seconds(v, 'UMOUNT_US'):.2f}s ({v['UMOUNT_WRITE_ERRORS']} write errors), a read rc"
            f" {v['AGAIN_READ_RC']} in {seconds(v, 'AGAIN_READ_US'):.3f}s, a write rc"
            f" {v['AGAIN_WRITE_RC']} in {seconds(v, 'AGAIN_WRITE_US'):.3f}s;"
            f" {v['GRACE_E1_READS']} reads of e1.0 meanwhile;"
            f"\n  removed with removed_grace = 0 (guest aoe_deadsecs {v['DEADSECS1']}):"
            f" the read failed {seconds(v, 'SILENT_GO_US'):.2f}s after ctl remove returned"
            f" ({seconds(v, 'SILENT_SYNC_US'):.2f}s after it was asked for;"
            f" {v.get('SILENT_ERR', '-')}), e3.0 then {v['STATE3']};"
            f" {v['SILENT_E1_READS']} reads of e1.0 meanwhile",
            flush=True,
        )
