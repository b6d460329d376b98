"""
``make demo``: serve a memory disk over AoE on a private veth pair and use it from the other end.

Two new network namespaces are joined by a new veth pair.  ``twistd aoe``
serves a 64 MiB memory disk as target e1.0 in one; the ``aoe-twisted``
command, with its socket opened in the other (``--netns``), discovers the
target, shows its details, writes a message and some random bytes at an
unaligned offset, reads them back and compares, and runs a short benchmark.
Then the server is stopped with SIGTERM.

Nothing touches a real interface: both ends of the pair live in the new
namespaces, which are deleted at the end however the demo ends (an error,
Ctrl-C or SIGTERM included).  Needs root, for the namespaces and the raw
sockets.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

SHELF, SLOT = 1, 0
TARGET = f"e{SHELF}.{SLOT}"
DISK = "memory:64M"
OFFSET = 1 << 20 | 100  # deliberately not sector-aligned: the client reads, merges, writes
SERVER_START_TIMEOUT = 30.0


class DemoError(Exception):
    """A step failed; the message is the one line to print."""


def _env() -> dict[str, str]:
    """The environment of every child: this checkout's ``src`` first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def sh(*argv: str) -> None:
    """Run a set-up command, raising ``DemoError`` with its error output if it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoError(f"{shlex.join(argv)} failed: {result.stderr.strip()}")


class Demo:
    """The namespaces, the server and the client commands of one demo run."""

    def __init__(self) -> None:
        base = f"aoe-demo-{os.getpid()}"
        self.server_ns = f"{base}-srv"
        self.client_ns = f"{base}-cli"
        self.server_if = "aoe-srv0"
        self.client_if = "aoe-cli0"
        self.namespaces: list[str] = []
        self.server: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="aoe-demo-"))
        self.server_log = self.workdir / "server.log"

    # -- set-up and clean-up ----------------------------------------------------

    def create_network(self) -> None:
        """Make both namespaces and the veth pair between them, straight inside them."""
        for ns in (self.server_ns, self.client_ns):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
        sh("ip", "link", "add", self.server_if, "netns", self.server_ns, "type", "veth",
           "peer", "name", self.client_if, "netns", self.client_ns)
        for ns, interface in ((self.server_ns, self.server_if), (self.client_ns, self.client_if)):
            sh("ip", "-n", ns, "link", "set", "dev", interface, "up")
        deadline = time.monotonic() + 5
        while True:
            states = [
                subprocess.run(["ip", "-n", ns, "-o", "link", "show", "dev", interface],
                               capture_output=True, text=True, check=False).stdout
                for ns, interface in ((self.server_ns, self.server_if),
                                      (self.client_ns, self.client_if))
            ]
            if all(" state UP " in state for state in states):
                return
            if time.monotonic() > deadline:
                raise DemoError("the veth pair did not come up")
            time.sleep(0.05)

    def start_server(self) -> None:
        """Start ``twistd -n aoe`` in the server namespace and wait until it answers."""
        from aoe_twisted.initiator.cli import twistd_command

        args = ["--iface", self.server_if, "--backend", DISK,
                "--shelf", str(SHELF), "--slot", str(SLOT)]
        command = ["ip", "netns", "exec", self.server_ns, *twistd_command(args)]
        print(f"server: twistd -n aoe {' '.join(args)}   (in netns {self.server_ns})")
        with open(self.server_log, "wb") as log:
            # A session of its own: Ctrl-C reaches the demo, which then stops it in order.
            self.server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env=_env(), start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.server.poll() is not None:
                raise DemoError(f"the server exited with status {self.server.returncode}:\n"
                                + self.server_log.read_text(errors="replace"))
            if self.client("discover", "--wait", "0.3", quiet=True).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise DemoError("the server did not answer within "
                                f"{SERVER_START_TIMEOUT:.0f} s:\n"
                                + self.server_log.read_text(errors="replace"))

    def stop_server(self) -> int | None:
        """Stop the server with SIGTERM (SIGKILL after 10 s); return its exit status."""
        server, self.server = self.server, None
        if server is None:
            return None
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        return server.returncode

    def cleanup(self) -> None:
        """Stop the server, delete the namespaces (and the veth pair), remove temp files."""
        self.stop_server()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the client -------------------------------------------------------------

    def client(self, *argv: str, quiet: bool = False) -> subprocess.CompletedProcess[bytes]:
        """Run ``aoe-twisted ARGV`` on the client end; unless ``quiet``, show it and its output."""
        args = [*argv, "-i", self.client_if, "--netns", self.client_ns]
        if not quiet:
            print(f"\n$ aoe-twisted {shlex.join(args)}", flush=True)
        result = subprocess.run([sys.executable, "-m", "aoe_twisted", *args],
                                capture_output=quiet, env=_env(), check=False)
        if not quiet and result.returncode != 0:
            raise DemoError(f"aoe-twisted {args[0]} exited with status {result.returncode}")
        return result

    # -- the demo ---------------------------------------------------------------

    def run(self) -> None:
        """Every step, in order."""
        print(f"== aoe-twisted demo: target {TARGET} ({DISK}) over a private veth pair ==")
        self.create_network()
        print(f"network: {self.server_if} (netns {self.server_ns}) <-> "
              f"{self.client_if} (netns {self.client_ns}); no real interface is used")
        self.start_server()

        self.client("discover")
        self.client("info", TARGET)

        message = f"Hello from aoe-twisted, written at {time.strftime('%H:%M:%S')}.\n".encode()
        data = message + os.urandom(3000)
        source = self.workdir / "message.bin"
        source.write_bytes(data)
        print(f"\n(writing a {len(message)}-byte message and {len(data) - len(message)} random "
              f"bytes at byte offset {OFFSET}, which is not sector-aligned)")
        self.client("write", TARGET, "--offset", str(OFFSET), str(source))
        copy = self.workdir / "read-back.bin"
        self.client("read", TARGET, "--offset", str(OFFSET), "--length", str(len(data)),
                    "-o", str(copy))
        self.client("read", TARGET, "--offset", str(OFFSET), "--length", "96", "--hexdump")
        seen = copy.read_bytes()
        print(f"\nread back: {seen[:len(message)].decode('ascii', 'replace')!r}")
        matched = seen == data
        print(f"all {len(data)} bytes match what was written: {'yes' if matched else 'NO'}")
        if not matched:
            raise DemoError("the data read back differs from what was written")

        self.client("bench", TARGET, "--size", "8M", "--duration", "1", "--write")

        status = self.stop_server()
        how = "on the signal, as twistd does" if status == -signal.SIGTERM else f"status {status}"
        print(f"\nserver stopped with SIGTERM (it exited {how}); its log ends:")
        for line in self.server_log.read_text(errors="replace").splitlines()[-3:]:
            print(f"  {line}")


def main(argv: Sequence[str]) -> int:
    """Run the demo; return the exit status."""
    if os.geteuid() != 0:
        print("demo: needs root (it creates network namespaces and raw sockets); "
              "run: sudo make demo", file=sys.stderr)
        return 1
    if shutil.which("ip") is None:
        print("demo: needs the ip command (apt-get install iproute2)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(SRC))
    # Keep our lines in order with the commands' own output when piped (make demo | tee).
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    # Even if started with SIGINT ignored (a background job), Ctrl-C must clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    demo = Demo()
    try:
        demo.run()
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    finally:
        demo.cleanup()
    print("\ndemo: done; the namespaces and the veth pair are gone.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
