"""Run the trial suite and end with a plain 'N passed, N failed, N skipped' line.

trial's own summary ("PASSED (successes=12, skips=1)") is kept; the extra line
lets CI tools that only know the plain form count the tests.
"""

from __future__ import annotations

import re
import subprocess
import sys


def main(argv: list[str]) -> int:
    """Run ``python -m twisted.trial ARGS``, echo its output, then print the counts."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "twisted.trial", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    summary = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.startswith(("PASSED", "FAILED")):
            summary = line
    code = proc.wait()
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", summary)}
    passed = counts.get("successes", 0)
    failed = sum(counts.get(k, 0) for k in ("failures", "errors", "unexpectedSuccesses"))
    skipped = counts.get("skips", 0)
    print(f"trial: {passed} passed, {failed} failed, {skipped} skipped")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
