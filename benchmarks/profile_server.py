#!/usr/bin/env python3
"""
Profile aoe-twisted's per-frame path while the raw-capacity load generator drives it.

The server (``twistd aoe``, file backend) runs in a network namespace at the
end of a veth pair; ``raw_capacity.py``'s generator keeps the target's buffer
count of requests in flight from the other end.  Two profiles are taken, one
after the other, for each workload:

- **py-spy** (sampling, ``--idle`` so time waiting in ``epoll`` shows too,
  ``--native`` off): self and inclusive sample shares per function.  Low
  overhead, so the proportions are close to an unprofiled server.
- **cProfile** (``twistd --profile --profiler cprofile --savestats``): exact
  call counts; divided by the requests served they give calls *per frame*,
  which is the best guide to what the fast path must stop doing.  cProfile
  slows the server down several times, so its times are only proportions.

The report goes to stdout and to ``--out`` (default
``docs/profiles/baseline-<date>.txt``).

    sudo python benchmarks/profile_server.py [--duration 10] [--out FILE]
        [--workload "1500 seq 1 read" --workload "9000 seq max write"] [--ours-args ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchcommon as bc
import raw_capacity

DEFAULT_WORKLOADS = ["1500 seq 1 read", "9000 seq max write"]


def _short(frame: str) -> str:
    """Shorten a py-spy frame ``func (path/to/file.py:123)`` to ``func (file.py:123)``."""
    if " (" in frame and frame.endswith(")"):
        func, where = frame[:-1].split(" (", 1)
        parts = where.split("/")
        tail = "/".join(parts[-2:]) if len(parts) > 1 else where
        return f"{func} ({tail})"
    return frame


def _pyspy_summary(raw: Path, top: int) -> str:
    """Self and inclusive shares per function from py-spy's collapsed-stack output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        # Drop the "process"/"thread" pseudo-frames py-spy may prepend.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_counts[frames[-1]] += n
        for f in set(frames):
            incl_counts[f] += n
    lines = [f"py-spy: {total} samples", "", "self %  function"]
    for f, n in self_counts.most_common(top):
        lines.append(f"{100 * n / total:6.1f}  {f}")
    lines += ["", "incl %  function"]
    for f, n in incl_counts.most_common(top):
        lines.append(f"{100 * n / total:6.1f}  {f}")
    return "\n".join(lines)


def _cprofile_summary(stats_path: Path, requests: int, top: int) -> str:
    """cProfile's top functions by own time, with calls per request served."""
    st = pstats.Stats(str(stats_path))
    rows = []
    total = 0.0
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        total += tt
        rows.append((tt, ct, nc, f"{func} ({'/'.join(filename.split('/')[-2:])}:{line})"))
    rows.sort(reverse=True)
    out = [f"cProfile: {requests:,} requests served while profiled; "
           f"total own time {total:.2f} s",
           "", "own %   own µs/req  calls/req  function"]
    for tt, _ct, nc, name in rows[:top]:
        out.append(f"{100 * tt / total:5.1f}  {1e6 * tt / max(requests, 1):10.2f}  "
                   f"{nc / max(requests, 1):9.2f}  {name}")
    return "\n".join(out)


def _drive(pair: bc.Veth, pid: int, row: list[str], duration: float) -> dict:
    """Run the generator for one row; return its result."""
    args = argparse.Namespace(duration=duration, warmup=0.5)
    return raw_capacity.run_generator(pair, pid, [row], args)[0]


def profile_workload(workload: str, args: argparse.Namespace, work: Path) -> str:
    """Both profiles for ``"MTU pattern size op"``; return the report section."""
    mtu_s, pattern, size, op = workload.split()
    mtu, row = int(mtu_s), [pattern, size, op]
    image = work / "disk.img"
    if not image.exists():
        bc.make_image(image, raw_capacity.IMAGE_BYTES)
    spec = bc.ServerSpec("aoe-twisted", "ours", tuple(args.ours_args.split()))
    sections = [f"== workload: MTU {mtu}, {pattern} {size}-sector {op}s, "
                f"window = buffer count ==", ""]
    with bc.veth_pair(mtu) as pair:
        # 1. py-spy on an unprofiled server.
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if Path(pyspy).exists():
            proc = bc.start_in_netns(pair.server_ns, spec.argv(pair.server_if, image),
                                     work / "pyspy-server.log")
            raw = work / f"pyspy-{mtu}.txt"
            try:
                time.sleep(2.0)  # let twistd import and open the port
                spy = subprocess.Popen(
                    [pyspy, "record", "--pid", str(proc.pid), "--rate", "250", "--idle",
                     "--format", "raw", "--output", str(raw), "--duration",
                     str(int(args.duration)), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
                result = _drive(pair, proc.pid, row, args.duration)
                spy.wait(args.duration + 60)
            finally:
                bc.stop(proc)
            sections.append(
                f"Unprofiled rate during the py-spy run: {result['iops']:,.0f} IOPS, "
                f"server CPU {result['server_cpu']:.0%}, generator CPU {result['gen_cpu']:.0%}"
            )
            sections.append("")
            sections.append(_pyspy_summary(raw, args.top) if raw.exists()
                            else f"py-spy produced nothing: {spy.stderr.read().decode()[-500:]}")
            sections.append("")
        else:
            sections.append("py-spy not installed (pip install py-spy): sampling profile skipped")
        # 2. perf: on-CPU samples only (py-spy counts wall time, including time the
        # server is runnable but preempted), split kernel / interpreter / libraries.
        if shutil.which("perf"):
            proc = bc.start_in_netns(pair.server_ns, spec.argv(pair.server_if, image),
                                     work / "perf-server.log")
            data = work / f"perf-{mtu}.data"
            try:
                time.sleep(2.0)
                perf = subprocess.Popen(
                    ["perf", "record", "-q", "-F", "999", "-p", str(proc.pid), "-o", str(data),
                     "--", "sleep", str(args.duration)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                result = _drive(pair, proc.pid, row, args.duration)
                perf.wait(args.duration + 60)
            finally:
                bc.stop(proc)
            sections.append(f"perf (on-CPU samples) at {result['iops']:,.0f} IOPS, server CPU "
                            f"{result['server_cpu']:.0%} (kernel {result['server_sys']:.0%})")
            sections.append("")
            for sort, top in (("dso", 8), ("dso,sym", args.top)):
                rep = subprocess.run(
                    ["perf", "report", "-i", str(data), "--stdio", "--sort", sort,
                     "--percent-limit", "0.7"],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                lines = [
                    ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")
                ]
                sections.append(f"perf report --sort {sort}:")
                sections.extend(ln.rstrip() for ln in lines[:top])
                sections.append("")
        # 3. cProfile through twistd's own --profile.
        stats = work / f"cprofile-{mtu}.pstats"
        argv = spec.argv(pair.server_if, image)
        i = argv.index("aoe")
        argv[i:i] = [f"--profile={stats}", "--profiler=cprofile", "--savestats"]
        proc = bc.start_in_netns(pair.server_ns, argv, work / "cprofile-server.log")
        try:
            result = _drive(pair, proc.pid, row, args.duration)
        finally:
            bc.stop(proc, grace=60)
        # Requests counted by the generator cover only the measured window; the
        # server also served the warm-up.  Use the server's own count if logged.
        log = (work / "cprofile-server.log").read_text(errors="replace")
        served = result["requests"]
        for line in log.splitlines():
            if "frames received" in line:
                served = int(line.split("frames received")[0].split()[-1])
        sections.append(f"Rate under cProfile: {result['iops']:,.0f} IOPS")
        sections.append("")
        sections.append(_cprofile_summary(stats, served, args.top) if stats.exists()
                        else "cProfile wrote no stats")
        sections.append("")
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per profile")
    parser.add_argument("--workload", action="append",
                        help='"MTU seq|rand 1|max read|write" (repeatable)')
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    parser.add_argument("--ours-args", default="", help="extra twistd aoe options")
    parser.add_argument("--out", type=Path,
                        default=bc.REPO / "docs" / "profiles"
                        / f"baseline-{time.strftime('%Y-%m-%d', time.gmtime())}.txt")
    args = parser.parse_args(argv)
    workloads = args.workload or DEFAULT_WORKLOADS
    rev = subprocess.run(["git", "-C", str(bc.REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(bc.REPO), "status", "--porcelain", "src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    header = [
        f"aoe-twisted per-frame profile, {bc.now_utc()}, checkout at commit {rev}"
        + (" (src/ has uncommitted changes)" if dirty and not os.environ.get("PYTHONPATH")
           else ""),
        bc.machine(),
        f"server: twistd aoe --backend file:IMAGE {args.ours_args}".rstrip(),
        "made by: benchmarks/profile_server.py " + " ".join(sys.argv[1:]),
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="aoe-profile-") as work:
        body = [profile_workload(w, args, Path(work)) for w in workloads]
    text = "\n".join(header + body)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
