# -*- test-case-name: tests.test_docs_operations -*-
"""
docs/operations.md, docs/options.md, docs/deployment.md and the systemd unit say what the code does.

Each test reads a document and checks it against the code it describes: the
example config parses, every config key and ``twistd aoe`` option is
documented (and nothing that does not exist), every ``ctl`` command has its
section, the metrics table is what the endpoint exposes for the sample
snapshot, and the unit runs the server from a config file the deployment
guide's example satisfies.  A new key, option, command or metric without its
documentation fails here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from attrs import fields
from prometheus_client import CollectorRegistry, generate_latest
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.config import (
    ConfigError,
    ServerConfig,
    TargetConfig,
    parse_config,
    parse_target_option,
)
from aoe_twisted.control.ctl import build_parser
from aoe_twisted.core.stats import SERVICE_BUCKETS
from aoe_twisted.metrics import families_from_snapshot
from aoe_twisted.tap import Options

_ROOT = Path(__file__).resolve().parent.parent
_DOCS = _ROOT / "docs"
OPERATIONS = _DOCS / "operations.md"
OPTIONS = _DOCS / "options.md"
DEPLOYMENT = _DOCS / "deployment.md"
UNIT = _DOCS / "systemd" / "aoe-twisted@.service"

#: The initiator of the fixed options.md example.
_ONE_HOST = bytes.fromhex("525400123456")


def _blocks(text: str, language: str) -> list[str]:
    """Return the fenced code blocks of ``text`` opened with ```` ```language ````."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def _section(text: str, heading: str) -> str:
    """
    Return the section under the heading line ``heading``, up to the next heading as high.

    Lines inside fenced code blocks are never headings (``# a comment``).
    """
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n") + len(heading) + 1
    lines = text[start:].splitlines(keepends=True)
    fenced = False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            return "".join(lines[:index])
    return "".join(lines)


def _first_cells(section: str) -> list[str]:
    """Return the first cell of each row of the tables in ``section`` (header rows left out)."""
    cells = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cells.append(line.split("|")[1])
    return cells


def _names(cells: list[str]) -> set[str]:
    """Return every name in backquotes in ``cells``."""
    return {name for cell in cells for name in re.findall(r"`([^`]+)`", cell)}


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Return each ``Key=value`` of a unit file as key to the list of its values."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def _example_config() -> str:
    """The full example of docs/operations.md: its first TOML block."""
    return _blocks(OPERATIONS.read_text(), "toml")[0]


class ExampleConfigTests(SynchronousTestCase):
    """The config files the documents show are valid, and mean what the text says."""

    def test_example_parses(self) -> None:
        """The full example parses, with the slice and the defaults its comments describe."""
        config = parse_config(_example_config(), "operations.md")
        self.assertEqual([t.address for t in config.targets], ["e1.0", "e1.1", "e1.2"])
        lab = config.targets[1]
        self.assertEqual((lab.read_only, lab.offset, lab.length), (True, 1 << 20, 128 << 20))
        self.assertEqual(config.metrics, ("127.0.0.1", 9580))
        self.assertEqual(config.targets[2].mask, (_ONE_HOST,))
        self.assertTrue(all(t.interfaces == ("eth0",) for t in config.targets))

    def test_commented_keys_parse(self) -> None:
        """The example's commented-out keys are real keys: uncommented, the file still parses."""
        text, count = re.subn(r"^# (\w+ = )", r"\1", _example_config(), flags=re.MULTILINE)
        self.assertGreater(count, 0)
        config = parse_config(text, "operations.md")
        self.assertEqual(config.control_group, "aoe-twisted")

    def test_deployment_examples_parse(self) -> None:
        """Every config file in docs/deployment.md parses (the shell here-document too)."""
        text = DEPLOYMENT.read_text()
        files = _blocks(text, "toml")
        files += re.findall(r"<<'TOML'\n(.*?)^TOML$", text, re.DOTALL | re.MULTILINE)
        self.assertGreaterEqual(len(files), 3)
        for number, body in enumerate(files, 1):
            parse_config(body, f"deployment.md #{number}")


class KeyReferenceTests(SynchronousTestCase):
    """The key tables of docs/operations.md list exactly the keys config.py reads."""

    def setUp(self) -> None:
        text = OPERATIONS.read_text()
        self.server_keys = _names(_first_cells(_section(text, "### `[server]` keys")))
        self.target_keys = _names(_first_cells(_section(text, "### `[[target]]` keys")))

    def test_server_keys(self) -> None:
        """Every ``ServerConfig`` field is a documented ``[server]`` key, and nothing else is."""
        expected = {f.name for f in fields(ServerConfig)} - {"targets", "source"}
        self.assertEqual(self.server_keys, expected)

    def test_target_keys(self) -> None:
        """Every ``TargetConfig`` field (address for shelf and slot) is a documented key."""
        expected = {f.name for f in fields(TargetConfig)} - {"shelf", "slot"} | {"address"}
        self.assertEqual(self.target_keys, expected)

    def test_documented_keys_are_read(self) -> None:
        """The parser knows each documented key: none is refused as an unknown key."""
        for key in sorted(self.server_keys):
            problem = _problem(f"[server]\n{key} = true\n")
            self.assertNotIn("unknown key", problem, key)
        for key in sorted(self.target_keys - {"address", "backend"}):
            problem = _problem(
                f'[server]\ninterfaces = ["eth0"]\n[[target]]\naddress = "1.0"\n'
                f'backend = "memory:1M"\n{key} = true\n'
            )
            self.assertNotIn("unknown key", problem, key)
        self.assertIn("unknown key", _problem("[server]\nno_such_key = true\n"))


def _problem(text: str) -> str:
    """Return the ``ConfigError`` line ``text`` gets, or ``""`` if it parses."""
    try:
        parse_config(text, "probe")
    except ConfigError as e:
        return str(e)
    return ""


class OptionsDocTests(SynchronousTestCase):
    """docs/options.md documents every option and per-target key, and its examples work."""

    def test_every_option_documented(self) -> None:
        """Each ``twistd aoe`` option has a row in the option table."""
        options = Options()
        names = {p[0] for p in options.optParameters} | {f[0] for f in options.optFlags}
        names |= {"iface", "mask", "target"}  # the opt_ methods
        rows = _first_cells(OPTIONS.read_text())
        documented = {m for cell in rows for m in re.findall(r"`--([a-z-]+)", cell)}
        self.assertEqual(names - documented, set())

    def test_per_target_keys(self) -> None:
        """The per-target table lists the keys ``--target`` splits off, and they all are."""
        section = _section(OPTIONS.read_text(), "## Per-target options")
        keys = _names(_first_cells(section))
        expected = {f.name for f in fields(TargetConfig)} - {"shelf", "slot", "backend"}
        self.assertEqual(keys, expected | {"ro", "iface"})
        for key in sorted(keys):
            try:
                target = parse_target_option(f"1.0=memory:1M,{key}=x")
            except ValueError as e:
                self.assertNotIn("unknown key", str(e), key)
            else:  # an option that takes any text: split off, not left in the backend
                self.assertEqual(target.backend, "memory:1M", key)

    def _examples(self) -> list[list[str]]:
        """The ``twistd aoe`` command lines of the Examples section, as argument lists after aoe."""
        block = _blocks(_section(OPTIONS.read_text(), "## Examples"), "")[0]
        lines = block.replace("\\\n", " ").splitlines()
        commands = []
        for line in lines:
            if line.startswith("twistd "):
                argv = shlex.split(line)
                commands.append(argv[argv.index("aoe") + 1 :])
        return commands

    def test_examples_parse(self) -> None:
        """Every example command line is accepted (the ``--config`` one has no file here)."""
        commands = [argv for argv in self._examples() if "--config" not in argv]
        self.assertGreaterEqual(len(commands), 4)
        for argv in commands:
            Options().parseOptions(argv)

    def test_read_only_for_everybody_but_one_host(self) -> None:
        """
        The example says "read-only for everybody as e1.0, writable by one host as e1.1".

        So: e1.0 read-only and unmasked; e1.1 the same disk, writable, masked
        to the one host; e1.2 read-only and unmasked (before the per-target
        options every target ended up read-only and masked).
        """
        (argv,) = [a for a in self._examples() if "1.1=block:/dev/sdb,mask=52:54:00:12:34:56" in a]
        options = Options()
        options.parseOptions(argv)
        e10, e11, e12 = options["targets"]
        self.assertEqual((e10.read_only, e10.mask), (True, ()))
        self.assertEqual((e11.read_only, e11.mask), (False, (_ONE_HOST,)))
        self.assertEqual(e11.backend, e10.backend)
        self.assertEqual((e12.read_only, e12.mask), (True, ()))


class ControlDocTests(SynchronousTestCase):
    """Every ``aoe-twisted ctl`` command has its section in docs/operations.md."""

    def test_every_command_documented(self) -> None:
        """A ``### `name``` heading for each command the parser knows."""
        parser = build_parser()
        (commands,) = [a for a in parser._actions if a.dest == "command"]
        text = OPERATIONS.read_text()
        for name in commands.choices:
            self.assertIn(f"\n### `{name}`\n", text, name)


class MetricsDocTests(SynchronousTestCase):
    """The stats sample is a real snapshot; the metrics table is what the endpoint exposes."""

    def setUp(self) -> None:
        self.text = OPERATIONS.read_text()
        section = _section(self.text, "### The snapshot format (`ctl stats --json`)")
        self.snapshot: dict[str, Any] = json.loads(_blocks(section, "json")[0])

    def _exposed(self) -> set[str]:
        """The metric names the endpoint exposes for the sample snapshot (``# TYPE`` lines)."""
        snapshot = self.snapshot

        class Collector:
            def collect(self) -> Any:
                return families_from_snapshot(snapshot)

        registry = CollectorRegistry()
        registry.register(Collector())  # type: ignore[arg-type]
        exposition = generate_latest(registry).decode()
        return set(re.findall(r"^# TYPE (\S+) ", exposition, re.MULTILINE))

    def test_buckets(self) -> None:
        """The sample's histogram has the bounds the code uses: powers of two µs, then +Inf."""
        (target,) = self.snapshot["targets"]
        bounds = [bound for bound, _ in target["service_seconds"]["buckets"]]
        self.assertEqual(bounds, [*SERVICE_BUCKETS, "+Inf"])

    def test_table_is_what_is_exposed(self) -> None:
        """The metrics table names exactly the families exposed for the sample snapshot."""
        table = _names(_first_cells(_section(self.text, "## Prometheus metrics")))
        self.assertEqual({n for n in table if n.startswith("aoe_")}, self._exposed())

    def test_sample_scrape_names(self) -> None:
        """Every series in the sample scrape belongs to an exposed family."""
        section = _section(self.text, "## Prometheus metrics")
        scrape = _blocks(section, "")[0]
        exposed = self._exposed()
        series = re.findall(r"^(aoe_\w+)\{", scrape, re.MULTILINE)
        self.assertGreater(len(series), 20)
        for name in series:
            family = re.sub(r"_(bucket|count|sum)$", "", name)
            self.assertIn(family if family in exposed else name, exposed, name)


class SystemdUnitConfigTests(SynchronousTestCase):
    """The unit runs ``twistd aoe --config`` and reloads with SIGHUP; deployment.md agrees."""

    def setUp(self) -> None:
        self.settings = _unit_settings(UNIT.read_text())

    def test_exec_start_reads_the_instance_config(self) -> None:
        """``ExecStart`` is ``twistd ... aoe --config /etc/aoe-twisted/%i.toml``, nothing more."""
        (exec_start,) = self.settings["ExecStart"]
        argv = shlex.split(exec_start)
        self.assertEqual(argv[1:], [
            "--nodaemon", "--pidfile=", "aoe", "--config", "/etc/aoe-twisted/%i.toml",
        ])

    def test_the_guide_config_starts(self) -> None:
        """``twistd aoe`` accepts the unit's arguments with the deployment guide's file."""
        text = DEPLOYMENT.read_text()
        (body,) = re.findall(r"<<'TOML'\n(.*?)^TOML$", text, re.DOTALL | re.MULTILINE)
        path = Path(self.mktemp())
        path.write_text(body)
        options = Options()
        options.parseOptions(["--config", str(path)])
        config = options["server-config"]
        (runtime,) = self.settings["RuntimeDirectory"]
        (state,) = self.settings["StateDirectory"]
        self.assertEqual(config.control, f"/run/{runtime}/control.sock")
        self.assertEqual(config.state_dir, "/var/lib/" + state.replace("%i", "aoe"))

    def test_reload_restart_and_sockets(self) -> None:
        """SIGHUP to the main process, restarted always; netlink, metrics and control allowed."""
        s = self.settings
        self.assertEqual(s["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        self.assertEqual(s["Restart"], ["always"])
        self.assertEqual(s["RuntimeDirectoryPreserve"], ["yes"])
        (families,) = s["RestrictAddressFamilies"]
        self.assertEqual(
            set(families.split()), {"AF_PACKET", "AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
        )
        self.assertNotIn("EnvironmentFile", s)
