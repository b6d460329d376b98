"""
Multipath with the real Linux AoE initiator (issue #11): two NICs, one target, a failover.

One QEMU guest (Debian's ``aoe.ko``, see ``tests/linuxguest.py``) has two
virtio NICs, ``eth0`` and ``eth1``, on two taps ``A`` and ``B`` in one private
network namespace: two separate Ethernet segments.  One ``twistd -n aoe
--iface A --iface B`` in that namespace serves one file-backed target on
both, each tap with its own MAC.  The guest loads ``aoe.ko`` on both NICs and
runs all phases in one boot; at each ``@@MP-SYNC name@@`` marker it prints,
it waits for the host to answer ``go`` on the serial console, so the host
can read the taps' frame counters and take a link down or up at exactly
that point:

1. ``paths``: the driver knows the target through both server MACs (its
   debugfs file ``/sys/kernel/debug/aoe/e0.1`` lists one block per MAC with
   its window, taint, read and write frame counts and local interfaces).
2. ``p1``: a pseudo-random pattern written with direct I/O and read back is
   intact; frames went through both taps.
3. ``failover``: a longer direct write is started in the background, and
   the host takes tap ``A`` down in the middle of it.  The write completes
   (the driver retries the lost frames, then taints the silent path and
   moves them to the other one), the data read back and the image on the
   host are intact.
4. ``up``: the host brings ``A`` up again; the server serves on it again
   and, during another transfer, frames flow through ``A`` again.

Skips (or fails under ``AOE_TWISTED_REQUIRE_INTEROP=1``) like
``tests/test_linux_initiator.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import linuxguest
from tests.test_linux_initiator import InteropTestCase, TwistdTarget, log_problems, make_image

MIB = 1024 * 1024
SECTOR = 512
MTU = 1500
GUEST_MACS = ("52:54:00:a0:e0:01", "52:54:00:a0:e0:02")

DISK_MIB = 96
P1_OFFSET_MIB, P1_MIB = 0, 8
FAILOVER_OFFSET_MIB, FAILOVER_MIB = 16, 48
P3_OFFSET_MIB, P3_MIB = 72, 8

_SYNC_RE = re.compile(r"@@MP-SYNC (\S+)@@")
_END_RE = re.compile(r"@@AOE-GUEST-END rc=(\d+)@@")
_BEGIN = "@@AOE-GUEST-BEGIN@@"
_SERVING_RE = re.compile(r"serving e0\.1 .* on (\S+) \(([0-9a-f:]{17}), MTU (\d+)")
_STOPPED_RE = re.compile(
    r"stopped serving on (\S+): (\d+) frames received, (\d+) answered, (\d+) malformed"
)

GUEST_SCRIPT = r"""
D=/dev/etherd/e0.1
DBG=/sys/kernel/debug/aoe/e0.1
md5() { set -- $(md5sum "$1"); echo "$1"; }
# Tell the host where we are, then wait for its "go" on the console.
sync_host() {
    echo "@@MP-SYNC $1@@"
    read -t 60 _go || { echo "no go from the host at $1" >&2; exit 90; }
}
# One line per server MAC: mac:nout:maxout:nframes taint r w interfaces.
paths() {
    awk '/^[0-9a-f]+:[0-9]+:[0-9]+:[0-9]+$/ {if (p) print p; p = $0; next}
         /taint:/ {p = p " " $1} /^\tr:/ {p = p " " $1} /^\tw:/ {p = p " " $1}
         /^\t[a-z]/ && !/:/ {p = p " if:" $1}
         END {if (p) print p}' $DBG
}
mount -t debugfs none /sys/kernel/debug || exit 2
ip link set eth1 mtu __MTU__ up || exit 3
insmod /lib/modules/aoe.ko aoe_iflist=eth0,eth1 || exit 4
aoe_wait_disk e0.1 20 || exit 10
# Both server MACs answer the config query; ask again until both are known.
n=0
while [ "$(paths | wc -l)" -lt 2 ] && [ $n -lt 50 ]; do
    if [ $((n % 10)) -eq 0 ]; then echo > /dev/etherd/discover; fi
    n=$((n + 1)); usleep 100000
done
echo NETIF=$(cat '/sys/block/etherd!e0.1/netif') PAYLOAD=$(cat '/sys/block/etherd!e0.1/payload')
paths | sed 's/^/PATH0 /'
sync_host paths

dd if=/dev/urandom of=/tmp/p1 bs=1M count=__P1MIB__ 2>/dev/null || exit 11
echo P1_MD5=$(md5 /tmp/p1)
dd if=/tmp/p1 of=$D bs=1M seek=__P1OFF__ oflag=direct 2>/dev/null || exit 12
dd if=$D of=/tmp/r1 bs=1M skip=__P1OFF__ count=__P1MIB__ iflag=direct 2>/dev/null || exit 13
echo P1_READ_MD5=$(md5 /tmp/r1)
rm /tmp/r1
paths | sed 's/^/PATH1 /'
sync_host p1

dd if=/dev/urandom of=/tmp/p2 bs=1M count=__FMIB__ 2>/dev/null || exit 21
echo FAILOVER_MD5=$(md5 /tmp/p2)
t0=$(now_us)
dd if=/tmp/p2 of=$D bs=1M seek=__FOFF__ oflag=direct 2>/dev/null &
pid=$!
sync_host failover
wait $pid
echo FAILOVER_DD_RC=$?
t1=$(now_us)
echo FAILOVER_US=$((t1 - t0))
paths | sed 's/^/PATH2 /'
rm /tmp/p2
dd if=$D of=/tmp/r2 bs=1M skip=__FOFF__ count=__FMIB__ iflag=direct 2>/dev/null || exit 22
echo FAILOVER_READ_MD5=$(md5 /tmp/r2)
rm /tmp/r2
sync_host down-done

# The link is back: write and read until the path through it carries frames again.
dd if=/dev/urandom of=/tmp/p3 bs=1M count=__P3MIB__ 2>/dev/null || exit 31
echo P3_MD5=$(md5 /tmp/p3)
t0=$(now_us)
i=0
while [ $i -lt 6 ]; do
    dd if=/tmp/p3 of=$D bs=1M seek=__P3OFF__ oflag=direct 2>/dev/null || exit 32
    dd if=$D of=/tmp/r3 bs=1M skip=__P3OFF__ count=__P3MIB__ iflag=direct 2>/dev/null || exit 33
    i=$((i + 1))
    sync_host "p3-$i"
    read -t 60 again || exit 91
    [ "$again" = more ] || break
done
t1=$(now_us)
echo P3_ROUNDS=$i P3_US=$((t1 - t0))
echo P3_READ_MD5=$(md5 /tmp/r3)
paths | sed 's/^/PATH3 /'
echo STATE=$(cat '/sys/block/etherd!e0.1/state')
"""


def guest_script() -> str:
    """Return ``GUEST_SCRIPT`` with the sizes and offsets filled in."""
    values = {
        "MTU": MTU,
        "P1OFF": P1_OFFSET_MIB,
        "P1MIB": P1_MIB,
        "FOFF": FAILOVER_OFFSET_MIB,
        "FMIB": FAILOVER_MIB,
        "P3OFF": P3_OFFSET_MIB,
        "P3MIB": P3_MIB,
    }
    script = GUEST_SCRIPT
    for key, value in values.items():
        script = script.replace(f"__{key}__", str(value))
    return script


class TwoTapNetwork(linuxguest.GuestNetwork):
    """``GuestNetwork`` with a second tap, ``tap2``, in the same namespace (its own segment)."""

    def __init__(self, mtu: int = 1500) -> None:
        super().__init__(mtu)
        self.tap2 = self.tap.replace("aoetap", "aoetbp")

    def open(self) -> None:
        """Create the namespace, the first tap (``GuestNetwork.open``) and the second."""
        super().open()
        try:
            self._ip("-n", self.netns, "tuntap", "add", "dev", self.tap2, "mode", "tap")
            self._ip("-n", self.netns, "link", "set", self.tap2, "mtu", str(self.mtu), "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete the second tap, then everything ``GuestNetwork.close`` deletes."""
        if self._created:
            subprocess.run(
                ["ip", "-n", self.netns, "link", "del", self.tap2], capture_output=True, check=False
            )
        super().close()

    def link(self, tap: str, state: str) -> None:
        """``ip link set TAP STATE`` inside the namespace (the server's side of a path)."""
        self._ip("-n", self.netns, "link", "set", tap, state)

    def rx_frames(self, tap: str) -> int:
        """Frames the tap received from the guest (its kernel RX packet counter)."""
        proc = subprocess.run(
            ["ip", "-n", self.netns, "-s", "-j", "link", "show", "dev", tap],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(json.loads(proc.stdout)[0]["stats64"]["rx"]["packets"])


class SerialGuest:
    """QEMU with two NICs (one per tap), whose serial console the host reads and writes.

    ``run`` calls ``on_sync(name)`` (in the calling thread) for each
    ``@@MP-SYNC name@@`` line the guest prints and sends what it returns, plus
    a newline, to the guest's console, where the script is waiting to read it.
    """

    def __init__(self, net: TwoTapNetwork, workdir: Path) -> None:
        self.net = net
        self.workdir = workdir
        self.lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, kernel: linuxguest.Kernel, initrd: Path) -> list[str]:
        """The QEMU command line: ``run_guest``'s, with a second virtio NIC on ``tap2``."""
        # loglevel=1: kernel warnings would land in the middle of the script's lines.
        cmdline = "console=ttyS0 panic=-1 mitigations=off quiet loglevel=1"
        argv = [
            linuxguest.QEMU, "-accel", "tcg", "-m", "512", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel.image), "-initrd", str(initrd), "-append", cmdline,
        ]  # fmt: skip
        for n, (tap, mac) in enumerate(zip((self.net.tap, self.net.tap2), GUEST_MACS, strict=True)):
            argv += [
                "-netdev", f"tap,id=n{n},ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n{n},mac={mac},host_mtu={self.net.mtu}",
            ]  # fmt: skip
        return argv

    def run(self, script: str, on_sync: Callable[[str], str], timeout: float) -> int | None:
        """Boot, answer each sync marker with ``on_sync``, return the script's exit code."""
        kernel = linuxguest.obtain_kernel()
        events: list[tuple[str, str]] = []
        ready = threading.Condition()
        with tempfile.TemporaryDirectory(prefix="aoe-mp-") as work:
            initrd = linuxguest.build_initramfs(
                kernel, script, Path(work) / "initramfs.cpio", mtu=self.net.mtu, load_aoe=False
            )
            stderr = (self.workdir / "qemu.stderr").open("wb")
            self.proc = proc = subprocess.Popen(
                self.net.command(self.argv(kernel, initrd)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )

            def reader() -> None:
                assert proc.stdout is not None
                for raw in proc.stdout:
                    line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
                    self.lines.append(line)
                    for kind, regex in (("sync", _SYNC_RE), ("end", _END_RE)):
                        match = regex.search(line)
                        if match:
                            with ready:
                                events.append((kind, match.group(1)))
                                ready.notify()
                with ready:
                    events.append(("eof", ""))
                    ready.notify()

            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            deadline = time.monotonic() + timeout
            code = None
            try:
                while True:
                    with ready:
                        while not events:
                            left = deadline - time.monotonic()
                            if left <= 0 or not ready.wait(left):
                                raise linuxguest.GuestError(f"guest timed out\n{self.tail()}")
                        kind, value = events.pop(0)
                    if kind == "eof":
                        break
                    if kind == "end":
                        code = int(value)
                        break
                    answer = on_sync(value)
                    assert proc.stdin is not None
                    proc.stdin.write(answer.encode() + b"\n")
                    proc.stdin.flush()
            finally:
                with contextlib.suppress(BrokenPipeError):
                    if proc.stdin is not None:
                        proc.stdin.close()
                linuxguest.terminate(proc, grace=5.0)
                thread.join(5.0)
                stderr.close()
                (self.workdir / "console.log").write_text("\n".join(self.lines) + "\n")
        return code

    def tail(self, n: int = 60) -> str:
        """The last ``n`` console lines."""
        return "\n".join(self.lines[-n:])

    def output(self) -> list[str]:
        """The script's lines (between the begin and end markers)."""
        lines = self.lines
        start = next((i for i, line in enumerate(lines) if _BEGIN in line), len(lines))
        return [line for line in lines[start + 1 :] if "@@" not in line]

    def values(self) -> dict[str, str]:
        """``KEY=value`` tokens printed by the script (last one wins)."""
        found: dict[str, str] = {}
        for line in self.output():
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
                    found[key] = value
        return found

    def paths(self, label: str) -> dict[str, dict[str, Any]]:
        """The debugfs summary lines ``label MAC:nout:maxout:nframes taint:T r:R w:W if:..``."""
        result: dict[str, dict[str, Any]] = {}
        for line in self.output():
            words = line.split()
            if not words or words[0] != label or len(words) < 2:
                continue
            mac, nout, maxout, nframes = words[1].split(":")
            path: dict[str, Any] = {"nout": int(nout), "maxout": int(maxout)}
            path["nframes"] = int(nframes)
            for word in words[2:]:
                key, _, value = word.partition(":")
                path[key] = value if key == "if" else int(value)
            result[mac] = path
        return result


def image_md5(image: Path, offset_mib: int, size_mib: int) -> str:
    """md5 of ``size_mib`` MiB of ``image`` at ``offset_mib`` MiB."""
    with image.open("rb") as f:
        f.seek(offset_mib * MIB)
        return hashlib.md5(f.read(size_mib * MIB)).hexdigest()


class LinuxMultipathTests(InteropTestCase):
    """The Linux initiator uses both interfaces of a target and survives one going down."""

    def test_two_paths_and_failover(self) -> None:
        """
        With the target served on two taps, the guest's driver knows it
        through both server MACs and sends frames through both; a direct
        write during which one server-side link goes down completes with
        intact data (in the guest and in the image); once the link is back,
        frames flow through it again.
        """
        workdir = self.workdir()
        image = make_image(workdir / "disk.img", DISK_MIB * MIB)
        started = time.monotonic()
        counters: dict[str, tuple[int, int]] = {}
        times: dict[str, float] = {}
        with TwoTapNetwork(mtu=MTU) as net:
            tap_a, tap_b = net.tap, net.tap2
            server = TwistdTarget(
                net.netns, tap_a, image, workdir / "twistd.log", extra_args=["--iface", tap_b]
            )
            guest = SerialGuest(net, workdir)

            def sample(name: str) -> None:
                counters[name] = (net.rx_frames(tap_a), net.rx_frames(tap_b))
                times[name] = time.monotonic() - started

            def on_sync(name: str) -> str:
                if name == "failover":
                    # The write is under way: let some frames go through A first.
                    time.sleep(0.5)
                    sample("before-down")
                    net.link(tap_a, "down")
                    sample("down")
                    return "go"
                if name == "down-done":
                    sample("failover-done")
                    net.link(tap_a, "up")
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and f"link {tap_a}: up" not in server.log:
                        time.sleep(0.05)
                    sample("up")
                    return "go"
                if name.startswith("p3-"):
                    sample(name)
                    # Another round until frames went through A again (the driver
                    # probes a tainted path before it trusts it again).
                    flowing = counters[name][0] - counters["up"][0] > 100
                    return "go\n" + ("done" if flowing else "more")
                sample(name)
                return "go"

            try:
                server.start()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and len(_SERVING_RE.findall(server.log)) < 2:
                    time.sleep(0.05)
                serving = {m[0]: m[1] for m in _SERVING_RE.findall(server.log)}
                sample("start")
                code = guest.run(guest_script(), on_sync, timeout=120)
                alive = server.alive()
            finally:
                returncode = server.stop()
        total = time.monotonic() - started
        log = server.log
        if code != 0:
            self.fail(f"guest script exited {code}; console tail:\n{guest.tail()}\n{log[-3000:]}")
        self.assertTrue(alive, f"twistd exited during the session; log:\n{log}")
        self.assertIsNotNone(returncode, f"twistd did not stop on SIGTERM:\n{log}")
        self.assertEqual(sorted(serving), sorted([tap_a, tap_b]), log)
        v = guest.values()
        macs = {tap: serving[tap].replace(":", "") for tap in (tap_a, tap_b)}

        # 1. Both server MACs are paths of e0.1, each through its own guest NIC.
        paths0 = guest.paths("PATH0")
        self.assertEqual(sorted(paths0), sorted(macs.values()), guest.output())
        self.assertEqual(paths0[macs[tap_a]]["if"], "eth0")
        self.assertEqual(paths0[macs[tap_b]]["if"], "eth1")
        self.assertEqual(sorted(v["NETIF"].split(",")), ["eth0", "eth1"])

        # 2. Integrity, and frames on both taps during the first transfer.
        self.assertEqual(v["P1_READ_MD5"], v["P1_MD5"])
        self.assertEqual(image_md5(image, P1_OFFSET_MIB, P1_MIB), v["P1_MD5"])
        p1 = [counters["p1"][i] - counters["paths"][i] for i in (0, 1)]
        for frames in p1:
            self.assertGreater(frames, 500, f"frames per tap during the first transfer: {p1}")

        # 3. Failover: the write went on through A before the link went down,
        # completed, and the data is intact in the guest and in the image.
        before = counters["before-down"][0] - counters["p1"][0]
        self.assertGreater(before, 0, "no frame through A before it went down")
        self.assertEqual(v["FAILOVER_DD_RC"], "0")
        self.assertEqual(v["FAILOVER_READ_MD5"], v["FAILOVER_MD5"])
        self.assertEqual(image_md5(image, FAILOVER_OFFSET_MIB, FAILOVER_MIB), v["FAILOVER_MD5"])
        after_b = counters["failover-done"][1] - counters["down"][1]
        self.assertGreater(after_b, 0, "nothing went through B after A went down")
        # The driver noticed: the path through A is tainted (avoided), B is not.
        paths2 = guest.paths("PATH2")
        self.assertGreater(paths2[macs[tap_a]]["taint"], 0, paths2)
        self.assertEqual(paths2[macs[tap_b]]["taint"], 0, paths2)

        # 4. A is back: served again, and frames flow through it again.
        self.assertIn(f"link {tap_a}: down", log)
        self.assertIn(f"link {tap_a}: up", log)
        last = f"p3-{v['P3_ROUNDS']}"
        again = counters[last][0] - counters["up"][0]
        self.assertGreater(again, 100, f"frames through A after it came back: {again}")
        self.assertEqual(v["P3_READ_MD5"], v["P3_MD5"])
        self.assertEqual(image_md5(image, P3_OFFSET_MIB, P3_MIB), v["P3_MD5"])
        self.assertEqual(v["STATE"], "up")
        # ...and the driver trusts A again and counts frames on it.
        paths3 = guest.paths("PATH3")
        self.assertEqual(paths3[macs[tap_a]]["taint"], 0, paths3)
        moved = {p: paths3[macs[tap_a]][p] - paths2[macs[tap_a]][p] for p in ("r", "w")}
        self.assertGreater(moved["w"], 0, moved)
        # The server's own per-interface counters, logged when it stops.
        served = {m[0]: [int(x) for x in m[1:]] for m in _STOPPED_RE.findall(log)}
        self.assertEqual(sorted(served), sorted([tap_a, tap_b]), log)
        for tap in (tap_a, tap_b):
            received, answered, malformed = served[tap]
            self.assertGreater(received, 1000, served)
            self.assertEqual((answered, malformed), (received, 0), served)
        # Replies to A that were under way when it went down are dropped, with a warning.
        expected = (f"link {tap_a}:", "(Network is down)")
        problems = [p for p in log_problems(log) if not any(e in p for e in expected)]
        self.assertEqual(problems, [], log)

        print(
            f"\n  [linux multipath] total {total:.1f}s; guest NICs {v['NETIF']},"
            f" payload {v['PAYLOAD']};\n  paths after discovery {paths0}"
            f"\n  frames from the guest during {P1_MIB} MiB write+read: A {p1[0]}, B {p1[1]}"
            f"\n  failover: {FAILOVER_MIB} MiB direct write took {int(v['FAILOVER_US']) / 1e6:.1f}s"
            f" (A down at +{times['down'] - times['p1']:.1f}s after p1,"
            f" {before} frames through A before),"
            f" {after_b} frames through B after; paths then {paths2}"
            f"\n  A back up: {again} frames through A in {v['P3_ROUNDS']} round(s) of"
            f" {P3_MIB} MiB write+read ({int(v['P3_US']) / 1e6:.1f}s); paths then {paths3}"
            f"\n  server's counters (received, answered, malformed): A {served[tap_a]},"
            f" B {served[tap_b]}\n  tap RX counters {counters}\n  at seconds {times}",
            flush=True,
        )
