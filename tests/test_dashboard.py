"""The Grafana dashboard (docker/grafana/dashboards/quiver.json) against what a real `quiver-serve` exports.

Every PromQL query of the dashboard (panel targets and template variables) is parsed; every series it names must be
one a scrape of a running service gives Prometheus, every label it filters or groups by must be one those series
carry, and every label value it matches exactly must occur. The scrape comes from a real `quiver-serve` process with
a real redis-server, after requests that touch every series: /recall (plain, reranked, an unknown user), /rank,
/events, a bad body, then Redis stopped (a degraded read, an /events the service cannot store, the reload listener
losing its subscription). A panel over a renamed or misspelt metric would otherwise stay silently empty.

Series names follow Prometheus, not the client library: a histogram family `f` is scraped as `f_bucket`, `f_sum` and
`f_count` (never `f` itself), a counter `f` as `f_total`, a gauge as its name.
"""

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RedisProcess
from tests.serving import Tree, quiver_serve

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "quiver.json"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus.yml"
TARGET_LABELS = {"instance", "job"}  # attached by Prometheus to every scraped series
PROMETHEUS_SERIES = {"up": TARGET_LABELS}  # written by Prometheus itself for each target, never by the service
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
# Aggregation operators, which may take their grouping before the parenthesis: `sum by (le) (...)`.
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk"}
AGGREGATIONS |= {"quantile", "limitk", "limit_ratio"}
# What the issue asks the dashboard to show, as the series families that carry it.
REQUIRED = {
    "quiver_request_duration_seconds",  # request rate, p50/p99 by endpoint and status
    "quiver_stage_duration_seconds",  # stage timings
    "quiver_batch_size",  # micro-batch sizes
    "quiver_degraded_total",  # degraded answers by reason
    "quiver_reloads_total",  # reloads by outcome
    "quiver_model_info",  # loaded versions
    "quiver_redis_breaker_open",  # Redis state
}

# ------------------------------------------------------------------------------------------------------------ PromQL

_TOKEN = re.compile(
    r"""\s*(?:
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<variable>\$\{[^}]*\}|\$\w+)
    |(?P<number>\d[\w.]*|\.\d+)
    |(?P<ident>[a-zA-Z_:][\w:]*)
    |(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Selector:
    """One vector selector: `metric{label op "value", ...}`."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...] = ()


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # labels of by / without / on / ignoring / group_*


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        if not expr[pos:].strip():
            break
        match = _TOKEN.match(expr, pos)
        assert match and match.end() > pos, f"cannot read PromQL at {expr[pos:]!r}"
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


def _unquote(text: str) -> str:
    return text[1:-1].encode().decode("unicode_escape") if text[0] != "`" else text[1:-1]


def parse_promql(expr: str) -> Query:
    """The selectors and grouping labels of a PromQL expression: functions (a name before "("), keywords, numbers,
    durations, strings, range brackets and Grafana variables are not metric names."""
    tokens = _tokens(expr)
    query = Query()
    i = 0

    def matchers(start: int) -> tuple[list[tuple[str, str, str]], int]:
        """Label matchers from the token after "{" to the matching "}"; returns them and the index after "}"."""
        found, j = [], start
        while tokens[j] != ("op", "}"):
            if tokens[j] == ("op", ","):
                j += 1
                continue
            (k1, label), (k2, op), (k3, value) = tokens[j : j + 3]
            assert k1 == "ident" and k2 == "op" and k3 == "string", f"bad matcher in {expr!r}"
            found.append((label, op, _unquote(value)))
            j += 3
        return found, j + 1

    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in GROUPING and following == ("op", "("):
            j = i + 2
            while tokens[j] != ("op", ")"):
                if tokens[j][0] == "ident":
                    query.grouping.add(tokens[j][1])
                j += 1
            i = j + 1
        elif kind == "ident" and (following == ("op", "(") or text in KEYWORDS | AGGREGATIONS):  # not a metric
            i += 1
        elif kind == "ident":
            found: list[tuple[str, str, str]] = []
            i += 1
            if following == ("op", "{"):
                found, i = matchers(i + 1)
            query.selectors.append(Selector(text, tuple(found)))
        elif (kind, text) == ("op", "{"):  # {__name__="metric", ...}
            found, i = matchers(i + 1)
            names = [v for label, op, v in found if label == "__name__" and op == "="]
            assert names, f"a selector without a metric name in {expr!r}"
            query.selectors.append(Selector(names[0], tuple(m for m in found if m[0] != "__name__")))
        elif (kind, text) == ("op", "["):  # a range or subquery: durations and variables only
            while tokens[i] != ("op", "]"):
                i += 1
            i += 1
        else:
            i += 1
    return query


def parse_template(query: str) -> Query:
    """A Grafana variable query: `label_values(<PromQL>, label)` reads `label` of the PromQL's series."""
    match = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*(\w+)\s*\)\s*", query, flags=re.DOTALL)
    if match is None:
        return parse_promql(query)
    parsed = parse_promql(match.group(1))
    parsed.grouping.add(match.group(2))
    return parsed


# --------------------------------------------------------------------------------------------------------- dashboard


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows keep their panels inside


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, Query]]:
    """(where, text, parsed) for every query the dashboard runs."""
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"], parse_promql(target["expr"])))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            text = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            out.append((f"variable ${variable['name']}", text, parse_template(text)))
    return out


@dataclass(frozen=True)
class Series:
    family: str
    samples: int
    labels: frozenset[str]  # label names its samples carry
    values: dict[str, frozenset[str]]  # label -> values seen


def scraped_series(exposition: str) -> dict[str, Series]:
    """Every series name Prometheus stores from this exposition, with the labels and values seen on its samples.

    A family is listed even without samples (a labelled counter never incremented): its HELP and TYPE lines say it
    is exported."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
    out: dict[str, Series] = {}
    for family in text_string_to_metric_families(exposition):
        for suffix in suffixes.get(family.type, ("",)):
            name = family.name + suffix
            samples = [s for s in family.samples if s.name == name]
            labels = {label for s in samples for label in s.labels}
            values = {label: frozenset(s.labels[label] for s in samples if label in s.labels) for label in labels}
            out[name] = Series(family.name, len(samples), frozenset(labels), values)
    return out


def problems(queries: list[tuple[str, str, Query]], series: dict[str, Series], jobs: set[str]) -> list[str]:
    """What in the dashboard's queries the scrape does not back: unknown series, series without samples, labels the
    series lack, exact label values never seen. Empty when every panel can show data."""
    found = []
    for where, text, query in queries:
        known_labels = set(TARGET_LABELS)
        for selector in query.selectors:
            name = selector.metric
            if name in PROMETHEUS_SERIES:
                known_labels |= PROMETHEUS_SERIES[name]
                for label, op, value in selector.matchers:
                    if label == "job" and op == "=" and value not in jobs:
                        found.append(f"{where}: job {value!r} is not a scrape job of prometheus.yml {sorted(jobs)}")
                continue
            if name not in series:
                found.append(f"{where}: {name} is not exported (query: {text})")
                continue
            s = series[name]
            if not s.samples:
                found.append(f"{where}: {name} is declared but has no sample after the test's requests")
            labels = s.labels | TARGET_LABELS
            known_labels |= labels
            for label, op, value in selector.matchers:
                if label not in labels:
                    found.append(f"{where}: {name} has no label {label!r} (it has {sorted(s.labels)})")
                elif op == "=" and label in s.values and value not in s.values[label]:
                    found.append(f"{where}: {name}{{{label}={value!r}}} never occurs (seen {sorted(s.values[label])})")
        for label in sorted(query.grouping - known_labels):
            found.append(f"{where}: groups by {label!r}, a label none of its series carries")
    return found


# ------------------------------------------------------------------------------------------------------------ tests


def test_promql_parser() -> None:
    q = parse_promql(
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(quiver_x_bucket{endpoint!="/metrics", '
        'instance=~"$instance"}[$__rate_interval])))'
    )
    assert q.selectors == [
        Selector("quiver_x_bucket", (("endpoint", "!=", "/metrics"), ("instance", "=~", "$instance")))
    ]
    assert q.grouping == {"le", "endpoint"}
    q = parse_promql('sum(rate(a_total[5m] offset 1h)) by (job) / ignoring(x) group_left(y) b{c="d"} > bool 1e3')
    assert [s.metric for s in q.selectors] == ["a_total", "b"] and q.grouping == {"job", "x", "y"}
    q = parse_promql('count_values("not_a_metric", up) + {__name__="quiver_y", z=~"a|b"} * ${factor}')
    assert q.selectors == [Selector("up"), Selector("quiver_y", (("z", "=~", "a|b"),))]
    q = parse_template("label_values(quiver_index_items{role='x'}, instance)")
    assert q.selectors == [Selector("quiver_index_items", (("role", "=", "x"),))] and q.grouping == {"instance"}


def test_problems_are_found() -> None:
    """The comparison really compares: each kind of mistake is reported."""
    exposition = (
        "# HELP h_seconds h\n# TYPE h_seconds histogram\n"
        'h_seconds_bucket{stage="a",le="+Inf"} 1.0\nh_seconds_sum{stage="a"} 1.0\nh_seconds_count{stage="a"} 1.0\n'
        "# HELP c_total c\n# TYPE c_total counter\n"
        "# HELP g g\n# TYPE g gauge\ng 1.0\n"
    )
    series = scraped_series(exposition)
    assert {"h_seconds_bucket", "h_seconds_sum", "h_seconds_count", "c_total", "g"} <= set(series)
    assert "h_seconds" not in series and "c" not in series

    def check(expr: str) -> list[str]:
        return problems([("p", expr, parse_promql(expr))], series, {"quiver-api"})

    assert check('sum by (le, stage) (rate(h_seconds_bucket{stage="a"}[1m])) + g + up{job="quiver-api"}') == []
    assert check("rate(h_seconds[1m])")  # a histogram has no bare series
    assert check("rate(quiver_nope_total[1m])")
    assert check("rate(c_total[1m])")  # declared, never incremented
    assert check('h_seconds_count{stagee="a"}')
    assert check('h_seconds_count{stage="b"}')
    assert check("sum by (endpoint) (h_seconds_count)")
    assert check('up{job="api"}')


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exposition(serving_tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a real quiver-serve after requests touching every series, the last ones with Redis stopped."""
    tmp = tmp_path_factory.mktemp("dashboard")
    tree = serving_tree.copy(tmp / "artifacts")
    redis = RedisProcess(tmp).start()
    try:
        with quiver_serve(tree.root, redis.url, tmp / "serve.log") as url, httpx.Client(base_url=url, timeout=30) as c:
            recall = c.post("/recall", json={"user_id": "u001", "k": 10})
            assert recall.status_code == 200, recall.text
            items = [item["item_id"] for item in recall.json()["items"]]
            assert c.post("/recall", json={"user_id": "u002", "k": 10, "rerank": True}).status_code == 200
            unknown = c.post("/recall", json={"user_id": "nobody-at-all", "k": 5})
            assert unknown.status_code == 200 and "popularity_fallback" in unknown.json()["degraded"]
            assert c.post("/rank", json={"user_id": "u001", "candidates": items}).status_code == 200
            assert c.post("/events", json={"user_id": "u001", "items": items[:2]}).status_code == 200
            assert c.post("/recall", json={"user_id": "u001", "k": 0}).status_code == 422
            redis.stop()
            for _ in range(6):  # past the breaker's failure count: it opens
                assert c.post("/recall", json={"user_id": "u001", "k": 5}).status_code == 200
            assert c.post("/events", json={"user_id": "u001", "items": items[:1]}).status_code == 503
            deadline = time.monotonic() + 10
            while "quiver_reload_loop_errors_total{" not in (text := c.get("/metrics").text):
                assert time.monotonic() < deadline, "the reload listener never counted losing Redis"
                time.sleep(0.2)
            return text
    finally:
        redis.stop()


def test_dashboard_shows_what_the_issue_lists(dashboard: dict[str, Any]) -> None:
    queries = dashboard_queries(dashboard)
    names = {s.metric for _, _, q in queries for s in q.selectors}
    shown = {f for f in REQUIRED if names & {f, f"{f}_bucket", f"{f}_sum", f"{f}_count"}}
    assert shown == REQUIRED, f"not on the dashboard: {sorted(REQUIRED - shown)}"
    texts = [text for _, text, _ in queries]
    for quantile in ("0.5", "0.99"):
        assert any(
            f"histogram_quantile({quantile}," in t
            and "quiver_request_duration_seconds_bucket" in t
            and {"le", "endpoint", "status"} <= parse_promql(t).grouping
            for t in texts
        ), f"no p{quantile} latency by endpoint and status"


def test_every_dashboard_query_is_backed_by_a_real_scrape(dashboard: dict[str, Any], exposition: str) -> None:
    series = scraped_series(exposition)
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 15
    found = problems(queries, series, jobs)
    assert not found, "\n".join(found)


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    """Grafana loads it as provisioned: a fixed uid, unique panel ids, panels inside the 24-column grid, every
    query on the provisioned data source."""
    datasource = yaml.safe_load(
        (ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert dashboard["uid"] == "quiver" and dashboard["title"]
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert panel["datasource"]["uid"] == target["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert target["datasource"]["type"] == datasource["type"] == "prometheus"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource["uid"]
