#!/usr/bin/env python3
"""
``make fuzz-native``: the fuzz targets against the compiled lane built with sanitizers.

Builds ``src/aoe_twisted/lane/_lane.c`` with AddressSanitizer and
UndefinedBehaviorSanitizer (``-fsanitize=address,undefined
-fno-sanitize-recover=all -g -O1``) into ``build/fuzz-native/``, apart from
the package's own build, then checks that the build really is instrumented:
the extension calls the sanitizers' hooks, and a scratch library
(``native_canary.c``) built and loaded the same way aborts with an ASan
report on an out-of-bounds read and a UBSan report on a signed overflow.
Then ``run.py`` fuzzes the ``lane`` and ``frames`` targets (whose targets
count in the lane's ``Tally``) with that extension in place of the normal
one.

The sanitizer runtime is atheris's own (``asan_with_fuzzer.so``: LLVM's
ASan and UBSan with libFuzzer), preloaded: GCC's ``libasan`` would do for
the extension, but it exports the coverage callbacks too and so takes them
from libFuzzer, and atheris loses its coverage feedback.  So the extension
is compiled by GCC with the sanitizers but linked without GCC's ASan
runtime (the two would refuse to share a process).  CPython allocates
through ``malloc`` (``PYTHONMALLOC=malloc``), so every buffer the lane is
handed (frames, replies, rings, memory disks) has ASan's red zones around
it; leak detection is off (CPython keeps memory until exit by design).

``AOE_FUZZ_LANE`` names the sanitized extension to the fuzz targets:
``preload()`` puts it in ``sys.modules`` before ``aoe_twisted.lane``
imports its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = ROOT / "build" / "fuzz-native"
SOURCE = ROOT / "src" / "aoe_twisted" / "lane" / "_lane.c"
CANARY = HERE / "native_canary.c"
FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=all",
    "-g",
    "-O1",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Wno-missing-field-initializers",
]
#: The variable that names the sanitized extension to ``preload``.
VARIABLE = "AOE_FUZZ_LANE"
MODULE = "aoe_twisted.lane._lane"
#: The targets that reach the extension: the lane itself, and the frames target's Tally.
TARGETS = ("lane", "frames")

__all__ = ["build", "environment", "preload"]


def preload() -> str | None:
    """
    Load the extension ``AOE_FUZZ_LANE`` names as ``aoe_twisted.lane._lane``, if set.

    Call before anything imports ``aoe_twisted.lane``; return the path loaded
    (``None`` if the variable is not set).
    """
    path = os.environ.get(VARIABLE)
    if not path:
        return None
    if "aoe_twisted.lane" in sys.modules:
        raise RuntimeError(f"{VARIABLE}: aoe_twisted.lane was imported before preload()")
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{VARIABLE}: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    return path


def check_preloaded(path: str | None) -> None:
    """Fail unless ``aoe_twisted.lane`` serves from ``path`` (when one was preloaded)."""
    if path is None:
        return
    from aoe_twisted import lane

    loaded = getattr(lane.native, "__file__", None)
    if loaded != path:
        raise RuntimeError(f"{VARIABLE}: aoe_twisted.lane uses {loaded}, not {path}")


def _compile(source: Path, output: Path, extra: list[str]) -> None:
    """Compile ``source`` with the sanitizers into the shared library ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    obj = output.with_suffix(".o")
    subprocess.run(
        ["gcc", "-c", "-fPIC", *FLAGS, *extra, str(source), "-o", str(obj)], check=True
    )
    # Linked without -fsanitize: no libasan; the preloaded runtime provides __asan_*.
    # libubsan stays, for any UBSan handler that runtime lacks.
    subprocess.run(["gcc", "-shared", str(obj), "-o", str(output), "-lubsan"], check=True)


def build() -> tuple[Path, Path]:
    """Build the sanitized extension and the canary; return their paths."""
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    lane = BUILD / "aoe_twisted" / "lane" / f"_lane{suffix}"
    _compile(SOURCE, lane, [f"-I{include}"])
    canary = BUILD / "native_canary.so"
    _compile(CANARY, canary, [])
    symbols = subprocess.run(
        ["nm", "-D", "--undefined-only", str(lane)], capture_output=True, text=True, check=True
    ).stdout
    for hook in ("__asan_report_load", "__asan_report_store", "__ubsan_handle_"):
        if hook not in symbols:
            raise SystemExit(f"fuzz-native: {lane} calls no {hook}*: not instrumented")
    return lane, canary


def runtime() -> str:
    """Return atheris's ASan, UBSan and libFuzzer runtime to preload."""
    import atheris

    path = Path(atheris.path()) / "asan_with_fuzzer.so"
    if not path.exists():
        raise SystemExit(f"fuzz-native: no {path}: atheris was built without it")
    return str(path)


def environment(lane: Path) -> dict[str, str]:
    """The environment a sanitized run needs."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = runtime()
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:print_summary=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["PYTHONMALLOC"] = "malloc"
    env[VARIABLE] = str(lane)
    return env


def check_canary(canary: Path, env: dict[str, str]) -> None:
    """Each canary function, loaded as the lane is, must abort with its sanitizer's report."""
    for call, report in (
        ("canary_read(16, 16)", "AddressSanitizer: heap-buffer-overflow"),
        ("canary_overflow(5)", "runtime error: signed integer overflow"),
    ):
        code = f"import ctypes; ctypes.CDLL({str(canary)!r}).{call}"
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        if result.returncode == 0 or report not in result.stderr:
            raise SystemExit(
                f"fuzz-native: {call} was not caught (exit {result.returncode}):\n"
                f"{result.stderr[-2000:]}"
            )
        print(f"fuzz-native: {call} aborts with '{report}' (exit {result.returncode})")


def main(argv: list[str]) -> int:
    """Build, check the build, fuzz."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=150, help="seconds per target")
    parser.add_argument("--build-only", action="store_true", help="build and check, no fuzzing")
    parser.add_argument("targets", nargs="*", metavar="target", help="default: lane frames")
    options = parser.parse_args(argv)
    lane, canary = build()
    env = environment(lane)
    check_canary(canary, env)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); from fuzz.native import preload, "
        "check_preloaded; check_preloaded(preload()); print('fuzz-native: lane loaded from', "
        "sys.modules['aoe_twisted.lane._lane'].__file__)"
    )
    subprocess.run([sys.executable, "-c", probe, str(ROOT)], env=env, check=True)
    if options.build_only:
        return 0
    command = [sys.executable, str(HERE / "run.py"), "--seconds", str(options.seconds)]
    result = subprocess.run([*command, *(options.targets or TARGETS)], env=env, check=False)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
