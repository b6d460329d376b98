"""
Every frame our target and our client exchange with an initiator decodes
cleanly in tshark's AoE dissector.

``LinuxInitiatorCaptureTests`` capture all frames on the guest's tap
(``tshark -i TAP -w FILE`` inside the network namespace, started before our
``twistd aoe`` and the guest, stopped after both) while the Linux initiator
discovers the target, writes, reads, builds and remounts a small file system
and revalidates the disk; ``ClientCaptureTests`` do the same on a veth pair
while our own initiator (``aoe-twisted discover/info/write/read``) talks to
our target.  Then, with tshark as an independent oracle:

- ``tshark -r FILE -V`` shows no "Malformed" packet and no expert info of
  warning or error severity, and ``tshark -r FILE -q -z expert`` is empty;
- every frame is Ethernet + AoE and nothing else (``frame.protocols``);
- every request has a response, every reply of ours answers a request (but
  the start-up announcement), has the response flag, version 1, no error,
  our shelf.slot and an ATA status with DRDY and without BSY or ERR, and
  carries 512 bytes per sector exactly when it returns data;
- the frame counts agree with the server's own counters, and tshark dropped
  nothing.

The frames are counted by kind and printed.  tshark's dissector is lenient
(a reply short of its data is not "malformed" to it), hence the checks of
our own; ``OracleTests`` show on damaged copies of a real capture that they
catch what they claim to.  Skipped, saying why, when tshark, QEMU or the
kernel are missing, unless ``AOE_TWISTED_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from twisted.trial import unittest

from tests import linuxguest
from tests.netns import VethPair
from tests.pcap import PcapRecord, read_pcap, write_pcap
from tests.test_linux_initiator import (
    SECTOR,
    InteropTestCase,
    TwistdTarget,
    check_server_clean,
    fill,
    log_problems,
    make_image,
    require_interop,
    run_session,
)

# ATA opcodes the Linux initiator and our client use.
ATA_NAMES = {
    0xEC: "IDENTIFY",
    0x20: "READ",
    0x24: "READ EXT",
    0x30: "WRITE",
    0x34: "WRITE EXT",
    0xE7: "FLUSH",
    0xEA: "FLUSH EXT",
}
_DATA_IN = {0xEC, 0x20, 0x24}  # replies carry sector_count * 512 bytes
_ATA_DRDY, _ATA_BSY, _ATA_ERR = 0x40, 0x80, 0x01
_ATA_HEADER_LEN = 14 + 10 + 12  # Ethernet, AoE, ATA argument
_ETH_MIN = 60

_FIELDS = (
    "frame.number",
    "frame.len",
    "frame.protocols",
    "eth.src",
    "eth.dst",
    "eth.type",
    "aoe.version",
    "aoe.response",
    "aoe.flags_error",
    "aoe.error",
    "aoe.major",
    "aoe.minor",
    "aoe.cmd",
    "aoe.tag",
    "aoe.ata.cmd",
    "aoe.ata.status",
    "aoe.sector_count",
    "aoe.aflags.w",
    "aoe.response_to",
)

CAPTURE_SCRIPT = r"""
D=/dev/etherd/e0.1
S='/sys/block/etherd!e0.1'
md5() { set -- $(md5sum "$1"); echo "$1"; }
aoe_wait_disk e0.1 20 || exit 10
echo SIZE=$(cat "$S/size") PAYLOAD=$(cat "$S/payload")
dd if=/pattern.bin of=$D bs=1M seek=4 oflag=direct 2>/dev/null || exit 11
dd if=$D of=/tmp/readback bs=1M skip=4 count=__PMIB__ iflag=direct 2>/dev/null || exit 12
echo READBACK_MD5=$(md5 /tmp/readback)
mke2fs -q -b 1024 $D 2048 || exit 20
mount -t ext2 $D /mnt || exit 21
cp /pattern.bin /mnt/pattern.bin || exit 22
umount /mnt || exit 23
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 $D /mnt || exit 24
echo FS_PATTERN_MD5=$(md5 /mnt/pattern.bin)
umount /mnt || exit 25
echo e0.1 > /dev/etherd/revalidate
usleep 300000
echo STATE=$(cat "$S/state")
"""
CAPTURE_PATTERN_MIB = 1


@functools.cache
def tshark_unavailable_reason() -> str | None:
    """Say why tshark cannot decode AoE here, or None if it can (asked once)."""
    if shutil.which("tshark") is None:
        return "tshark not installed (apt-get install tshark)"
    proc = subprocess.run(
        ["tshark", "-G", "protocols"], capture_output=True, text=True, check=False
    )
    if not re.search(r"^[^\t]*\t[^\t]*\taoe$", proc.stdout, re.MULTILINE):
        return "this tshark has no AoE dissector"
    return None


def disable_ipv6(netns: str, iface: str) -> None:
    """Turn IPv6 off on ``iface`` in ``netns``, so the kernel sends no MLD or ND frames there."""
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", f"net.ipv6.conf.{iface}.disable_ipv6=1"],
        capture_output=True,
        check=False,
    )


class Capture:
    """``tshark -i IFACE -w FILE`` inside network namespace ``netns``, as a context manager.

    Entering disables IPv6 on the interface (so that only AoE is on the
    wire), starts tshark and waits until it captures; leaving waits for the
    last frames to reach the file, stops tshark (SIGINT) and records
    ``captured`` and ``dropped`` from its summary.
    """

    def __init__(self, netns: str, iface: str, path: Path) -> None:
        self.netns = netns
        self.iface = iface
        self.path = path
        self.stderr_path = path.with_suffix(".tshark.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.captured: int | None = None
        self.dropped = 0

    def _stderr(self) -> str:
        """What tshark has written to its standard error so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Capture:
        disable_ipv6(self.netns, self.iface)
        argv = ["tshark", "-n", "-q", "-i", self.iface, "-F", "pcap", "-w", str(self.path)]
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 20
        while "Capturing on" not in self._stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise linuxguest.GuestError(f"tshark did not start capturing:\n{self._stderr()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def settle(self, quiet: float = 1.0, limit: float = 10.0) -> None:
        """Wait until the capture file has not grown for ``quiet`` seconds (at most ``limit``).

        tshark reads frames from the kernel in blocks that it gets only when
        full or after a timeout, and on SIGINT it drops a block it does not
        have yet: without this wait the last frames go missing.
        """
        start = since = time.monotonic()
        last = -1
        while (now := time.monotonic()) < start + limit:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size != last:
                last, since = size, now
            elif now - since >= quiet:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        """Let the capture settle, stop tshark and read its summary."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            self.settle()
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err = self._stderr()
        captured = re.search(r"(\d+) packets? captured", err)
        self.captured = int(captured.group(1)) if captured else None
        self.dropped = sum(int(n) for n in re.findall(r"(\d+) packets? dropped", err))


@dataclass(frozen=True)
class Frame:
    """The fields tshark decoded from one captured frame (``""`` or None when absent)."""

    number: int
    length: int
    protocols: str
    src: str
    dst: str
    ethertype: str
    version: str
    response: bool
    error_flag: bool
    error: str
    major: int | None
    minor: int | None
    cmd: str
    tag: str
    ata_cmd: int | None
    ata_status: int | None
    sector_count: int | None
    write: bool
    response_to: str

    @property
    def kind(self) -> str:
        """A short description: ``"request READ EXT x17"``, ``"reply READ EXT"``, ...

        Only requests show the sector count: replies carry 0 there (as vblade's do).
        """
        direction = "reply" if self.response else "request"
        if self.cmd == "1":
            return f"{direction} config"
        if self.cmd == "0" and self.ata_cmd is not None:
            name = ATA_NAMES.get(self.ata_cmd, f"ATA 0x{self.ata_cmd:02x}")
            if self.ata_cmd in (0x20, 0x24, 0x30, 0x34) and not self.response:
                name += f" x{self.sector_count}"
            return f"{direction} {name}"
        return f"{direction} command {self.cmd or '?'}"


def _int(text: str) -> int | None:
    """Parse a tshark number (decimal or 0x hex), or None when the field is absent."""
    return int(text, 0) if text else None


def _flag(text: str) -> bool:
    """Parse a tshark boolean field (``1``/``True``)."""
    return text in ("1", "True")


def _run_tshark(*args: str) -> str:
    """Run ``tshark ARGS`` and return its standard output; raise on failure."""
    proc = subprocess.run(["tshark", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"tshark {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


def decode_fields(path: Path) -> list[Frame]:
    """Decode every frame of the capture at ``path`` with tshark, into ``Frame``s."""
    args = ["-n", "-2", "-r", str(path), "-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]
    for name in _FIELDS:
        args += ["-e", name]
    frames = []
    for line in _run_tshark(*args).splitlines():
        v = line.split("\t")
        v += [""] * (len(_FIELDS) - len(v))
        frames.append(
            Frame(
                number=int(v[0]),
                length=int(v[1]),
                protocols=v[2],
                src=v[3],
                dst=v[4],
                ethertype=v[5],
                version=v[6],
                response=_flag(v[7]),
                error_flag=_flag(v[8]),
                error=v[9],
                major=_int(v[10]),
                minor=_int(v[11]),
                cmd=v[12],
                tag=v[13],
                ata_cmd=_int(v[14]),
                ata_status=_int(v[15]),
                sector_count=_int(v[16]),
                write=_flag(v[17]),
                response_to=v[18],
            )
        )
    return frames


_VERBOSE_BAD = re.compile(r"Malformed|Expert Info \((Error|Warning)/")
_FRAME_LINE = re.compile(r"^Frame (\d+):")


def verbose_problems(path: Path) -> tuple[int, int, list[str]]:
    """Scan ``tshark -V`` output of ``path``.

    Return the number of frames, the number that decoded as AoE ("ATA over
    Ethernet" in the tree) and ``"frame N: line"`` for every line reporting
    a malformed packet or an expert warning or error.
    """
    frames = aoe = 0
    bad: list[str] = []
    current = 0
    with subprocess.Popen(
        ["tshark", "-n", "-r", str(path), "-V"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _FRAME_LINE.match(line)
            if match:
                frames += 1
                current = int(match.group(1))
            elif line.startswith(("ATAoverEthernet", "ATA over Ethernet")):
                aoe += 1
            elif _VERBOSE_BAD.search(line):
                bad.append(f"frame {current}: {line.strip()}")
    return frames, aoe, bad


def expert_summary(path: Path) -> str:
    """Return ``tshark -q -z expert`` of ``path`` (empty when tshark found nothing to say)."""
    out = _run_tshark("-n", "-r", str(path), "-q", "-z", "expert")
    return "\n".join(line for line in out.splitlines() if "Running as user" not in line).strip()


def _is_probe(f: Frame, shelf: int, slot: int) -> bool:
    """
    Whether ``f`` (one of ours) asks the segment who else serves our address.

    Before serving an address the server broadcasts a config query for it
    (duplicate-address detection, ``aoe_twisted.core.duplicates``): the only
    request it sends.
    """
    return f.cmd == "1" and f.dst == "ff:ff:ff:ff:ff:ff" and (f.major, f.minor) == (shelf, slot)


def frame_problems(frames: list[Frame], server_mac: str, shelf: int, slot: int) -> list[str]:
    """Check the AoE semantics of a capture; return one line per violation.

    Requests and replies are paired by (initiator MAC, command, tag) in
    order; for ATA commands tshark's own pairing (``aoe.response_to``) must
    agree.  tshark does not pair config queries (they are broadcast), so
    that is done here only.
    """
    problems: list[str] = []
    pending: dict[tuple[str, str, str], deque[Frame]] = defaultdict(deque)
    for f in frames:
        where = f"frame {f.number} ({f.kind})"
        if f.protocols != "eth:ethertype:aoe":
            problems.append(f"{where}: protocols {f.protocols!r}, not eth:ethertype:aoe")
            continue
        if f.version != "1":
            problems.append(f"{where}: AoE version {f.version!r}")
        if f.src != server_mac:
            if f.response:
                problems.append(f"{where}: the initiator sent a response")
            else:
                pending[(f.src, f.cmd, f.tag)].append(f)
            continue
        if not f.response:
            if _is_probe(f, shelf, slot):
                continue
            problems.append(f"{where}: our frame lacks the response flag")
        if f.error_flag or f.error not in ("", "0"):
            problems.append(f"{where}: error flag/code {f.error_flag}/{f.error}")
        if (f.major, f.minor) != (shelf, slot):
            problems.append(f"{where}: from e{f.major}.{f.minor}")
        waiting = pending.get((f.dst, f.cmd, f.tag))
        if not waiting:
            if not (f.cmd == "1" and f.dst == "ff:ff:ff:ff:ff:ff"):
                problems.append(f"{where}: answers no request (only the announcement may)")
            continue
        request = waiting.popleft()
        if f.cmd != "0":
            continue
        if f.response_to != str(request.number):
            problems.append(f"{where}: tshark pairs it with {f.response_to or 'nothing'}")
        status = f.ata_status or 0
        if not status & _ATA_DRDY or status & (_ATA_BSY | _ATA_ERR):
            problems.append(f"{where}: ATA status 0x{status:02x}")
        sectors = request.sector_count or 0
        if request.ata_cmd in _DATA_IN:
            expected = {_ATA_HEADER_LEN + sectors * SECTOR}
        else:
            expected = {_ATA_HEADER_LEN, _ETH_MIN}  # no data, padded or not
        if f.length not in expected:
            problems.append(f"{where}: {f.length} bytes, expected {sorted(expected)}")
    for waiting in pending.values():
        problems.extend(f"frame {f.number} ({f.kind}): never answered" for f in waiting)
    return problems


@dataclass
class Decoded:
    """A capture as tshark decoded it: its frames, counted by kind, and how long that took."""

    frames: list[Frame]
    kinds: Counter[str]
    seconds: float

    def summary(self) -> str:
        """The kinds and their counts, as one line."""
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items()))


def check_capture(
    case: unittest.TestCase,
    capture: Capture,
    server_mac: str,
    counters: dict[str, int],
    shelf: int = 0,
    slot: int = 1,
) -> Decoded:
    """Assert every frame of ``capture`` is clean AoE that agrees with the server's counters.

    ``server_mac`` tells our frames from the initiator's; ``counters`` are
    the server's own (``TwistdTarget.counters()``).
    """
    started = time.monotonic()
    frames = decode_fields(capture.path)
    total, aoe, bad = verbose_problems(capture.path)
    expert = expert_summary(capture.path)
    seconds = time.monotonic() - started

    case.assertEqual(capture.dropped, 0, "tshark dropped frames")
    case.assertEqual(capture.captured, len(frames))
    case.assertGreater(len(frames), 0)
    case.assertEqual(total, len(frames))
    case.assertEqual(aoe, total, "not every frame decoded as AoE")
    case.assertEqual(bad, [], "tshark -V reports malformed frames or expert problems")
    case.assertEqual(expert, "", f"tshark -z expert is not empty:\n{expert}")
    case.assertEqual(frame_problems(frames, server_mac, shelf, slot), [])

    ours = [f for f in frames if f.src == server_mac]
    theirs = [f for f in frames if f.src != server_mac]
    case.assertEqual(len(theirs), counters["received"], counters)
    # The start-up announcement goes out before the peer is there (a tap
    # without carrier drops it unseen), or right after the capture started.
    ours = [f for f in ours if f.response or not _is_probe(f, shelf, slot)]
    announcements = [f for f in ours if f.dst == "ff:ff:ff:ff:ff:ff"]
    case.assertLessEqual(len(announcements), 1)
    case.assertEqual(len(ours), counters["answered"] + len(announcements), counters)
    return Decoded(frames, Counter(f.kind for f in frames), seconds)


class _CaptureTestCase(InteropTestCase):
    """An interop test that also needs tshark with its AoE dissector."""

    def setUp(self) -> None:
        super().setUp()
        require_interop(self, tshark_unavailable_reason())


class LinuxInitiatorCaptureTests(_CaptureTestCase):
    """Frames between the Linux initiator and our twistd target decode cleanly in tshark."""

    def _capture(self, mtu: int) -> None:
        """Capture a guest session at ``mtu``, then decode and check every frame."""
        workdir = self.workdir()
        image = make_image(workdir / "disk.img", 16 * 1024 * 1024)
        pattern = random.Random(mtu).randbytes(CAPTURE_PATTERN_MIB * 1024 * 1024)
        pattern_md5 = hashlib.md5(pattern).hexdigest()
        pcap = workdir / f"linux-twistd-mtu{mtu}.pcap"
        captures: list[Capture] = []

        def around(net: linuxguest.GuestNetwork) -> Capture:
            captures.append(Capture(net.netns, net.tap, pcap))
            return captures[-1]

        session = run_session(
            workdir,
            image,
            mtu,
            fill(CAPTURE_SCRIPT, {"PMIB": CAPTURE_PATTERN_MIB}),
            extra_files={"/pattern.bin": pattern},
            timeout=60,
            append="ipv6.disable=1",  # only AoE on the wire
            around_server=around,
        )
        session.result.check()
        check_server_clean(self, session)
        self.assertEqual(session.values["READBACK_MD5"], pattern_md5)
        self.assertEqual(session.values["FS_PATTERN_MD5"], pattern_md5)
        self.assertEqual(session.values["STATE"], "up")

        decoded = check_capture(self, captures[0], session.server.mac, session.counters)
        kinds = decoded.kinds
        per_frame = (mtu - 22) // SECTOR
        self.assertGreater(kinds["reply IDENTIFY"], 0)
        self.assertGreater(kinds["reply config"], 0)
        self.assertGreater(kinds[f"request WRITE EXT x{per_frame}"], 0)
        self.assertGreater(kinds[f"request READ EXT x{per_frame}"], 0)
        print(
            f"\n  [tshark, linux initiator + twistd aoe, mtu={mtu}] {len(decoded.frames)} frames,"
            f" decoded in {decoded.seconds:.1f}s: all AoE, none malformed, no expert info;"
            f" {decoded.summary()}",
            flush=True,
        )

    def test_mtu1500(self) -> None:
        """At MTU 1500 every frame of a whole Linux session decodes as clean AoE."""
        self._capture(1500)

    def test_mtu9000(self) -> None:
        """At MTU 9000 (jumbo frames) every frame decodes as clean AoE too."""
        self._capture(9000)


CLIENT = (sys.executable, "-m", "aoe_twisted")
"""Our user-space initiator's command line (``aoe-twisted``)."""


class ClientCaptureTests(_CaptureTestCase):
    """Frames between our own initiator (``aoe-twisted``) and our target decode cleanly."""

    def _client(self, pair: VethPair, *args: str) -> str:
        """Run ``aoe-twisted ARGS -i IF`` in the client namespace; return its output."""
        argv = ["ip", "netns", "exec", pair.client_ns, *CLIENT, *args, "-i", pair.client_if]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        self.assertEqual(proc.returncode, 0, f"{' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def _capture(self, mtu: int) -> None:
        """Discover, inspect, write and read back through a veth at ``mtu`` while capturing."""
        workdir = self.workdir()
        image = make_image(workdir / "disk.img", 16 * 1024 * 1024)
        # An odd length: the last frame of the write is a short one.
        data = random.Random(mtu).randbytes(300 * 1024 + 3 * SECTOR)
        (workdir / "data.bin").write_bytes(data)
        pair = VethPair.create(self, mtu)
        disable_ipv6(pair.server_ns, pair.server_if)
        server = TwistdTarget(pair.server_ns, pair.server_if, image, workdir / "twistd.log")
        with Capture(pair.client_ns, pair.client_if, workdir / f"client-mtu{mtu}.pcap") as cap:
            try:
                server.start()
                found = self._client(pair, "discover")
                self.assertIn("e0.1", found)
                self._client(pair, "info", "e0.1")
                self._client(pair, "write", "--no-progress", "--offset", "1M", "e0.1",
                             str(workdir / "data.bin"))  # fmt: skip
                self._client(pair, "read", "--no-progress", "--offset", "1M", "--length",
                             str(len(data)), "-o", str(workdir / "back.bin"), "e0.1")  # fmt: skip
                alive = server.alive()
            finally:
                returncode = server.stop()
        log = server.log
        self.assertTrue(alive, f"twistd exited during the session; log:\n{log}")
        self.assertIn(returncode, (0, -signal.SIGTERM), log)
        self.assertEqual(log_problems(log), [], f"twistd logged problems:\n{log}")
        self.assertEqual((workdir / "back.bin").read_bytes(), data)
        with image.open("rb") as f:
            f.seek(1024 * 1024)
            self.assertEqual(f.read(len(data)), data)

        counters = server.counters()
        decoded = check_capture(self, cap, server.mac, counters)
        kinds = decoded.kinds
        self.assertGreater(kinds["request config"], 0)
        self.assertGreater(kinds["reply IDENTIFY"], 0)
        self.assertGreater(sum(n for k, n in kinds.items() if k.startswith("reply WRITE")), 0)
        self.assertGreater(sum(n for k, n in kinds.items() if k.startswith("reply READ")), 0)
        print(
            f"\n  [tshark, aoe-twisted client + twistd aoe, mtu={mtu}] {len(decoded.frames)}"
            f" frames, decoded in {decoded.seconds:.1f}s: all AoE, none malformed, no expert"
            f" info; {decoded.summary()}",
            flush=True,
        )

    def test_mtu1500(self) -> None:
        """At MTU 1500 every frame our client and our server exchange decodes as clean AoE."""
        self._capture(1500)

    def test_mtu9000(self) -> None:
        """At MTU 9000 too."""
        self._capture(9000)


class OracleTests(unittest.SynchronousTestCase):
    """The checks above pass real good frames (vblade's) and catch damaged ones."""

    GOOD = Path(__file__).parent / "data" / "linux-vblade-mtu1500.pcap"
    VBLADE_MAC = "22:de:2c:46:f7:32"

    def setUp(self) -> None:
        require_interop(self, tshark_unavailable_reason())

    def _records(self) -> list[PcapRecord]:
        """The golden capture's records up to vblade's last reply (later requests are cut off)."""
        records = list(read_pcap(self.GOOD).records)
        mac = bytes.fromhex(self.VBLADE_MAC.replace(":", ""))
        last = max(i for i, r in enumerate(records) if r.data[6:12] == mac)
        return records[: last + 1]

    def _problems(self, records: list[PcapRecord]) -> tuple[list[str], list[str]]:
        """Write ``records`` out; return (``frame_problems``, ``verbose_problems``) of them."""
        path = Path(self.mktemp())
        write_pcap(path, records)
        frames = decode_fields(path)
        return frame_problems(frames, self.VBLADE_MAC, 1, 0), verbose_problems(path)[2]

    def test_good(self) -> None:
        """vblade's replies to the Linux initiator pass every check."""
        self.assertEqual(self._problems(self._records()), ([], []))

    def test_truncated_header(self) -> None:
        """A frame cut inside the AoE header is malformed for tshark, and flagged."""
        records = self._records()
        cut = records[2]
        records[2] = PcapRecord(cut.timestamp, cut.data[:20], 20)
        _, verbose = self._problems(records)
        self.assertTrue(any("Malformed" in line for line in verbose), verbose)

    def test_short_data(self) -> None:
        """A read reply with fewer bytes than its sectors (tshark says nothing) is flagged."""
        records = self._records()
        index = next(i for i, r in enumerate(records) if len(r.data) > 548)
        short = records[index]
        records[index] = PcapRecord(short.timestamp, short.data[:-512], len(short.data) - 512)
        semantic, _ = self._problems(records)
        self.assertTrue(any("bytes, expected" in line for line in semantic), semantic)

    def test_error_and_unanswered(self) -> None:
        """An error flag in a reply, and a request left without a reply, are flagged."""
        records = self._records()
        reply = records[3]
        flagged = bytearray(reply.data)
        flagged[14] |= 0x04  # AoE error flag
        records[3] = PcapRecord(reply.timestamp, bytes(flagged), len(flagged))
        del records[-1]  # vblade's last reply
        semantic, _ = self._problems(records)
        self.assertTrue(any("error flag" in line for line in semantic), semantic)
        self.assertTrue(any("never answered" in line for line in semantic), semantic)
