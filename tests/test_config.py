# -*- test-case-name: tests.test_config -*-
"""
``aoe_twisted.config``: the config file, the ``--target`` option grammar and reload diffs.

Pure logic, so no server runs here: every bad file gives exactly the one
line expected (file, ``[server]`` key or ``[[target]]`` number, problem);
a full file parses to the values expected; ``[server]`` defaults resolve
into the targets; ``diff_configs`` sorts targets into added, removed,
changed and unchanged; ``format_target_option`` is the inverse of
``parse_target_option`` (a property test).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.config import (
    LIVE_KEYS,
    RESTART_KEYS,
    ConfigChanges,
    ConfigError,
    ServerConfig,
    TargetConfig,
    check_interface_name,
    diff_configs,
    format_target_option,
    load_config,
    parse_config,
    parse_metrics,
    parse_target_option,
    parse_target_settings,
    slice_error,
)

MAC1 = bytes.fromhex("525400123456")
MAC2 = bytes.fromhex("525400123457")

#: A [server] table with interfaces, for the target checks that need one.
SERVER = '[server]\ninterfaces = ["eth0"]\n'


def target(address: str = "1.0", backend: str = "file:x.img", **keys: str) -> str:
    """Return a ``[[target]]`` table with these keys (each value already TOML)."""
    lines = ["[[target]]", f'address = "{address}"', f'backend = "{backend}"']
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


#: (config text, the whole error line for the source "aoe.toml").
BAD_FILES = [
    # The document's shape.
    ("foo = 1", "aoe.toml: foo: unknown key; a config file has [server] and [[target]]"),
    ("[srever]\n", "aoe.toml: srever: unknown table; a config file has [server] and [[target]]"),
    ('[target]\naddress = "1.0"\n',
     "aoe.toml: target: [target] is a single table; each target is an entry of an array of "
     "tables: write [[target]]"),
    ("[[server]]\nworkers = 1\n",
     "aoe.toml: server: expected one table ([server]), found [[server]]"),
    ("server = 3\n", "aoe.toml: server: expected one table ([server]), found an integer (3)"),
    ("target = [1, 2]\n",
     "aoe.toml: target: expected an array of tables ([[target]]), found an array (2 items)"),
    ("[server\n",
     "aoe.toml: invalid TOML: Expected ']' at the end of a table declaration "
     "(at line 1, column 8)"),
    # [server] keys.
    ("[server]\nworkres = 2\n", "aoe.toml: [server] workres: unknown key; did you mean workers?"),
    ('[server]\nsync = "true"\n',
     "aoe.toml: [server] sync: expected a boolean (true or false), found a string ('true'); "
     "write true without quotes"),
    ("[server]\nread_only = [true]\n",
     "aoe.toml: [server] read_only: expected a boolean (true or false), found an array (1 item)"),
    ('[server]\ninterfaces = "eth0"\n',
     "aoe.toml: [server] interfaces: expected an array of strings, found a string ('eth0'); "
     'write ["eth0"]'),
    ("[server]\ninterfaces = [1]\n",
     'aoe.toml: [server] interfaces: expected an array of strings, e.g. ["eth0"], found an '
     "integer (1) in the array"),
    ('[server]\ninterfaces = ["eth0", "eth0"]\n',
     "aoe.toml: [server] interfaces: eth0 is given twice"),
    ('[server]\ninterfaces = [""]\n',
     "aoe.toml: [server] interfaces: '' is not an interface name (1..15 bytes, no '/', ':' or "
     "spaces)"),
    ('[server]\ninterfaces = ["a/b"]\n',
     "aoe.toml: [server] interfaces: 'a/b' is not an interface name (1..15 bytes, no '/', ':' "
     "or spaces)"),
    ('[server]\ninterfaces = ["abcdefghijklmnop"]\n',
     "aoe.toml: [server] interfaces: 'abcdefghijklmnop' is not an interface name (1..15 bytes, "
     "no '/', ':' or spaces)"),
    ("[server]\nworkers = 65\n", "aoe.toml: [server] workers: must be 1..64, not 65"),
    ("[server]\nworkers = 0\n", "aoe.toml: [server] workers: must be 1..64, not 0"),
    ("[server]\nworkers = 2.0\n",
     "aoe.toml: [server] workers: expected an integer, found a float (2.0)"),
    ("[server]\nbuffer_count = 65536\n",
     "aoe.toml: [server] buffer_count: must be 1..65535, not 65536"),
    ("[server]\nmax_sectors = 0\n", "aoe.toml: [server] max_sectors: must be 1..255, not 0"),
    ("[server]\nring_frames = 255\n",
     "aoe.toml: [server] ring_frames: must be 256..65536, not 255"),
    ("[server]\nstale_after = 3601\n",
     "aoe.toml: [server] stale_after: must be 0..3600, not 3601"),
    ("[server]\nstale_after = 0.5\n",
     "aoe.toml: [server] stale_after: expected an integer, found a float (0.5)"),
    ('[server]\ninterfaces = ["eth0"]\nring_frames = 256\n' + target(buffer_count="300"),
     "aoe.toml: [server] ring_frames: 256 frames do not hold one full window of buffer_count "
     "300 of [[target]] #1 (e1.0)"),
    ("[server]\nbuffer_count = 300\nring_frames = 256\n",
     "aoe.toml: [server] ring_frames: 256 frames do not hold one full window of buffer_count "
     "300"),
    ('[server]\nmetrics = "a:b:9580"\n',
     "aoe.toml: [server] metrics: not [HOST:]PORT: 'a:b:9580' (e.g. 9580, 127.0.0.1:9580 or "
     "[::1]:9580)"),
    ("[server]\nmetrics = 65536\n", "aoe.toml: [server] metrics: port must be 0..65535, not 65536"),
    ("[server]\nmetrics = true\n",
     'aoe.toml: [server] metrics: expected "HOST:PORT" or a port number, found a boolean (true)'),
    ('[server]\ncontrol = ""\n', "aoe.toml: [server] control: empty"),
    (f'[server]\ncontrol = "/{"x" * 107}"\n',
     "aoe.toml: [server] control: 108 bytes long; a UNIX socket path is at most 107"),
    ('[server]\ncontrol_group = "aoe"\n',
     "aoe.toml: [server] control_group: needs control (the socket it opens to the group)"),
    ("[server]\nstate_dir = 1\n",
     "aoe.toml: [server] state_dir: expected a string, found an integer (1)"),
    ("[server]\nremoved_grace = -1\n",
     "aoe.toml: [server] removed_grace: must be 0..86400 seconds, not -1"),
    ("[server]\nduplicate_wait = nan\n",
     "aoe.toml: [server] duplicate_wait: must be a finite number of seconds, not nan"),
    ('[server]\nduplicate_wait = "1s"\n',
     "aoe.toml: [server] duplicate_wait: expected a number of seconds, found a string ('1s')"),
    # [[target]] keys.
    (SERVER + '[[target]]\nbackend = "file:x"\n',
     'aoe.toml: [[target]] #1 address: missing, e.g. address = "1.0"'),
    (SERVER + '[[target]]\naddress = "1.0"\n',
     'aoe.toml: [[target]] #1 backend: missing, e.g. backend = "file:/srv/aoe/disk0.img"'),
    (SERVER + '[[target]]\naddress = 1.0\nbackend = "file:x"\n',
     'aoe.toml: [[target]] #1 address: expected a string such as "1.0", found a float (1.0); '
     "quote it"),
    (SERVER + target("x1"),
     "aoe.toml: [[target]] #1 address: not a target address: 'x1' (expected SHELF.SLOT or "
     "eSHELF.SLOT, e.g. e1.0)"),
    (SERVER + target("65535.0"),
     "aoe.toml: [[target]] #1 address: '65535.0': the shelf must be 0..65534 and the slot "
     "0..254"),
    (SERVER + target("1.255"),
     "aoe.toml: [[target]] #1 address: '1.255': the shelf must be 0..65534 and the slot "
     "0..254"),
    (SERVER + target("1.0") + target("2.0") + target("e1.0", "file:y.img"),
     "aoe.toml: [[target]] #3 (e1.0) address: e1.0 is also [[target]] #1"),
    (SERVER + target(backend="x.img"),
     "aoe.toml: [[target]] #1 (e1.0) backend: 'x.img' is not SCHEME:SPEC, e.g. file:disk.img"),
    (SERVER + target(readonly="true"),
     "aoe.toml: [[target]] #1 (e1.0) readonly: unknown key; did you mean read_only?"),
    (SERVER + target(colour='"red"'),
     "aoe.toml: [[target]] #1 (e1.0) colour: unknown key (known: address, backend, "
     "buffer_count, config_string, direct, interfaces, length, mask, max_sectors, offset, "
     "read_only, sync)"),
    (SERVER + target(read_only='"yes"'),
     "aoe.toml: [[target]] #1 (e1.0) read_only: expected a boolean (true or false), found a "
     "string ('yes')"),
    (SERVER + target(offset="1000"),
     "aoe.toml: [[target]] #1 (e1.0) offset: not a multiple of 512: 1000"),
    (SERVER + target(offset="-512"), "aoe.toml: [[target]] #1 (e1.0) offset: negative: -512"),
    (SERVER + target(length='"1000"'),
     "aoe.toml: [[target]] #1 (e1.0) length: not a multiple of 512: 1000"),
    (SERVER + target(length='"1 M"'),
     "aoe.toml: [[target]] #1 (e1.0) length: not a size: '1 M' (give a number of bytes, or a "
     "number followed by K, M, G or T (powers of 1024) or s (512-byte sectors), e.g. 4096, "
     "0x1000, 64M or 8s)"),
    (SERVER + target(length="1.5"),
     "aoe.toml: [[target]] #1 (e1.0) length: expected a number of bytes (an integer, or a "
     'string such as "1M"), found a float (1.5)'),
    (SERVER + target(mask='["zz"]'),
     "aoe.toml: [[target]] #1 (e1.0) mask: not a MAC address: 'zz'"),
    (SERVER + target(mask='"52:54:00:12:34:56"'),
     "aoe.toml: [[target]] #1 (e1.0) mask: expected an array of strings, found a string "
     "('52:54:00:12:34:56'); write [\"52:54:00:12:34:56\"]"),
    (SERVER + target(mask=json.dumps([f"02:00:00:00:00:{i:02x}" for i in range(65)])),
     "aoe.toml: [[target]] #1 (e1.0) mask: 65 MAC addresses, at most 64"),
    (SERVER + target(mask='["52:54:00:12:34:56", "52-54-00-12-34-56"]'),
     "aoe.toml: [[target]] #1 (e1.0) mask: 52:54:00:12:34:56 is given twice"),
    (SERVER + target(config_string=json.dumps("x" * 1025)),
     "aoe.toml: [[target]] #1 (e1.0) config_string: 1025 bytes, at most 1024"),
    (SERVER + target(config_string=json.dumps("\u00e9" * 513)),
     "aoe.toml: [[target]] #1 (e1.0) config_string: 1026 bytes, at most 1024"),
    (SERVER + target(buffer_count="0"),
     "aoe.toml: [[target]] #1 (e1.0) buffer_count: must be 1..65535, not 0"),
    (SERVER + target(max_sectors="256"),
     "aoe.toml: [[target]] #1 (e1.0) max_sectors: must be 1..255, not 256"),
    (SERVER + target(max_sectors='"17"'),
     "aoe.toml: [[target]] #1 (e1.0) max_sectors: expected an integer, found a string ('17')"),
    (SERVER + target(interfaces="[]"),
     "aoe.toml: [[target]] #1 (e1.0) interfaces: empty; leave it out to use the [server] "
     "interfaces"),
    (SERVER + target(interfaces='["eth0:1"]'),
     "aoe.toml: [[target]] #1 (e1.0) interfaces: 'eth0:1' is not an interface name (1..15 "
     "bytes, no '/', ':' or spaces)"),
    (target(),
     "aoe.toml: [[target]] #1 (e1.0) interfaces: none: give [server] interfaces or the "
     "target's own"),
    ("[server]\n" + target("1.0", interfaces='["eth1"]') + target("1.1"),
     "aoe.toml: [[target]] #2 (e1.1) interfaces: none: give [server] interfaces or the "
     "target's own"),
]


class BadFileTests(SynchronousTestCase):
    """Every mistake in a config file is one ``ConfigError`` line: file, location, key, problem."""

    def test_each_check(self) -> None:
        """Each bad file gives exactly the line expected, and nothing else is raised."""
        for text, expected in BAD_FILES:
            with self.subTest(expected=expected):
                error = self.assertRaises(ConfigError, parse_config, text, "aoe.toml")
                self.assertEqual(str(error), expected)
                self.assertNotIn("\n", str(error))

    def test_parts(self) -> None:
        """The parts of the line are kept apart too, for callers that report them separately."""
        error = self.assertRaises(
            ConfigError, parse_config, SERVER + target() + target("2.0", offset="1"), "a.toml"
        )
        self.assertEqual(
            (error.source, error.where, error.key, error.problem),
            ("a.toml", "[[target]] #2 (e2.0)", "offset", "not a multiple of 512: 1"),
        )

    def test_overlapping_slices_allowed(self) -> None:
        """Two targets may serve overlapping slices of one backend: no error."""
        config = parse_config(
            SERVER
            + target("1.0", "file:x.img", offset='"1M"', length='"2M"')
            + target("1.1", "file:x.img", offset='"2M"')
        )
        self.assertEqual([t.offset for t in config.targets], [1 << 20, 2 << 20])

    def test_missing_file(self) -> None:
        """A file that does not exist: ``PATH: cannot read: No such file or directory``."""
        path = os.path.join(self.mktemp(), "none.toml")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}: cannot read: No such file or directory")

    def test_directory(self) -> None:
        """A directory instead of a file says so."""
        path = self.mktemp()
        os.mkdir(path)
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}: cannot read: Is a directory")

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is refused as invalid TOML, naming the byte."""
        path = Path(self.mktemp())
        path.write_bytes(b"[server]\nworkers = 1 # \xff\n")
        error = self.assertRaises(ConfigError, load_config, str(path))
        self.assertEqual(
            str(error), f"{path}: invalid TOML: not UTF-8 (byte 0xff at offset 23)"
        )

    def test_syntax_in_file(self) -> None:
        """A TOML syntax error in a file names the file, the line and the column."""
        path = Path(self.mktemp())
        path.write_text("[server]\nworkers = = 2\n")
        error = self.assertRaises(ConfigError, load_config, str(path))
        self.assertEqual(str(error), f"{path}: invalid TOML: Invalid value (at line 2, column 11)")

    @settings(max_examples=150, deadline=None)
    @given(st.data())
    def test_anything_is_a_config_or_one_line(self, data: st.DataObject) -> None:
        """Any mix of keys and TOML values is a config or one ``ConfigError`` line: no crash."""
        document = data.draw(_documents())
        text = _toml(document)
        try:
            config = parse_config(text, "f.toml")
        except ConfigError as e:
            self.assertTrue(str(e).startswith("f.toml: "), str(e))
            self.assertNotIn("\n", str(e))
        else:
            self.assertIsInstance(config, ServerConfig)
            for t in config.targets:
                self.assertTrue(t.interfaces)


_PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
_VALUES = st.one_of(
    st.booleans(),
    st.integers(-(1 << 20), 1 << 20),
    st.sampled_from([0, 512, 4096, 65535, 65536, 1.5, 1e300]),
    _PRINTABLE,
    st.sampled_from(["1.0", "e2.3", "file:x", "1M", "eth0", "52:54:00:12:34:56", "9580"]),
    st.lists(st.sampled_from(["eth0", "eth1", "", "52:54:00:12:34:56", "x/y"]), max_size=3),
    st.lists(st.integers(0, 3), max_size=2),
)
_TARGET_KEY_NAMES = [
    "address", "backend", "read_only", "sync", "direct", "offset", "length", "interfaces",
    "mask", "config_string", "buffer_count", "max_sectors", "bogus",
]
_SERVER_KEY_NAMES = [
    "interfaces", "control", "control_group", "metrics", "state_dir", "buffer_count",
    "max_sectors", "sync", "direct", "read_only", "workers", "ring_frames", "removed_grace",
    "duplicate_wait", "stale_after", "bogus",
]


@st.composite
def _documents(draw: st.DrawFn) -> dict[str, object]:
    """A TOML document of known and unknown keys with values of any TOML type."""
    server = draw(st.dictionaries(st.sampled_from(_SERVER_KEY_NAMES), _VALUES, max_size=4))
    targets = draw(
        st.lists(
            st.fixed_dictionaries(
                {"address": st.sampled_from(["1.0", "1.1", "2.0"]) | _VALUES,
                 "backend": st.just("file:x") | _VALUES},
                optional={key: _VALUES for key in _TARGET_KEY_NAMES[2:]},
            ),
            max_size=3,
        )
    )
    return {"server": server, "target": targets}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value)


def _toml(document: dict[str, object]) -> str:
    """Write ``document`` (a [server] dict and a list of [[target]] dicts) as TOML."""
    lines = ["[server]"]
    server = document["server"]
    assert isinstance(server, dict)
    lines += [f"{k} = {_toml_value(v)}" for k, v in server.items()]
    targets = document["target"]
    assert isinstance(targets, list)
    for table in targets:
        lines.append("[[target]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


FULL = """\
[server]
interfaces = ["eth0", "eth1"]
control = "/run/aoe-twisted/control.sock"
control_group = "aoe"
metrics = "127.0.0.1:9580"
state_dir = "/var/lib/aoe-twisted"
buffer_count = 32
max_sectors = 8
sync = true
direct = false
read_only = false
workers = 4
ring_frames = 1024
removed_grace = 30
duplicate_wait = 0.25
stale_after = 2

[[target]]
address = "1.0"
backend = "file:/srv/aoe/disk0.img"

[[target]]
address = "e1.1"
backend = "file:/srv/aoe/disk1.img"
read_only = true
sync = false
direct = true
offset = "1M"
length = 4194304
interfaces = ["eth1"]
mask = ["52:54:00:12:34:56", "52-54-00-12-34-57"]
config_string = "lab 1"
buffer_count = 64
max_sectors = 17

[[target]]
address = "0x10.2"
backend = "memory:64M"
"""


class FullExampleTests(SynchronousTestCase):
    """A file with every key parses to exactly these values."""

    def test_full(self) -> None:
        """Every [server] key, a target taking the defaults and one overriding all of them."""
        config = parse_config(FULL, "full.toml")
        defaults = {"interfaces": ("eth0", "eth1"), "buffer_count": 32, "max_sectors": 8,
                    "sync": True}
        expected = ServerConfig(
            interfaces=("eth0", "eth1"),
            control="/run/aoe-twisted/control.sock",
            control_group="aoe",
            metrics=("127.0.0.1", 9580),
            state_dir="/var/lib/aoe-twisted",
            buffer_count=32,
            max_sectors=8,
            sync=True,
            direct=False,
            read_only=False,
            workers=4,
            ring_frames=1024,
            removed_grace=30.0,
            duplicate_wait=0.25,
            stale_after=2,
            targets=(
                TargetConfig(1, 0, "file:/srv/aoe/disk0.img", **defaults),
                TargetConfig(
                    1, 1, "file:/srv/aoe/disk1.img",
                    read_only=True, sync=False, direct=True, offset=1 << 20, length=4 << 20,
                    interfaces=("eth1",), mask=(MAC1, MAC2), config_string=b"lab 1",
                    buffer_count=64, max_sectors=17,
                ),
                TargetConfig(16, 2, "memory:64M", **defaults),
            ),
            source="full.toml",
        )
        self.assertEqual(config, expected)
        self.assertEqual([t.address for t in config.targets], ["e1.0", "e1.1", "e16.2"])
        self.assertEqual(config.targets[1].key, (1, 1))

    def test_load(self) -> None:
        """``load_config`` reads a file and records its path as the source."""
        path = Path(self.mktemp())
        path.write_text(FULL)
        self.assertEqual(load_config(str(path)), parse_config(FULL, str(path)))
        self.assertEqual(load_config(str(path)).source, str(path))

    def test_empty(self) -> None:
        """An empty file is valid: the defaults, and no targets (they can be added later)."""
        self.assertEqual(parse_config("", "e.toml"), ServerConfig(source="e.toml"))

    def test_inline_targets(self) -> None:
        """``target = [{...}]`` (an array of inline tables) is the same as ``[[target]]``."""
        inline = parse_config('target = [{address = "1.0", backend = "file:x.img"}]\n' + SERVER)
        self.assertEqual(inline, parse_config(SERVER + target()))

    def test_metrics_forms(self) -> None:
        """A port alone (integer or string) binds 127.0.0.1; hosts and [IPv6] are kept."""
        for value, expected in [
            ("9580", ("127.0.0.1", 9580)),
            ('"9580"', ("127.0.0.1", 9580)),
            ('"0.0.0.0:80"', ("0.0.0.0", 80)),
            ('"[::1]:9580"', ("::1", 9580)),
            ('"localhost:0"', ("localhost", 0)),
        ]:
            config = parse_config(f"[server]\nmetrics = {value}\n")
            self.assertEqual(config.metrics, expected, value)

    def test_parse_metrics_errors(self) -> None:
        """``parse_metrics`` (also for ``--metrics``) refuses each malformed form in one line."""
        for text, message in [
            ("", "not a port number: '' in ''"),
            ("host:", "not a port number: '' in 'host:'"),
            ("::1:80", "not [HOST:]PORT: '::1:80' (e.g. 9580, 127.0.0.1:9580 or [::1]:9580)"),
            ("[]:80", "not an IPv6 address in [...]: '[]:80'"),
            ("[nothex]:80", "not an IPv6 address in [...]: '[nothex]:80'"),
            ("99999", "port must be 0..65535, not 99999"),
            ("-1", "not a port number: '-1' in '-1'"),
        ]:
            error = self.assertRaises(ValueError, parse_metrics, text)
            self.assertEqual(str(error), message)


class ResolutionTests(SynchronousTestCase):
    """``[server]`` gives each target the keys it does not set itself."""

    def test_server_defaults(self) -> None:
        """buffer_count, max_sectors, sync, direct, read_only and interfaces come from [server]."""
        config = parse_config(
            '[server]\ninterfaces = ["eth2"]\nbuffer_count = 16\nmax_sectors = 2\nsync = true\n'
            "direct = true\nread_only = true\n" + target()
        )
        self.assertEqual(
            config.targets[0],
            TargetConfig(1, 0, "file:x.img", read_only=True, sync=True, direct=True,
                         interfaces=("eth2",), buffer_count=16, max_sectors=2),
        )

    def test_target_overrides(self) -> None:
        """A target's own value wins over [server]'s, false over true included."""
        config = parse_config(
            '[server]\ninterfaces = ["eth2"]\nbuffer_count = 16\nmax_sectors = 2\nsync = true\n'
            "read_only = true\n"
            + target(interfaces='["eth3", "eth4"]', buffer_count="8", max_sectors="9",
                     sync="false", read_only="false")
        )
        self.assertEqual(
            config.targets[0],
            TargetConfig(1, 0, "file:x.img", interfaces=("eth3", "eth4"), buffer_count=8,
                         max_sectors=9),
        )

    def test_builtin_defaults(self) -> None:
        """With no [server] values, a target gets TargetConfig's defaults."""
        config = parse_config(SERVER + target())
        self.assertEqual(config.targets[0], TargetConfig(1, 0, "file:x.img", interfaces=("eth0",)))
        self.assertEqual(config.targets[0].buffer_count, 64)
        self.assertIsNone(config.targets[0].max_sectors)

    def test_target_defaults(self) -> None:
        """``target_defaults`` resolves a ``--target`` (``ctl add``) as the file does."""
        config = parse_config('[server]\ninterfaces = ["eth2"]\nread_only = true\n' + target())
        self.assertEqual(
            parse_target_option("1.0=file:x.img", config.target_defaults()), config.targets[0]
        )


def _config(*targets: TargetConfig, **server: object) -> ServerConfig:
    return ServerConfig(targets=targets, **server)  # type: ignore[arg-type]


A = TargetConfig(1, 0, "file:a.img", interfaces=("eth0",))
B = TargetConfig(1, 1, "file:b.img", interfaces=("eth0",))
C = TargetConfig(1, 2, "file:c.img", interfaces=("eth0",))


class DiffTests(SynchronousTestCase):
    """``diff_configs``: what a reload adds, removes, changes and leaves alone."""

    def test_same(self) -> None:
        """Equal configs: every target unchanged, nothing else."""
        self.assertEqual(
            diff_configs(_config(A, B), _config(A, B)), ConfigChanges(unchanged=(A, B))
        )

    def test_targets(self) -> None:
        """Matched by address: added, removed, changed (old, new), unchanged."""
        b2 = attrs.evolve(B, read_only=True)
        d = TargetConfig(2, 0, "file:a.img", interfaces=("eth0",))
        changes = diff_configs(_config(A, B, C), _config(d, b2, C))
        self.assertEqual(
            changes,
            ConfigChanges(added=(d,), removed=(A,), changed=((B, b2),), unchanged=(C,)),
        )

    def test_resolved_fields_compared(self) -> None:
        """A [server] default that changes shows as a change of the targets that use it."""
        old = parse_config(SERVER + target() + target("1.1", interfaces='["eth1"]'))
        new = parse_config('[server]\ninterfaces = ["eth2"]\n' + target()
                           + target("1.1", interfaces='["eth1"]'))
        changes = diff_configs(old, new)
        self.assertEqual(changes.changed, ((old.targets[0], new.targets[0]),))
        self.assertEqual(changes.unchanged, (new.targets[1],))
        self.assertEqual(changes.restart, ())
        self.assertEqual(changes.live, ("interfaces",))

    def test_restart(self) -> None:
        """Each [server] key a running server cannot change is named in ``restart``."""
        values = {"workers": 2, "control": "/run/c.sock", "control_group": "aoe",
                  "metrics": ("127.0.0.1", 1), "state_dir": "/var/lib/x", "ring_frames": 512,
                  "stale_after": 0}
        self.assertEqual(set(values), set(RESTART_KEYS))
        for key, value in values.items():
            changes = diff_configs(_config(A), _config(A, **{key: value}))
            self.assertEqual((changes.restart, changes.live), ((key,), ()), key)
            self.assertEqual(changes.unchanged, (A,))

    def test_live(self) -> None:
        """The other [server] keys are applied live, and named in ``live``."""
        values = {"interfaces": ("eth9",), "buffer_count": 8, "max_sectors": 3, "sync": True,
                  "direct": True, "read_only": True, "removed_grace": 1.0,
                  "duplicate_wait": 2.0, "backend_timeout": 5.0}
        self.assertEqual(set(values), set(LIVE_KEYS))
        for key, value in values.items():
            changes = diff_configs(_config(A), _config(A, **{key: value}))
            self.assertEqual((changes.restart, changes.live), ((), (key,)), key)

    def test_source_ignored(self) -> None:
        """The same settings read from another file are no change."""
        self.assertEqual(
            diff_configs(_config(A, source="a.toml"), _config(A, source="b.toml")),
            ConfigChanges(unchanged=(A,)),
        )


class SliceErrorTests(SynchronousTestCase):
    """``slice_error``: a slice must lie inside its backend, checked once the size is known."""

    def test_inside(self) -> None:
        """The whole disk, a slice to the end, and a slice ending exactly at the end are fine."""
        for offset, length in [(0, 0), (512, 0), (0, 4096), (512, 3584)]:
            t = TargetConfig(1, 0, "file:x.img", offset=offset, length=length)
            self.assertIsNone(slice_error(t, 4096), (offset, length))

    def test_past_end(self) -> None:
        """An offset at or past the end, or a length running past it, is named."""
        for offset, length, message in [
            (1 << 20, 0, "offset 1048576 is past the end of file:x.img (1048576 bytes)"),
            (1 << 21, 512, "offset 2097152 is past the end of file:x.img (1048576 bytes)"),
            ((1 << 20) - 512, 1024,
             "offset 1048064 + length 1024 is past the end of file:x.img (1048576 bytes)"),
            (0, 1 << 21, "length 2097152 is past the end of file:x.img (1048576 bytes)"),
        ]:
            t = TargetConfig(1, 0, "file:x.img", offset=offset, length=length)
            self.assertEqual(slice_error(t, 1 << 20), message)


class TargetOptionTests(SynchronousTestCase):
    """``parse_target_option``: ``ADDRESS=SCHEME:SPEC[,KEY[=VALUE]]...``."""

    def test_example(self) -> None:
        """The documented example: every kind of key, repeated list keys, aliases."""
        self.assertEqual(
            parse_target_option(
                "1.0=file:/srv/d.img,read_only,offset=1M,length=64M,mask=52:54:00:12:34:56,"
                "mask=52:54:00:12:34:57,iface=eth1,config_string=hello"
            ),
            TargetConfig(1, 0, "file:/srv/d.img", read_only=True, offset=1 << 20,
                         length=64 << 20, mask=(MAC1, MAC2), interfaces=("eth1",),
                         config_string=b"hello"),
        )

    def test_values(self) -> None:
        """Booleans in every spelling, numbers in hex, ``max_sectors=none``, aliases."""
        for option, expected in [
            ("ro", {"read_only": True}),
            ("read_only=yes", {"read_only": True}),
            ("sync=ON", {"sync": True}),
            ("direct=1", {"direct": True}),
            ("read_only=false,sync=no,direct=off", {}),
            ("ro=0", {}),
            ("buffer_count=0x10", {"buffer_count": 16}),
            ("buffer_count=010", {"buffer_count": 10}),
            ("max_sectors=17", {"max_sectors": 17}),
            ("max_sectors=none", {}),
            ("offset=8s,length=0x400", {"offset": 4096, "length": 1024}),
            ("interfaces=eth0,iface=eth1", {"interfaces": ("eth0", "eth1")}),
            ("config_string=a=b", {"config_string": b"a=b"}),
            ("config_string=", {}),
            ("config_string=caf\u00e9", {"config_string": "caf\u00e9".encode()}),
        ]:
            self.assertEqual(
                parse_target_option("e1.2=memory:1M," + option),
                TargetConfig(1, 2, "memory:1M", **expected),  # type: ignore[arg-type]
                option,
            )

    def test_defaults(self) -> None:
        """``defaults`` fill the keys not given; given keys (lists too) replace them."""
        defaults = {"read_only": True, "interfaces": ("eth0", "eth1"), "mask": (MAC1,),
                    "buffer_count": 8}
        self.assertEqual(
            parse_target_option("1.0=file:x", defaults),
            TargetConfig(1, 0, "file:x", read_only=True, interfaces=("eth0", "eth1"),
                         mask=(MAC1,), buffer_count=8),
        )
        self.assertEqual(
            parse_target_option("1.0=file:x,ro=off,iface=eth2,mask=", defaults),
            TargetConfig(1, 0, "file:x", interfaces=("eth2",), buffer_count=8),
        )

    def test_backend_commas(self) -> None:
        """Options come off the end; segments that start with no key stay in the backend."""
        for text, backend, expected in [
            ("1.0=nbd:host,port=10809", "nbd:host,port=10809", {}),
            ("1.0=nbd:host,port=10809,ro", "nbd:host,port=10809", {"read_only": True}),
            ("1.0=x:a,sync,b", "x:a,sync,b", {}),
            ("1.0=x:a,", "x:a,", {}),
            ("1.0=x:a=b", "x:a=b", {}),
            ("1.0=x:a\\,sync", "x:a\\,sync", {}),
            ("1.0=x:a,config_string=p\\,q\\\\", "x:a", {"config_string": b"p,q\\"}),
        ]:
            self.assertEqual(
                parse_target_option(text),
                TargetConfig(1, 0, backend, **expected),  # type: ignore[arg-type]
                text,
            )

    def test_errors(self) -> None:
        """Each mistake is one ``ValueError`` line naming the key."""
        for text, message in [
            ("1.0", "expected ADDRESS=SCHEME:SPEC[,KEY[=VALUE]]..., not '1.0'"),
            ("1.0=", "expected ADDRESS=SCHEME:SPEC[,KEY[=VALUE]]..., not '1.0='"),
            ("x=file:y",
             "address: not a target address: 'x' (expected SHELF.SLOT or eSHELF.SLOT, e.g. e1.0)"),
            ("65535.0=file:y",
             "address: '65535.0': the shelf must be 0..65534 and the slot 0..254"),
            ("1.0=y,ro", "backend: 'y' is not SCHEME:SPEC, e.g. file:disk.img"),
            ("1.0=file:,ro", "backend: 'file:' is not SCHEME:SPEC, e.g. file:disk.img"),
            ("1.0=file:x,offset=1000", "offset: not a multiple of 512: 1000"),
            ("1.0=file:x,length", "length: needs a value (length=VALUE)"),
            ("1.0=file:x,ro=maybe",
             "ro: not a boolean: 'maybe' (true/false, yes/no, on/off, 1/0)"),
            ("1.0=file:x,readonly", "readonly: unknown key; did you mean read_only?"),
            ("1.0=file:x,sync,sync=off", "sync: given twice (sync, then sync=off)"),
            ("1.0=file:x,ro,read_only", "read_only: given twice (ro, then read_only)"),
            ("1.0=file:x,buffer_count=0", "buffer_count: must be 1..65535, not 0"),
            ("1.0=file:x,buffer_count=ten", "buffer_count: not a number: 'ten'"),
            ("1.0=file:x,max_sectors=256", "max_sectors: must be 1..255, not 256"),
            ("1.0=file:x,mask=zz", "mask: not a MAC address: 'zz'"),
            ("1.0=file:x,mask=52:54:00:12:34:56,mask=525400123456",
             "mask: 52:54:00:12:34:56 is given twice"),
            ("1.0=file:x,iface=", "iface: empty interface name"),
            ("1.0=file:x,iface=a/b",
             "iface: 'a/b' is not an interface name (1..15 bytes, no '/', ':' or spaces)"),
            ("1.0=file:x,iface=eth0,iface=eth0", "iface: eth0 is given twice"),
            ("1.0=file:x,config_string=" + "x" * 1025, "config_string: 1025 bytes, at most 1024"),
        ]:
            error = self.assertRaises(ValueError, parse_target_option, text)
            self.assertEqual(str(error), message)

    def test_too_many_macs(self) -> None:
        """More MACs than a mask list holds is refused, naming the key."""
        text = "1.0=file:x," + ",".join(f"mask=02:00:00:00:00:{i:02x}" for i in range(65))
        error = self.assertRaises(ValueError, parse_target_option, text)
        self.assertEqual(str(error), "mask: 65 MAC addresses, at most 64")

    def test_no_interfaces_left_to_caller(self) -> None:
        """With no iface and no default, the target has none: the caller decides."""
        self.assertEqual(parse_target_option("1.0=file:x").interfaces, ())


class SettingsTests(SynchronousTestCase):
    """``parse_target_settings``: ``ctl set``/``ctl add`` settings as field values."""

    def test_values(self) -> None:
        """Keys become field names, values typed, lists gathered, ready for ``attrs.evolve``."""
        result = parse_target_settings(
            ["read_only=on", "mask=52:54:00:12:34:56", "mask=52:54:00:12:34:57", "sync",
             "iface=eth1", "config_string=a,b", "offset=1M", "max_sectors=none",
             "backend=file:/srv/b.img"]
        )
        self.assertEqual(
            result,
            {"read_only": True, "mask": (MAC1, MAC2), "sync": True, "interfaces": ("eth1",),
             "config_string": b"a,b", "offset": 1 << 20, "max_sectors": None,
             "backend": "file:/srv/b.img"},
        )
        evolved = attrs.evolve(A, **result)  # type: ignore[arg-type]
        self.assertEqual(evolved.mask, (MAC1, MAC2))

    def test_clear_mask(self) -> None:
        """``mask=`` alone is the empty mask list."""
        self.assertEqual(parse_target_settings(["mask="]), {"mask": ()})
        self.assertEqual(parse_target_settings([]), {})

    def test_errors(self) -> None:
        """One line naming the key."""
        for pairs, message in [
            (["read_only=maybe"],
             "read_only: not a boolean: 'maybe' (true/false, yes/no, on/off, 1/0)"),
            (["address=1.1"],
             "address: not a setting; an address cannot change (remove the target and add it "
             "again)"),
            (["colour=red"],
             "colour: unknown key (known: backend, buffer_count, config_string, direct, iface, "
             "interfaces, length, mask, max_sectors, offset, read_only, ro, sync)"),
            (["offset"], "offset: needs a value (offset=VALUE)"),
            (["offset=1000"], "offset: not a multiple of 512: 1000"),
            (["backend=nothing"], "backend: 'nothing' is not SCHEME:SPEC, e.g. file:disk.img"),
            (["sync", "sync=no"], "sync: given twice (sync, then sync=no)"),
        ]:
            error = self.assertRaises(ValueError, parse_target_settings, pairs)
            self.assertEqual(str(error), message, pairs)


class TargetConfigTests(SynchronousTestCase):
    """A ``TargetConfig`` checks its own fields, so ``attrs.evolve`` cannot make a bad one."""

    def test_checked(self) -> None:
        """Each bad field is a ``ValueError`` naming it."""
        for change, message in [
            ({"offset": 100}, "offset: not a multiple of 512: 100"),
            ({"length": -512}, "length: negative: -512"),
            ({"read_only": 1}, "read_only: expected true or false, found 1"),
            ({"mask": (b"12345",)}, "mask: a MAC address is 6 bytes, not b'12345'"),
            ({"interfaces": ["eth0"]},
             "interfaces: expected a tuple of interface names, found ['eth0']"),
            ({"config_string": "x"}, "config_string: expected bytes, found 'x'"),
            ({"buffer_count": 0}, "buffer_count: must be 1..65535, not 0"),
            ({"max_sectors": 0}, "max_sectors: must be 1..255, not 0"),
            ({"slot": 255}, "slot: must be 0..254, not 255"),
            ({"shelf": 0xFFFF}, "shelf: must be 0..65534, not 65535"),
            ({"backend": "x"}, "backend: 'x' is not SCHEME:SPEC, e.g. file:disk.img"),
        ]:
            error = self.assertRaises(ValueError, attrs.evolve, A, **change)
            self.assertEqual(str(error), message)

    def test_interface_names(self) -> None:
        """``check_interface_name`` (for ``--iface`` too) allows what the kernel allows."""
        for name in ["eth0", "a" * 15, "br-lan.10", "x,y"]:
            self.assertEqual(check_interface_name(name), name)
        for name in ["", "a" * 16, ".", "..", "a/b", "a:b", "a b", "\u00e9" * 8]:
            self.assertRaises(ValueError, check_interface_name, name)


# --- the round trip ---------------------------------------------------------------------------

_KEY_WORDS = sorted(
    ["read_only", "ro", "sync", "direct", "offset", "length", "interfaces", "iface", "mask",
     "config_string", "buffer_count", "max_sectors"]
)
_names = st.text(st.sampled_from("abceht0189.-_,=\\"), min_size=1, max_size=15).filter(
    lambda n: n not in (".", "..")
)
_byte_counts = st.integers(0, 1 << 30).map(lambda n: n * 512)
_spec_text = st.text(st.sampled_from("abz/._-=:0\\,"), max_size=20).filter(
    lambda s: not s.endswith("\\")
)


@st.composite
def _backends(draw: st.DrawFn) -> str:
    """A ``SCHEME:SPEC`` that the grammar can carry: its last comma-segment is no option."""
    backend = draw(st.sampled_from(["file", "memory", "block", "x-y"])) + ":" + draw(
        st.text(st.sampled_from("abz/._-=:0"), min_size=1, max_size=10)
    )
    tail = draw(_spec_text)
    if tail:
        backend += "," + draw(st.sampled_from("/0.")) + tail
    return backend


_targets = st.builds(
    TargetConfig,
    shelf=st.integers(0, 0xFFFE),
    slot=st.integers(0, 0xFE),
    backend=_backends(),
    read_only=st.booleans(),
    sync=st.booleans(),
    direct=st.booleans(),
    offset=_byte_counts,
    length=_byte_counts,
    interfaces=st.lists(_names, min_size=1, max_size=3, unique=True).map(tuple),
    mask=st.lists(st.binary(min_size=6, max_size=6), max_size=4, unique=True).map(tuple),
    config_string=st.binary(max_size=40) | st.binary(min_size=1024, max_size=1024),
    buffer_count=st.integers(1, 0xFFFF),
    max_sectors=st.none() | st.integers(1, 255),
)
_defaults = st.fixed_dictionaries(
    {},
    optional={
        "read_only": st.booleans(),
        "sync": st.booleans(),
        "direct": st.booleans(),
        "interfaces": st.lists(_names, max_size=2, unique=True).map(tuple),
        "mask": st.lists(st.binary(min_size=6, max_size=6), max_size=2, unique=True).map(tuple),
        "buffer_count": st.integers(1, 0xFFFF),
        "max_sectors": st.none() | st.integers(1, 255),
        "config_string": st.binary(max_size=4),
    },
)


class RoundTripTests(SynchronousTestCase):
    """``format_target_option`` writes what ``parse_target_option`` reads back unchanged."""

    @settings(max_examples=300, deadline=None)
    @given(_targets, _defaults)
    def test_round_trip(self, t: TargetConfig, defaults: dict[str, object]) -> None:
        """Any target, against any defaults, survives format then parse."""
        text = format_target_option(t, defaults)
        self.assertEqual(parse_target_option(text, defaults), t, text)

    @settings(max_examples=100, deadline=None)
    @given(_targets)
    def test_only_differences_written(self, t: TargetConfig) -> None:
        """Against itself as the defaults, only the address and the backend are written."""
        defaults = {k: getattr(t, k) for k in attrs.fields_dict(TargetConfig)}
        for k in ("shelf", "slot", "backend"):
            del defaults[k]
        self.assertEqual(format_target_option(t, defaults), f"{t.shelf}.{t.slot}={t.backend}")

    def test_example(self) -> None:
        """A readable text: bare booleans, size suffixes, one ``mask=`` per MAC, escaped commas."""
        t = TargetConfig(1, 0, "file:/srv/d.img", read_only=True, offset=1 << 20,
                         length=3 * 512, interfaces=("eth1",), mask=(MAC1, MAC2),
                         config_string=b"a,b", max_sectors=17)
        self.assertEqual(
            format_target_option(t),
            "1.0=file:/srv/d.img,read_only,offset=1M,length=1536,iface=eth1,"
            "mask=52:54:00:12:34:56,mask=52:54:00:12:34:57,config_string=a\\,b,max_sectors=17",
        )
        self.assertEqual(
            format_target_option(attrs.evolve(t, read_only=False, mask=(), max_sectors=None),
                                 {"read_only": True, "mask": (MAC1,), "max_sectors": 8}),
            "1.0=file:/srv/d.img,read_only=off,offset=1M,length=1536,iface=eth1,mask=,"
            "config_string=a\\,b,max_sectors=none",
        )

    def test_unwritable(self) -> None:
        """A backend the grammar would split, or no interfaces against some, is refused."""
        for t, defaults in [
            (TargetConfig(1, 0, "x:a,sync"), {}),
            (TargetConfig(1, 0, "x:a,readonly=1"), {}),
            (TargetConfig(1, 0, "x:a\\", read_only=True), {}),
            (TargetConfig(1, 0, "x:a"), {"interfaces": ("eth0",)}),
        ]:
            error = self.assertRaises(ValueError, format_target_option, t, defaults)
            self.assertNotIn("\n", str(error))
