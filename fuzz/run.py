#!/usr/bin/env python3
"""
Run the fuzz targets for a given time each, keeping the corpus minimized and the crashers.

``make fuzz FUZZ_SECONDS=60`` runs this (and ``make fuzz-native``, through
``native.py``, with the sanitized lane).  For each target (``decode``,
``frames``, ``lane``) libFuzzer runs for ``--seconds`` from ``fuzz/seeds/<target>/``
(written by ``make_corpus.py``) and ``fuzz/corpus/<target>/`` (what earlier
runs found), with a scratch directory for what it finds now; a crash is
written to ``fuzz/crashers/<target>-crash-<sha1>`` and the run resumes for the
time that is left.  At the end the corpus and the new inputs are merged
(``-merge=1``) into a minimal corpus that replaces ``fuzz/corpus/<target>/``,
so the corpus in the repository only keeps inputs that add coverage.

The last libFuzzer status line of each target (executions, ``cov:`` edges,
``ft:`` features, corpus size) is printed at the end; the exit status is 1
if any target crashed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"decode": "fuzz_decode.py", "frames": "fuzz_frames.py", "lane": "fuzz_lane.py"}
#: The longest input each target takes: a jumbo frame, or eight frames plus prefixes.
MAX_LEN = {"decode": 9100, "frames": 12000, "lane": 12002}
#: The corpus kept in the repository must stay small.
CORPUS_LIMIT = 2 * 1024 * 1024
_STATUS = re.compile(r"#(\d+)\s+(?:pulse|NEW|REDUCE|DONE|INITED).*?cov: (\d+) ft: (\d+)")


def _libfuzzer(target: str, args: list[str], log: Path) -> tuple[int, str]:
    """Run one libFuzzer command for ``target`` with its output in ``log``; return both."""
    command = [sys.executable, str(HERE / TARGETS[target]), *args]
    with log.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        # libFuzzer's -merge re-runs the script by its own name: its "#!/usr/bin/env
        # python3" must find this interpreter, not the system's.
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        result = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, check=False, env=env
        )
    return result.returncode, log.read_text(errors="replace")


def fuzz(target: str, seconds: int, workdir: Path) -> tuple[int, bool, str]:
    """
    Fuzz ``target`` for ``seconds``; return total executions, whether it crashed,
    and its last status line.
    """
    corpus = HERE / "corpus" / target
    crashers = HERE / "crashers"
    corpus.mkdir(parents=True, exist_ok=True)
    crashers.mkdir(parents=True, exist_ok=True)
    found = workdir / "found"
    found.mkdir()
    deadline = time.monotonic() + seconds
    executions = 0
    crashed = False
    last = ""
    run = 0
    while (left := int(deadline - time.monotonic())) > 0:
        run += 1
        log = workdir / f"run-{run}.log"
        code, text = _libfuzzer(
            target,
            [
                str(found),
                str(corpus),
                str(HERE / "seeds" / target),
                f"-max_total_time={left}",
                f"-max_len={MAX_LEN[target]}",
                f"-artifact_prefix={crashers}/{target}-",
                "-print_final_stats=1",
            ],
            log,
        )
        statuses = _STATUS.findall(text)
        if statuses:
            executions += int(statuses[-1][0])
            last = "#{} cov: {} ft: {}".format(*statuses[-1])
        if code == 0:
            break
        crashed = True
        print(f"{target}: crashed (exit {code}), crasher kept in {crashers}:", flush=True)
        print("\n".join(text.splitlines()[-30:]), flush=True)
        if run >= 20:
            break
    merged = workdir / "merged"
    merged.mkdir()
    _libfuzzer(
        target,
        ["-merge=1", f"-max_len={MAX_LEN[target]}", str(merged), str(corpus), str(found)],
        workdir / "merge.log",
    )
    if any(merged.iterdir()):
        shutil.rmtree(corpus)
        shutil.copytree(merged, corpus)
    size = sum(p.stat().st_size for p in corpus.iterdir())
    files = len(list(corpus.iterdir()))
    print(f"{target}: {executions} executions, last {last}; corpus {files} files, {size} bytes")
    if size > CORPUS_LIMIT:
        print(f"{target}: corpus over {CORPUS_LIMIT} bytes; prune it", file=sys.stderr)
    return executions, crashed, last


def main(argv: list[str]) -> int:
    """Parse the command line and fuzz each target in turn."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="seconds per target")
    parser.add_argument(
        "targets", nargs="*", metavar="target", help=f"of {', '.join(TARGETS)} (default: all)"
    )
    options = parser.parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz: atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2
    unknown = set(options.targets) - set(TARGETS)
    if unknown:
        parser.error(f"no such target: {', '.join(sorted(unknown))}")
    failed = False
    for target in options.targets or list(TARGETS):
        with tempfile.TemporaryDirectory(prefix=f"aoe-fuzz-{target}-") as work:
            _, crashed, _ = fuzz(target, options.seconds, Path(work))
            failed = failed or crashed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
