# -*- test-case-name: tests.test_metrics -*-
"""
``aoe_twisted.metrics``: the Prometheus endpoint.

Real scrapes over HTTP on the loopback (an ephemeral port, Twisted's
``Agent``), parsed with ``prometheus_client``'s own parser and compared with
the snapshot that was served; the pure snapshot-to-families conversion (with
a hypothesis property); ``parse_metrics_address``; the one-line listen errors.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from aoe_twisted.metrics import (
    DEFAULT_METRICS_HOST,
    INTERFACE_DIRECTIONS,
    REQUEST_KINDS,
    MetricsListenError,
    SnapshotCollector,
    SnapshotError,
    families_from_snapshot,
    listen_metrics,
    parse_metrics_address,
)

BUCKET_BOUNDS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                 0.05, 0.1, 0.25, 1.0]


def target_stats(name: str, backend: str, base: int) -> dict[str, Any]:
    """One target's entry of a snapshot, every figure distinct (derived from ``base``)."""
    cumulative = [base + 10 * i for i in range(len(BUCKET_BOUNDS))]
    count = cumulative[-1] + 7
    return {
        "target": name,
        "backend": backend,
        "requests": {kind: base + i + 1 for i, kind in enumerate(REQUEST_KINDS)},
        "bytes": {"read": base * 512 + 1, "write": base * 1024 + 3},
        "errors": {"ata": base + 2, "aoe_bad_argument": base + 3, "backend_ENOSPC": base + 4},
        "in_flight": base % 5 + 1,
        "retransmits": base + 6,
        "service_seconds": {
            "buckets": [[le, n] for le, n in zip(BUCKET_BOUNDS, cumulative, strict=True)]
            + [["+Inf", count]],
            "sum": base / 1000 + 0.125,
            "count": count,
        },
        "initiators": [
            {"mac": "52:54:00:12:34:56", "frames": base + 8, "last_seen": 1765000000.5 + base},
            {"mac": "52:54:00:ab:cd:ef", "frames": base + 9, "last_seen": 1765000100.25 + base},
        ],
    }


def full_snapshot() -> dict[str, Any]:
    """A snapshot with two targets, two interfaces and two initiators."""
    return {
        "time": 1765000200.0,
        "targets": [
            target_stats("e1.0", "file:/srv/aoe/disk0.img", 100),
            target_stats("e1.1", "memory:64M", 2000),
        ],
        "interfaces": [
            {"interface": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1500, "received": 501,
             "sent": 402, "ignored": 33, "dropped": 4, "malformed": 5, "stale": 3},
            {"interface": "eth1", "mac": "02:00:00:00:00:02", "mtu": 9000, "received": 7,
             "sent": 6, "ignored": 0, "dropped": 0, "malformed": 1, "stale": 0},
        ],
        "initiators": [
            {"mac": "52:54:00:12:34:56", "targets": ["e1.0", "e1.1"], "frames": 2116,
             "last_seen": 1765002000.5},
        ],
    }


EMPTY_SNAPSHOT: dict[str, Any] = {
    "time": 1765000000.0, "targets": [], "interfaces": [], "initiators": [],
}


def parse(text: str) -> dict[str, Any]:
    """``{family name: family}`` of a text exposition, by prometheus_client's parser."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: Mapping[str, Any], family: str, sample: str) -> dict[tuple, float]:
    """``{sorted label items: value}`` of one sample name of one family."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in families[family].samples
        if s.name == sample
    }


def expected_samples(snapshot: Mapping[str, Any]) -> dict[str, dict[tuple, float]]:
    """What a scrape of ``snapshot`` must show, computed independently of the module."""
    want: dict[str, dict[tuple, float]] = {
        name: {} for name in (
            "aoe_target_requests_total", "aoe_target_bytes_total", "aoe_target_errors_total",
            "aoe_target_request_seconds_bucket", "aoe_target_request_seconds_count",
            "aoe_target_request_seconds_sum", "aoe_target_in_flight",
            "aoe_target_retransmits_total", "aoe_target_info", "aoe_interface_frames_total",
            "aoe_initiator_frames_total", "aoe_initiator_last_seen_timestamp_seconds",
        )
    }
    for t in snapshot["targets"]:
        name = t["target"]
        for kind, n in t["requests"].items():
            want["aoe_target_requests_total"][(("kind", kind), ("target", name))] = n
        for direction, n in t["bytes"].items():
            want["aoe_target_bytes_total"][(("direction", direction), ("target", name))] = n
        for kind, n in t["errors"].items():
            want["aoe_target_errors_total"][(("kind", kind), ("target", name))] = n
        for le, n in t["service_seconds"]["buckets"]:
            key = (("le", le if le == "+Inf" else float(le)), ("target", name))
            want["aoe_target_request_seconds_bucket"][key] = n
        only = (("target", name),)
        want["aoe_target_request_seconds_count"][only] = t["service_seconds"]["count"]
        want["aoe_target_request_seconds_sum"][only] = t["service_seconds"]["sum"]
        want["aoe_target_in_flight"][only] = t["in_flight"]
        want["aoe_target_retransmits_total"][only] = t["retransmits"]
        want["aoe_target_info"][(("backend", t["backend"]), ("target", name))] = 1
        for i in t["initiators"]:
            key = (("initiator", i["mac"]), ("target", name))
            want["aoe_initiator_frames_total"][key] = i["frames"]
            want["aoe_initiator_last_seen_timestamp_seconds"][key] = i["last_seen"]
    for iface in snapshot["interfaces"]:
        for direction in INTERFACE_DIRECTIONS:
            key = (("direction", direction), ("interface", iface["interface"]))
            want["aoe_interface_frames_total"][key] = iface[direction]
    return want


FAMILY_OF = {
    "aoe_target_requests_total": "aoe_target_requests",
    "aoe_target_bytes_total": "aoe_target_bytes",
    "aoe_target_errors_total": "aoe_target_errors",
    "aoe_target_request_seconds_bucket": "aoe_target_request_seconds",
    "aoe_target_request_seconds_count": "aoe_target_request_seconds",
    "aoe_target_request_seconds_sum": "aoe_target_request_seconds",
    "aoe_target_in_flight": "aoe_target_in_flight",
    "aoe_target_retransmits_total": "aoe_target_retransmits",
    "aoe_target_info": "aoe_target_info",
    "aoe_interface_frames_total": "aoe_interface_frames",
    "aoe_initiator_frames_total": "aoe_initiator_frames",
    "aoe_initiator_last_seen_timestamp_seconds": "aoe_initiator_last_seen_timestamp_seconds",
}


def scraped(families: Mapping[str, Any]) -> dict[str, dict[tuple, float]]:
    """Every sample of ``families`` the module promises, in ``expected_samples``' shape."""
    got = {}
    for sample, family in FAMILY_OF.items():
        values = samples(families, family, sample)
        if sample == "aoe_target_request_seconds_bucket":
            values = {
                tuple((k, v if k != "le" or v == "+Inf" else float(v)) for k, v in key): n
                for key, n in values.items()
            }
        got[sample] = values
    return got


def local_text(snapshot: Mapping[str, Any]) -> str:
    """The text exposition of ``snapshot`` produced in this thread (no HTTP)."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: snapshot))
    return generate_latest(registry).decode()


class FamiliesTests(SynchronousTestCase):
    """``families_from_snapshot`` and the collector, without HTTP."""

    def test_every_figure(self) -> None:
        """Every figure of a full snapshot is in the exposition, with its labels."""
        snapshot = full_snapshot()
        self.assertEqual(scraped(parse(local_text(snapshot))), expected_samples(snapshot))

    def test_types(self) -> None:
        """Counters are counters, the service time a histogram, in-flight a gauge."""
        families = parse(local_text(full_snapshot()))
        self.assertEqual(
            {name: families[name].type for name in set(FAMILY_OF.values())},
            {
                "aoe_target_requests": "counter", "aoe_target_bytes": "counter",
                "aoe_target_errors": "counter", "aoe_target_request_seconds": "histogram",
                "aoe_target_in_flight": "gauge", "aoe_target_retransmits": "counter",
                "aoe_target_info": "gauge", "aoe_interface_frames": "counter",
                "aoe_initiator_frames": "counter",
                "aoe_initiator_last_seen_timestamp_seconds": "gauge",
            },
        )

    def test_missing_kinds_are_zero(self) -> None:
        """A kind or direction left out of the snapshot is exported as 0, so rate() has it."""
        snapshot = {"targets": [{"target": "e0.1", "backend": "memory:1M", "requests": {"read": 3},
                                 "errors": {}}],
                    "interfaces": [{"interface": "veth0", "sent": 2}]}
        families = parse(local_text(snapshot))
        requests = samples(families, "aoe_target_requests", "aoe_target_requests_total")
        self.assertEqual(
            requests,
            {(("kind", k), ("target", "e0.1")): (3.0 if k == "read" else 0.0)
             for k in REQUEST_KINDS},
        )
        errors = samples(families, "aoe_target_errors", "aoe_target_errors_total")
        self.assertEqual(errors, {(("kind", "ata"), ("target", "e0.1")): 0.0})
        frames = samples(families, "aoe_interface_frames", "aoe_interface_frames_total")
        self.assertEqual(
            frames,
            {(("direction", d), ("interface", "veth0")): (2.0 if d == "sent" else 0.0)
             for d in INTERFACE_DIRECTIONS},
        )

    def test_histogram_without_infinity(self) -> None:
        """A histogram without a +Inf bucket gets one from its count."""
        snapshot = {"targets": [{"target": "e0.1", "service_seconds": {
            "buckets": [[0.001, 2]], "sum": 0.5, "count": 9}}]}
        families = parse(local_text(snapshot))
        self.assertEqual(
            samples(families, "aoe_target_request_seconds", "aoe_target_request_seconds_bucket"),
            {(("le", "0.001"), ("target", "e0.1")): 2.0, (("le", "+Inf"), ("target", "e0.1")): 9.0},
        )
        self.assertEqual(
            samples(families, "aoe_target_request_seconds", "aoe_target_request_seconds_count"),
            {(("target", "e0.1"),): 9.0},
        )

    def test_empty(self) -> None:
        """An empty snapshot, or one without any section, gives every family and no sample."""
        for snapshot in (EMPTY_SNAPSHOT, {}):
            families = parse(local_text(snapshot))
            self.assertEqual(set(families), set(FAMILY_OF.values()))
            self.assertEqual([s for f in families.values() for s in f.samples], [])

    def test_malformed(self) -> None:
        """A snapshot of the wrong shape raises SnapshotError with one line."""
        for snapshot in ({"targets": [{"backend": "memory:1M"}]},
                         {"interfaces": [{"interface": "eth0", "sent": "many"}]},
                         {"targets": 3}):
            with self.assertRaises(SnapshotError) as caught:
                families_from_snapshot(snapshot)
            self.assertIn("the stats snapshot is malformed", str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_not_a_dict(self) -> None:
        """A snapshot function that returns no dict is a SnapshotError."""
        with self.assertRaises(SnapshotError) as caught:
            list(SnapshotCollector(lambda: [1, 2]).collect())
        self.assertEqual(str(caught.exception), "the stats snapshot is a list, not a dict")

    def test_raising_snapshot(self) -> None:
        """A snapshot function that raises gives SnapshotError naming the error."""
        def broken() -> dict:
            raise OSError("worker 2 did not answer")

        with self.assertRaises(SnapshotError) as caught:
            list(SnapshotCollector(broken).collect())
        self.assertEqual(
            str(caught.exception), "the stats snapshot failed: OSError: worker 2 did not answer"
        )

    def test_fired_deferred(self) -> None:
        """In the reactor thread, a snapshot may be a Deferred that has fired."""
        snapshot = full_snapshot()
        collector = SnapshotCollector(lambda: defer.succeed(snapshot))
        self.assertEqual(
            [f.name for f in collector.collect()],
            [f.name for f in families_from_snapshot(snapshot)],
        )
        with self.assertRaises(SnapshotError):
            list(SnapshotCollector(defer.Deferred).collect())

    def test_read_at_collect_time(self) -> None:
        """Each collect() takes a new snapshot: the collector keeps nothing between scrapes."""
        snapshot = full_snapshot()
        registry = CollectorRegistry()
        registry.register(SnapshotCollector(lambda: snapshot))
        key = (("kind", "read"), ("target", "e1.0"))
        first = samples(parse(generate_latest(registry).decode()),
                        "aoe_target_requests", "aoe_target_requests_total")[key]
        snapshot["targets"][0]["requests"]["read"] += 1000
        second = samples(parse(generate_latest(registry).decode()),
                         "aoe_target_requests", "aoe_target_requests_total")[key]
        self.assertEqual(second - first, 1000)

    @settings(max_examples=50, deadline=None)
    @given(
        counts=st.lists(st.integers(0, 2**52), min_size=23, max_size=23),
        seconds=st.floats(0, 1e6, allow_nan=False),
        seen=st.floats(0, 4e9, allow_nan=False),
    )
    def test_property_round_trip(self, counts: list[int], seconds: float, seen: float) -> None:
        """Any counter values up to 2**52 survive exposition and parsing exactly."""
        target = target_stats("e65535.255", "file:/a \"quoted\" \\ path", 0)
        target["requests"] = dict(zip(REQUEST_KINDS, counts[:8], strict=True))
        target["bytes"] = {"read": counts[8], "write": counts[9]}
        target["errors"] = {"ata": counts[10], "backend_EIO": counts[11]}
        target["retransmits"] = counts[12]
        target["in_flight"] = counts[13]
        target["service_seconds"]["sum"] = seconds
        target["initiators"][0]["frames"] = counts[14]
        target["initiators"][0]["last_seen"] = seen
        iface = dict(zip(INTERFACE_DIRECTIONS, counts[15:21], strict=True), interface="eth0")
        snapshot = {"targets": [target], "interfaces": [iface]}
        self.assertEqual(scraped(parse(local_text(snapshot))), expected_samples(snapshot))


class MetricsServer:
    """``listen_metrics`` on 127.0.0.1 (or ``host``), port 0, over a mutable snapshot."""

    def __init__(
        self, case: TestCase, snapshot: Any, host: str = "127.0.0.1", timeout: float = 10.0
    ) -> None:
        self.snapshot = snapshot
        self.calls: list[threading.Thread] = []
        self.port = listen_metrics(reactor, (host, 0), self._snapshot, timeout=timeout)
        case.addCleanup(self.port.stopListening)
        where = f"[{host}]" if ":" in host else host
        self.base = f"http://{where}:{self.port.getHost().port}".encode()

    def _snapshot(self) -> Any:
        self.calls.append(threading.current_thread())
        return self.snapshot() if callable(self.snapshot) else self.snapshot


@defer.inlineCallbacks
def fetch(url: bytes):  # type: ignore[no-untyped-def]
    """GET ``url`` with Twisted's ``Agent``; fire with ``(code, headers, body)``."""
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = yield agent.request(b"GET", url)
    body = yield readBody(response)
    # Let the server side see the connection close before the test ends.
    yield task.deferLater(reactor, 0.01, lambda: None)
    return response.code, response.headers, body


class ScrapeTests(TestCase):
    """Real scrapes of ``listen_metrics`` over HTTP on the loopback."""

    @defer.inlineCallbacks
    def test_scrape(self):  # type: ignore[no-untyped-def]
        """/metrics serves the snapshot's figures, parsed by prometheus_client's parser."""
        snapshot = full_snapshot()
        server = MetricsServer(self, snapshot)
        code, headers, body = yield fetch(server.base + b"/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        self.assertEqual(scraped(parse(body.decode())), expected_samples(snapshot))

    @defer.inlineCallbacks
    def test_snapshot_in_reactor_thread(self):  # type: ignore[no-untyped-def]
        """The snapshot is taken in the reactor thread, once per scrape, at scrape time."""
        snapshot = full_snapshot()
        server = MetricsServer(self, snapshot)
        self.assertEqual(server.calls, [])
        yield fetch(server.base + b"/metrics")
        snapshot["interfaces"][0]["received"] = 99999
        _, _, body = yield fetch(server.base + b"/metrics")
        self.assertEqual(server.calls, [threading.main_thread()] * 2)
        frames = samples(parse(body.decode()), "aoe_interface_frames",
                         "aoe_interface_frames_total")
        self.assertEqual(frames[(("direction", "received"), ("interface", "eth0"))], 99999)

    @defer.inlineCallbacks
    def test_deferred_snapshot(self):  # type: ignore[no-untyped-def]
        """A snapshot function may return a Deferred (as asking --workers would)."""
        snapshot = full_snapshot()
        server = MetricsServer(
            self, lambda: task.deferLater(reactor, 0.05, lambda: snapshot)
        )
        code, _, body = yield fetch(server.base + b"/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(scraped(parse(body.decode())), expected_samples(snapshot))

    @defer.inlineCallbacks
    def test_empty_snapshot(self):  # type: ignore[no-untyped-def]
        """A server with nothing to report yet answers every family with no sample."""
        server = MetricsServer(self, EMPTY_SNAPSHOT)
        code, _, body = yield fetch(server.base + b"/metrics")
        self.assertEqual(code, 200)
        families = parse(body.decode())
        self.assertEqual(set(families), set(FAMILY_OF.values()))
        self.assertEqual([s for f in families.values() for s in f.samples], [])

    @defer.inlineCallbacks
    def test_failing_snapshot(self):  # type: ignore[no-untyped-def]
        """A snapshot that raises answers 500 and logs the error; the next scrape works."""
        snapshot = full_snapshot()
        broken = [True]

        def take() -> dict:
            if broken[0]:
                raise RuntimeError("counters unavailable")
            return snapshot

        server = MetricsServer(self, take)
        code, _, _ = yield fetch(server.base + b"/metrics")
        self.assertEqual(code, 500)
        logged = self.flushLoggedErrors(SnapshotError)
        self.assertEqual(len(logged), 1)
        self.assertEqual(
            str(logged[0].value), "the stats snapshot failed: RuntimeError: counters unavailable"
        )
        broken[0] = False
        code, _, body = yield fetch(server.base + b"/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(scraped(parse(body.decode())), expected_samples(snapshot))

    @defer.inlineCallbacks
    def test_snapshot_that_never_comes(self):  # type: ignore[no-untyped-def]
        """A snapshot that never arrives answers 500 after the timeout, not never."""
        server = MetricsServer(self, defer.Deferred, timeout=0.2)
        started = reactor.seconds()
        code, _, _ = yield fetch(server.base + b"/metrics")
        self.assertEqual(code, 500)
        self.assertLess(reactor.seconds() - started, 5)
        logged = self.flushLoggedErrors(SnapshotError)
        self.assertEqual(
            [str(f.value) for f in logged],
            ["no stats snapshot within 0.2 s (reactor busy or stopping)"],
        )

    @defer.inlineCallbacks
    def test_root_and_unknown_paths(self):  # type: ignore[no-untyped-def]
        """/ is a short text page pointing at /metrics; other paths are 404."""
        server = MetricsServer(self, EMPTY_SNAPSHOT)
        code, headers, body = yield fetch(server.base + b"/")
        self.assertEqual((code, body), (200, b"aoe-twisted: Prometheus metrics are at /metrics\n"))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        code, _, _ = yield fetch(server.base + b"/nothing")
        self.assertEqual(code, 404)
        self.assertEqual(server.calls, [])

    @defer.inlineCallbacks
    def test_ipv6(self):  # type: ignore[no-untyped-def]
        """An IPv6 host works: a scrape over [::1]."""
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback here: {e}") from e
        snapshot = full_snapshot()
        server = MetricsServer(self, snapshot, host="::1")
        code, _, body = yield fetch(server.base + b"/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(scraped(parse(body.decode())), expected_samples(snapshot))

    def test_two_servers(self) -> defer.Deferred[None]:
        """Two endpoints in one process keep apart (private registries)."""
        first, second = full_snapshot(), EMPTY_SNAPSHOT
        one = MetricsServer(self, first)
        two = MetricsServer(self, second)

        def check(results: list[tuple[int, Any, bytes]]) -> None:
            self.assertEqual(scraped(parse(results[0][2].decode())), expected_samples(first))
            self.assertEqual(scraped(parse(results[1][2].decode())), expected_samples(second))

        return defer.gatherResults(
            [fetch(one.base + b"/metrics"), fetch(two.base + b"/metrics")]
        ).addCallback(check)


class ListenErrorTests(TestCase):
    """A port that cannot listen is one line the caller prints."""

    def test_address_in_use(self) -> None:
        """An address in use: '--metrics HOST:PORT: cannot listen: Address already in use'."""
        taken = reactor.listenTCP(0, any_factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        with self.assertRaises(MetricsListenError) as caught:
            listen_metrics(reactor, ("127.0.0.1", port), dict)
        self.assertEqual(
            str(caught.exception),
            f"--metrics 127.0.0.1:{port}: cannot listen: Address already in use",
        )

    def test_address_not_here(self) -> None:
        """An address this machine does not have, with the label the config file passes."""
        with self.assertRaises(MetricsListenError) as caught:
            listen_metrics(reactor, ("192.0.2.1", 9580), dict, label="[server] metrics")
        self.assertEqual(
            str(caught.exception),
            "[server] metrics 192.0.2.1:9580: cannot listen: Cannot assign requested address",
        )

    def test_ipv6_address_in_brackets(self) -> None:
        """An IPv6 address in the line is in brackets."""
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback here: {e}") from e
        taken = reactor.listenTCP(0, any_factory(), interface="::1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        with self.assertRaises(MetricsListenError) as caught:
            listen_metrics(reactor, ("::1", port), dict)
        self.assertEqual(
            str(caught.exception), f"--metrics [::1]:{port}: cannot listen: Address already in use"
        )


def any_factory() -> Factory:
    """A factory for a port that only occupies an address."""
    return Factory.forProtocol(Protocol)


class ParseAddressTests(SynchronousTestCase):
    """``parse_metrics_address``: ``[HOST:]PORT``."""

    def test_good(self) -> None:
        """A port alone binds to 127.0.0.1; a host, bracketed IPv6 or name is kept."""
        cases = {
            "9580": (DEFAULT_METRICS_HOST, 9580),
            "1": ("127.0.0.1", 1),
            "65535": ("127.0.0.1", 65535),
            "0.0.0.0:9580": ("0.0.0.0", 9580),
            "192.168.1.20:80": ("192.168.1.20", 80),
            "[::1]:9580": ("::1", 9580),
            "[::]:9580": ("::", 9580),
            "[fe80::1%eth0]:9580": ("fe80::1%eth0", 9580),
            "localhost:9580": ("localhost", 9580),
            "metrics.lab-1.example:9580": ("metrics.lab-1.example", 9580),
            " 9580\n": ("127.0.0.1", 9580),
        }
        self.assertEqual({text: parse_metrics_address(text) for text in cases}, cases)

    def test_bad(self) -> None:
        """Anything else is a ValueError of one line that quotes the input."""
        cases = {
            "": "expected [HOST:]PORT",
            "abc": "expected [HOST:]PORT",
            ":9580": "expected [HOST:]PORT",
            "0": "the port must be a number from 1 to 65535",
            "65536": "the port must be a number from 1 to 65535",
            "127.0.0.1:0": "the port must be a number from 1 to 65535",
            "127.0.0.1:": "the port must be a number from 1 to 65535",
            "127.0.0.1:http": "the port must be a number from 1 to 65535",
            "127.0.0.1:-1": "the port must be a number from 1 to 65535",
            "1.2.3.4.5:80": "'1.2.3.4.5' is not an IPv4 address",
            "300.1.1.1:80": "'300.1.1.1' is not an IPv4 address",
            "::1:9580": "an IPv6 address goes in brackets",
            "[::1]9580": "expected [HOST:]PORT",
            "[::1:9580": "expected [HOST:]PORT",
            "[1.2.3.4]:80": "'1.2.3.4' is not an IPv6 address",
            "bad_host:80": "'bad_host' is not a host name or address",
            "-x:80": "'-x' is not a host name or address",
            "\u0663\u0664:80": "is not a host name or address",
            "\u0663": "expected [HOST:]PORT",
        }
        for text, reason in cases.items():
            with self.assertRaises(ValueError) as caught:
                parse_metrics_address(text)
            message = str(caught.exception)
            self.assertIn(reason, message, text)
            self.assertTrue(message.startswith(repr(text)), message)
            self.assertNotIn("\n", message)


class ImportTests(SynchronousTestCase):
    """Importing the module is cheap and safe before twistd picks a reactor."""

    def test_import_installs_no_reactor(self) -> None:
        """``import aoe_twisted.metrics`` installs no reactor (``twistd --reactor`` comes later)."""
        code = "import sys, aoe_twisted.metrics; print('twisted.internet.reactor' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(out, "False\n")
