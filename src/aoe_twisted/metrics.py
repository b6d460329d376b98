# -*- test-case-name: tests.test_metrics -*-
"""
The Prometheus endpoint: ``--metrics [HOST:]PORT`` / ``[server] metrics``.

The server already keeps its own counters (the stats snapshot that
``aoe-twisted ctl stats`` shows).  This module adds nothing to the data
path: a ``prometheus_client`` custom collector (``SnapshotCollector``) turns
one snapshot into metric families *when Prometheus scrapes*, and
``prometheus_client``'s own Twisted resource serves them in the text format
at ``/metrics``.  With ``--workers N`` the snapshot is already the sum over
the workers, so the figures are too.

The resource runs the exposition in the reactor's thread pool (that is how
``prometheus_client.twisted.MetricsResource`` works); the collector calls
``snapshot()`` back in the reactor thread, where the server's counters live,
and waits for it (at most ``timeout`` seconds).  A snapshot that fails
answers that scrape with HTTP 500 and logs the error; the server and the
next scrape are not affected.  A private ``CollectorRegistry`` per endpoint
keeps two servers in one process apart.

Metrics (counters end in ``_total``; every series of a target carries
``target="e1.0"``)::

    aoe_target_requests_total{target,kind}      kind: read write identify flush
                                                other_ata config mask reserve
    aoe_target_bytes_total{target,direction}    direction: read write
    aoe_target_errors_total{target,kind}        kind: ata, aoe_<code> (AoE error
                                                replies), backend_<cause> (ENOSPC,
                                                EIO, short_read, timeout...)
    aoe_target_request_seconds                  histogram (target label): service
                                                time of a request
    aoe_target_in_flight{target}                gauge: disk operations not done
    aoe_target_retransmits_total{target}        same tag again from same initiator
    aoe_target_info{target,backend}             always 1: which disk a target is
    aoe_interface_frames_total{interface,direction}
                                                direction: received sent ignored
                                                dropped malformed
    aoe_initiator_frames_total{target,initiator}
    aoe_initiator_last_seen_timestamp_seconds{target,initiator}

A sample scrape (``curl -s http://127.0.0.1:9580/metrics``; ``...`` marks
lines left out)::

    # HELP aoe_target_requests_total AoE requests a target received, by kind.
    # TYPE aoe_target_requests_total counter
    aoe_target_requests_total{kind="read",target="e1.0"} 18211.0
    aoe_target_requests_total{kind="write",target="e1.0"} 5012.0
    aoe_target_requests_total{kind="identify",target="e1.0"} 2.0
    aoe_target_requests_total{kind="flush",target="e1.0"} 0.0
    aoe_target_requests_total{kind="other_ata",target="e1.0"} 0.0
    aoe_target_requests_total{kind="config",target="e1.0"} 4.0
    aoe_target_requests_total{kind="mask",target="e1.0"} 0.0
    aoe_target_requests_total{kind="reserve",target="e1.0"} 0.0
    # HELP aoe_target_bytes_total Bytes a target read from or wrote to its disk.
    # TYPE aoe_target_bytes_total counter
    aoe_target_bytes_total{direction="read",target="e1.0"} 1.6315392e+07
    aoe_target_bytes_total{direction="write",target="e1.0"} 2.566144e+06
    # HELP aoe_target_errors_total Requests answered with an error, by kind: ata, aoe_<code>, backend_<cause>.
    # TYPE aoe_target_errors_total counter
    aoe_target_errors_total{kind="ata",target="e1.0"} 0.0
    aoe_target_errors_total{kind="backend_ENOSPC",target="e1.0"} 3.0
    # HELP aoe_target_request_seconds Time the disk took to serve a request (its backend call).
    # TYPE aoe_target_request_seconds histogram
    aoe_target_request_seconds_bucket{le="1e-06",target="e1.0"} 120.0
    aoe_target_request_seconds_bucket{le="2e-06",target="e1.0"} 20110.0
    aoe_target_request_seconds_bucket{le="4e-06",target="e1.0"} 22900.0
    ...
    aoe_target_request_seconds_bucket{le="1.048576",target="e1.0"} 23225.0
    aoe_target_request_seconds_bucket{le="+Inf",target="e1.0"} 23225.0
    aoe_target_request_seconds_count{target="e1.0"} 23225.0
    aoe_target_request_seconds_sum{target="e1.0"} 2.41
    # HELP aoe_target_in_flight Requests whose disk operation has not completed.
    # TYPE aoe_target_in_flight gauge
    aoe_target_in_flight{target="e1.0"} 4.0
    # HELP aoe_target_retransmits_total Requests repeating a tag from the same initiator (retransmissions).
    # TYPE aoe_target_retransmits_total counter
    aoe_target_retransmits_total{target="e1.0"} 1.0
    # HELP aoe_target_info The backend a target serves (always 1).
    # TYPE aoe_target_info gauge
    aoe_target_info{backend="file:/srv/aoe/disk0.img",target="e1.0"} 1.0
    # HELP aoe_interface_frames_total Frames on an interface: received, sent, ignored, dropped (ring full), malformed, stale (waited too long in the ring; also in ignored).
    # TYPE aoe_interface_frames_total counter
    aoe_interface_frames_total{direction="received",interface="eth0"} 23301.0
    aoe_interface_frames_total{direction="sent",interface="eth0"} 23229.0
    aoe_interface_frames_total{direction="ignored",interface="eth0"} 70.0
    aoe_interface_frames_total{direction="dropped",interface="eth0"} 0.0
    aoe_interface_frames_total{direction="malformed",interface="eth0"} 2.0
    aoe_interface_frames_total{direction="stale",interface="eth0"} 0.0
    # HELP aoe_initiator_frames_total Frames an initiator sent to a target.
    # TYPE aoe_initiator_frames_total counter
    aoe_initiator_frames_total{initiator="52:54:00:12:34:56",target="e1.0"} 23229.0
    # HELP aoe_initiator_last_seen_timestamp_seconds Unix time an initiator last sent a frame to a target.
    # TYPE aoe_initiator_last_seen_timestamp_seconds gauge
    aoe_initiator_last_seen_timestamp_seconds{initiator="52:54:00:12:34:56",target="e1.0"} 1.7650000123e+09

Queries for Grafana (in a panel, write ``[$__rate_interval]`` for ``[5m]``):

- Requests per second, per target and kind:
  ``sum by (target, kind) (rate(aoe_target_requests_total[5m]))``
- Throughput in bytes per second, per target and direction:
  ``sum by (target, direction) (rate(aoe_target_bytes_total[5m]))``
- Error ratio per target (errors answered per request; a disk failure is
  counted both as ``ata`` and by its cause, so the causes are left out):
  ``sum by (target) (rate(aoe_target_errors_total{kind!~"backend_.*"}[5m]))
  / sum by (target) (rate(aoe_target_requests_total[5m]))``
- Backend failures by cause (alert when above 0):
  ``sum by (target, kind) (increase(aoe_target_errors_total{kind=~"backend_.*"}[15m])) > 0``
- 99th percentile service time per target:
  ``histogram_quantile(0.99, sum by (target, le) (rate(aoe_target_request_seconds_bucket[5m])))``
- Mean service time per target:
  ``rate(aoe_target_request_seconds_sum[5m]) / rate(aoe_target_request_seconds_count[5m])``
- Requests in flight and retransmissions per second:
  ``aoe_target_in_flight`` and ``sum by (target) (rate(aoe_target_retransmits_total[5m]))``
- Frames per second per interface, by direction (``dropped`` above 0 means
  the receive ring overflowed):
  ``sum by (interface, direction) (rate(aoe_interface_frames_total[5m]))``
- Initiators not seen for 5 minutes:
  ``time() - max by (initiator) (aoe_initiator_last_seen_timestamp_seconds) > 300``
  (per target: ``time() - aoe_initiator_last_seen_timestamp_seconds > 300``)
- Any query per target with its backend as a label: append
  ``* on (target) group_left (backend) aoe_target_info``.
"""  # noqa: E501 (the sample scrape's lines are verbatim)

from __future__ import annotations

import queue
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from aoe_twisted.core.stats import INTERFACE_FIGURES

__all__ = [
    "DEFAULT_METRICS_HOST",
    "INTERFACE_DIRECTIONS",
    "REQUEST_KINDS",
    "MetricsListenError",
    "MetricsService",
    "SnapshotCollector",
    "SnapshotError",
    "families_from_snapshot",
    "listen_metrics",
    "metrics_resource",
    "parse_metrics_address",
]

_log = Logger()

#: The host ``--metrics PORT`` binds to: only this machine can scrape.
DEFAULT_METRICS_HOST = "127.0.0.1"

#: Request kinds of ``aoe_target_requests_total``, always exported (0 included).
REQUEST_KINDS = (
    "read", "write", "identify", "flush", "other_ata", "config", "mask", "reserve",
)

#: Directions of ``aoe_interface_frames_total``, always exported (0 included).
INTERFACE_DIRECTIONS = INTERFACE_FIGURES

_BYTE_DIRECTIONS = ("read", "write")

#: What ``snapshot()`` returns: the stats snapshot dict, or a Deferred firing with it.
Snapshot = Callable[[], "Mapping[str, Any] | Deferred[Mapping[str, Any]]"]


class SnapshotError(Exception):
    """
    The stats snapshot could not be taken or made no sense.

    Raised by ``SnapshotCollector.collect``: the scrape that asked answers
    HTTP 500 and the error is logged; the endpoint keeps serving.
    """


class MetricsListenError(CannotListenError):
    """
    The metrics endpoint could not listen; ``str()`` is the one line to print.

    For example ``--metrics 127.0.0.1:9580: cannot listen: Address already in
    use``.  A ``CannotListenError``, so callers that already catch that keep
    working.
    """

    def __init__(self, label: str, host: str, port: int, socket_error: object) -> None:
        super().__init__(host, port, socket_error)
        self.label = label

    def __str__(self) -> str:
        reason = getattr(self.socketError, "strerror", None) or str(self.socketError)
        return f"{self.label} {_format_address(self.interface, self.port)}: cannot listen: {reason}"


def families_from_snapshot(snapshot: Mapping[str, Any]) -> list[Metric]:
    """
    Return the metric families for one stats snapshot (the format of the
    stats contract: ``targets``, ``interfaces``, ``initiators``).

    Pure: no I/O, no clock.  Missing sections count as empty, missing request
    kinds and frame directions as 0, so every series exists from the start
    (``rate()`` needs a first point).  A snapshot of the wrong shape raises
    ``SnapshotError`` with one line naming the problem.
    """
    try:
        return _families(snapshot)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SnapshotError(f"the stats snapshot is malformed: {type(e).__name__}: {e}") from e


def _families(snapshot: Mapping[str, Any]) -> list[Metric]:
    requests = CounterMetricFamily(
        "aoe_target_requests", "AoE requests a target received, by kind.",
        labels=["target", "kind"],
    )
    data = CounterMetricFamily(
        "aoe_target_bytes", "Bytes a target read from or wrote to its disk.",
        labels=["target", "direction"],
    )
    errors = CounterMetricFamily(
        "aoe_target_errors",
        "Requests answered with an error, by kind: ata, aoe_<code>, backend_<cause>.",
        labels=["target", "kind"],
    )
    seconds = HistogramMetricFamily(
        "aoe_target_request_seconds", "Time the disk took to serve a request (its backend call).",
        labels=["target"],
    )
    in_flight = GaugeMetricFamily(
        "aoe_target_in_flight", "Requests whose disk operation has not completed.",
        labels=["target"],
    )
    retransmits = CounterMetricFamily(
        "aoe_target_retransmits",
        "Requests repeating a tag from the same initiator (retransmissions).",
        labels=["target"],
    )
    info = InfoMetricFamily(
        "aoe_target", "The backend a target serves (always 1).", labels=["target"],
    )
    frames = CounterMetricFamily(
        "aoe_interface_frames",
        "Frames on an interface: received, sent, ignored, dropped (ring full), malformed, "
        "stale (waited too long in the ring; also in ignored).",
        labels=["interface", "direction"],
    )
    initiator_frames = CounterMetricFamily(
        "aoe_initiator_frames", "Frames an initiator sent to a target.",
        labels=["target", "initiator"],
    )
    last_seen = GaugeMetricFamily(
        "aoe_initiator_last_seen_timestamp_seconds",
        "Unix time an initiator last sent a frame to a target.",
        labels=["target", "initiator"],
    )

    for entry in snapshot.get("targets", ()):
        name = str(entry["target"])
        for kind, value in _fixed_then_extra(entry.get("requests", {}), REQUEST_KINDS):
            requests.add_metric([name, kind], value)
        for direction, value in _fixed_then_extra(entry.get("bytes", {}), _BYTE_DIRECTIONS):
            data.add_metric([name, direction], value)
        for kind, value in _fixed_then_extra(entry.get("errors", {}), ("ata",)):
            errors.add_metric([name, kind], value)
        buckets, total = _buckets(entry.get("service_seconds", {}))
        seconds.add_metric([name], buckets, sum_value=total)
        in_flight.add_metric([name], float(entry.get("in_flight", 0)))
        retransmits.add_metric([name], float(entry.get("retransmits", 0)))
        info.add_metric([name], {"backend": str(entry.get("backend", ""))})
        for initiator in entry.get("initiators", ()):
            labels = [name, str(initiator["mac"])]
            initiator_frames.add_metric(labels, float(initiator.get("frames", 0)))
            last_seen.add_metric(labels, float(initiator["last_seen"]))

    for entry in snapshot.get("interfaces", ()):
        name = str(entry["interface"])
        for direction in INTERFACE_DIRECTIONS:
            frames.add_metric([name, direction], float(entry.get(direction, 0)))

    return [
        requests, data, errors, seconds, in_flight, retransmits, info, frames,
        initiator_frames, last_seen,
    ]


def _fixed_then_extra(
    counts: Mapping[str, Any], fixed: Iterable[str]
) -> list[tuple[str, float]]:
    """``counts`` as label/value pairs: every ``fixed`` key (0 if absent), then the rest sorted."""
    fixed = tuple(fixed)
    pairs = [(key, float(counts.get(key, 0))) for key in fixed]
    pairs.extend((str(key), float(counts[key])) for key in sorted(counts) if key not in fixed)
    return pairs


def _buckets(histogram: Mapping[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """
    The snapshot's cumulative ``[[le, count], ...]`` as ``prometheus_client``
    wants it, and the sum.  The ``+Inf`` bucket is the count; it is added from
    ``count`` when the snapshot leaves it out.
    """
    buckets: list[tuple[str, float]] = []
    infinite = None
    for le, count in histogram.get("buckets", ()):
        if le == "+Inf" or float(le) == float("inf"):
            infinite = float(count)
        else:
            buckets.append((floatToGoString(float(le)), float(count)))
    if infinite is None:
        infinite = float(histogram.get("count", 0))
    buckets.append(("+Inf", infinite))
    return buckets, float(histogram.get("sum", 0.0))


class SnapshotCollector:
    """
    A ``prometheus_client`` custom collector over the server's stats snapshot.

    ``collect()`` takes one snapshot per scrape and turns it into metric
    families (``families_from_snapshot``): the server pays nothing per frame
    beyond its own counters.  ``snapshot`` is called in the reactor thread
    (the exposition runs in a thread pool thread, which hands the call to
    the reactor and waits up to ``timeout`` seconds); it returns a fresh
    dict, or a Deferred firing with one (for instance after asking the
    ``--workers``).  Called in the reactor thread itself, or with the reactor
    not running, ``collect()`` calls ``snapshot`` directly, and a Deferred
    must then have fired already.
    """

    def __init__(
        self, snapshot: Snapshot, *, reactor: Any = None, timeout: float = 10.0
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self._snapshot = snapshot
        self._reactor = reactor
        self._timeout = timeout

    def collect(self) -> Iterable[Metric]:
        """Take a snapshot now and yield its metric families; ``SnapshotError`` if it fails."""
        return families_from_snapshot(self._take())

    def _take(self) -> Mapping[str, Any]:
        try:
            if threadable.isInIOThread() or not self._reactor.running:
                result = self._snapshot()
                if isinstance(result, Deferred):
                    result = _fired_result(result)
            else:
                result = _call_in_reactor(self._reactor, self._snapshot, self._timeout)
        except SnapshotError:
            raise
        except Exception as e:
            raise SnapshotError(f"the stats snapshot failed: {type(e).__name__}: {e}") from e
        if not isinstance(result, Mapping):
            raise SnapshotError(f"the stats snapshot is a {type(result).__name__}, not a dict")
        return result


def _fired_result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must have fired already (its failure raised)."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if not outcome:
        raise SnapshotError("the stats snapshot is a Deferred that has not fired")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def _call_in_reactor(reactor: Any, f: Snapshot, timeout: float) -> Any:
    """
    Call ``f`` in the reactor thread from another thread and wait for its
    (possibly deferred) result.

    Like ``blockingCallFromThread``, with a time limit: a reactor that is
    stopping joins its thread pool and would never run ``f``, and a scrape
    must not hold the shutdown forever.
    """
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def call() -> None:
        maybeDeferred(f).addBoth(answers.put)

    reactor.callFromThread(call)
    try:
        result = answers.get(timeout=timeout)
    except queue.Empty:
        raise SnapshotError(
            f"no stats snapshot within {timeout:g} s (reactor busy or stopping)"
        ) from None
    if isinstance(result, Failure):
        result.raiseException()
    return result


class _Root(Resource):
    """``/``: a short page pointing at ``/metrics``; anything else but ``/metrics`` is 404."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"aoe-twisted: Prometheus metrics are at /metrics\n"


def metrics_resource(snapshot: Snapshot, *, timeout: float = 10.0) -> Resource:
    """
    Return the web root of the metrics endpoint: ``/metrics`` is
    ``prometheus_client.twisted.MetricsResource`` over a private registry
    holding one ``SnapshotCollector(snapshot)``; ``/`` is a short text page.
    """
    # Imported here: prometheus_client.twisted imports the global reactor,
    # which must not be installed merely by importing this module (twistd
    # --reactor installs its own first).
    from prometheus_client.twisted import MetricsResource

    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot, timeout=timeout))
    root = _Root()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    return root


class _Site(Site):
    """A ``Site`` that keeps scrapes (one every 15 s, forever) out of the server log."""

    noisy = False

    def log(self, request: Request) -> None:
        """Log nothing for a request."""


def listen_metrics(
    reactor: Any,
    address: tuple[str, int],
    snapshot: Snapshot,
    *,
    label: str = "--metrics",
    timeout: float = 10.0,
) -> IListeningPort:
    """
    Serve ``metrics_resource(snapshot)`` over HTTP on ``address`` ``(host,
    port)`` (an IPv6 host such as ``"::1"`` works; port 0 picks a free one)
    and return the listening port.

    A port that cannot listen raises ``MetricsListenError``, whose ``str()`` is
    one line starting with ``label`` (``--metrics``, or ``[server] metrics``
    for the config file).
    """
    host, port = address
    site = _Site(metrics_resource(snapshot, timeout=timeout))
    try:
        listening = reactor.listenTCP(port, site, interface=host)
    except CannotListenError as e:
        raise MetricsListenError(label, host, port, e.socketError) from e
    _log.info(
        "Prometheus metrics at http://{address}/metrics",
        address=_format_address(host, listening.getHost().port),
    )
    return listening


_PORT = re.compile(r"[0-9]{1,5}")
_HOSTNAME = re.compile(
    r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?"
)
_FORMS = "expected [HOST:]PORT, as in 9580, 0.0.0.0:9580 or [::1]:9580"


def parse_metrics_address(text: str) -> tuple[str, int]:
    """
    Parse ``--metrics [HOST:]PORT`` into ``(host, port)``.

    ``"9580"`` is ``("127.0.0.1", 9580)``: without a host only this machine
    can scrape.  ``"0.0.0.0:9580"``, ``"metrics.lan:9580"`` and
    ``"[::1]:9580"`` (IPv6 in brackets) name the host.  Anything else, and a
    port outside 1..65535, raises ``ValueError`` with one line.
    """
    spec = text.strip()
    if _PORT.fullmatch(spec):
        host, port_text = DEFAULT_METRICS_HOST, spec
    elif spec.startswith("["):
        host, close, port_text = spec[1:].partition("]")
        if not close or not port_text.startswith(":"):
            raise ValueError(f"{text!r}: {_FORMS}")
        port_text = port_text[1:]
        if not isIPv6Address(host):
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address")
    else:
        host, colon, port_text = spec.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{text!r}: {_FORMS}")
        if ":" in host:
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets, as in [::1]:9580")
        if re.fullmatch(r"[0-9.]+", host):
            if not isIPAddress(host):
                raise ValueError(f"{text!r}: {host!r} is not an IPv4 address")
        elif not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsService(Service):
    """
    The metrics endpoint as a service: ``listen_metrics`` when started, stop listening when stopped.

    ``address`` is ``(host, port)``; ``snapshot`` returns the server's stats
    snapshot; ``label`` names the setting in a one-line error
    (``MetricsListenError``) if the address cannot be listened on.
    """

    name = "metrics"

    def __init__(
        self,
        address: tuple[str, int],
        snapshot: Snapshot,
        *,
        label: str = "--metrics",
        reactor: Any = None,
    ) -> None:
        self.address = address
        self.snapshot = snapshot
        self.label = label
        self.reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        """Listen (``MetricsListenError`` if the address is taken or not ours)."""
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        self.port = listen_metrics(reactor, self.address, self.snapshot, label=self.label)
        super().startService()

    def stopService(self) -> Any:
        """Stop listening."""
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
