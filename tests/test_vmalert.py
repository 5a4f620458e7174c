"""The rule pack under VictoriaMetrics' vmalert (#26): every promtool unit test of rules/tests,
with the same expectations, replayed by a real vmalert (`-replay.*`) on a real single-node
VictoriaMetrics on loopback. What vmalert 1.79 (Debian bookworm) cannot do is listed, assertion by
assertion and with its reason, in vmalert_known_differences.yaml; everything else must match.

How one promtool test case runs (all selected cases in parallel, in one VictoriaMetrics):

- Its input series, expanded as promtool expands them (`_` leaves a sample out, `stale` is a
  Prometheus staleness marker), go in by remote write at their own times in a slot of their own:
  promtool's t=0 is the slot's start, and slots lie far enough apart (the longest range and offset
  the rules read, and an hour) that no rule reads from one into another. A value that is a Unix
  time (process_start_time_seconds) moves with the slot, as promtool's t=0 is the Unix epoch.
- The rules of the test file's rule_files, read now (whatever groups and intervals they declare; a
  group without `interval` gets the file's evaluation_interval, 1m by default), without
  keep_firing_for and annotations, are replayed over the slot with `-datasource.queryStep=0`, so
  that each group's range queries step at the group's own interval. One vmalert run per level of
  the rules' dependencies (recordings that read only input, then what reads them, ...): a rule
  that reads a recording reads it complete and flushed, which -replay.rulesDelay (a sleep after
  each rule) promises only on an idle machine. A rule with `or on (...)` or `or ignoring (...)`
  gets its range queries answered step by step, as vmalert evaluates it live (StepByStep).
- An alert_rule_test reads ALERTS{alertstate="firing"} as written at the last evaluation of the
  alert's group at or before eval_time and compares its labels (less alertgroup, which vmalert
  adds); a promql_expr_test is an instant query on VictoriaMetrics at eval_time.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from conftest import ROOT, TESTS, daemon, free_port, require

RULES = ROOT / "rules"
TEST_FILES = sorted((RULES / "tests").glob("*.test.yml"))
KNOWN_DIFFERENCES = TESTS / "vmalert_known_differences.yaml"
VICTORIA_METRICS = shutil.which("victoria-metrics") or "victoria-metrics"
VMALERT = shutil.which("vmalert") or "vmalert"

pytestmark = pytest.mark.skipif(
    shutil.which("victoria-metrics") is None or shutil.which("vmalert") is None,
    reason="victoria-metrics and vmalert are not installed (Debian package victoria-metrics, "
    "which `make test` installs)",
)

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
UNIT_MS = {"y": 365 * DAY_MS, "w": 7 * DAY_MS, "d": DAY_MS, "h": HOUR_MS, "m": 60_000, "s": 1000}
DURATION = re.compile(r"(\d+)(ms|[ywdhms])")
SPAN = r"(?:\d+(?:ms|[ywdhms]))+"
RANGE = re.compile(rf"\[\s*({SPAN})\s*(?::\s*({SPAN})?\s*)?\]")  # a range or a subquery
OFFSET = re.compile(rf"\boffset\s+-?({SPAN})")
NAME_MATCHER = re.compile(r'__name__\s*(=~|=)\s*"((?:[^"\\]|\\.)*)"')
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# promtool's series values: 'a', 'a+bxn', 'a-bxn', 'axn', '_', '_xn', 'stale'.
NUMBER = r"[+-]?(?:Inf|inf|NaN|nan|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
VALUE = re.compile(rf"({NUMBER})(?:([+-](?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+))?x(\d+))?")
BLANK = re.compile(r"_(?:x(\d+))?")
LABEL = re.compile(r"""\s*([a-zA-Z_]\w*)\s*=\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')\s*,?""")
STALE_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
# Unix times, by Prometheus' naming conventions (process_start_time_seconds, ..._timestamp).
UNIX_TIME = re.compile(r"(_time_seconds|_timestamp_seconds|_timestamp)$")
# A range query that vmalert must get answered step by step (see StepByStep).
STEP_BY_STEP = re.compile(r"\bor\s+(?:on|ignoring)\s*\(")
DROPPED_ALERT_LABELS = {"__name__", "alertstate", "alertgroup"}
VALUE_TOLERANCE = 1e-9  # VictoriaMetrics keeps 12 significant decimal digits of a stored value
WORKERS = 4

Value = float | Literal["stale"] | None
Sample = tuple[dict[str, str], float]
Assertion = tuple[str, str, str, int]  # test file, case name, alertname or expr, eval_time (ms)


# --- promtool's notations ---------------------------------------------------------------------


def duration_ms(text: str | int) -> int:
    """A Prometheus duration ('1m30s', '2h', '0') in milliseconds."""
    text = str(text).strip()
    parts = DURATION.findall(text)
    if text == "0":
        return 0
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * (1 if u == "ms" else UNIT_MS[u]) for n, u in parts)


def parse_series(text: str) -> dict[str, str]:
    """A series of input_series or exp_samples ('name{a="b"}', '{a="b"}') as its labels."""
    name, _, rest = text.strip().partition("{")
    labels = {"__name__": name.strip()} if name.strip() else {}
    body = rest.rstrip().removesuffix("}").rstrip()
    pos = 0
    while pos < len(body):
        match = LABEL.match(body, pos)
        if match is None:
            raise ValueError(f"cannot parse the labels of {text!r}")
        key, quoted = match.groups()
        if quoted[0] == "'":
            quoted = '"' + quoted[1:-1].replace("\\'", "'").replace('"', '\\"') + '"'
        labels[key] = json.loads(quoted)
        pos = match.end()
    return labels


def expand_values(text: str) -> list[Value]:
    """promtool's expanding notation: one value per interval, None where a sample is left out."""
    out: list[Value] = []
    for token in str(text).split():
        if token == "stale":
            out.append("stale")
        elif blank := BLANK.fullmatch(token):
            out.extend([None] * (int(blank.group(1)) if blank.group(1) else 1))
        elif value := VALUE.fullmatch(token):
            start, step, times = value.groups()
            current = float(start)
            out.append(current)
            for _ in range(int(times or 0)):
                current += float(step or 0)  # accumulated, as promtool does
                out.append(current)
        else:
            raise ValueError(f"cannot expand the series value {token!r} of {text!r}")
    return out


# --- the rules, as promtool orders them and as vmalert is given them --------------------------


@dataclass
class Rule:
    file: Path
    group: str
    interval_ms: int
    spec: dict[str, Any]
    reads: set[int] = field(default_factory=set)  # the rules whose output it reads, by index
    level: int = 0

    @property
    def name(self) -> str:
        return str(self.spec.get("alert") or self.spec.get("record"))


@dataclass
class RuleSet:
    """The rules of one promtool test file, in promtool's order of evaluation."""

    rules: list[Rule]
    reach_ms: int  # how far back in time a rule reads, at most

    def levels(self) -> list[list[Rule]]:
        top = max((r.level for r in self.rules), default=0)
        return [[r for r in self.rules if r.level == n] for n in range(top + 1)]


def rule_set(test_file: Path, suite: dict[str, Any]) -> RuleSet:
    default_ms = duration_ms(suite.get("evaluation_interval", "1m"))
    groups: list[tuple[Path, dict[str, Any]]] = []
    for name in suite["rule_files"]:
        path = (test_file.parent / name).resolve()
        groups.extend((path, g) for g in yaml.safe_load(path.read_text())["groups"])
    if "group_eval_order" in suite:
        order = {name: n for n, name in enumerate(suite["group_eval_order"])}
        groups.sort(key=lambda pg: order.get(pg[1]["name"], len(order)))
    rules: list[Rule] = []
    for path, group in groups:
        interval = duration_ms(group["interval"]) if "interval" in group else default_ms
        rules.extend(Rule(path, group["name"], interval, spec) for spec in group["rules"])
    reach = 0
    for rule in rules:
        expr = str(rule.spec["expr"])
        ranges = [duration_ms(d) for pair in RANGE.findall(expr) for d in pair if d]
        offsets = [duration_ms(d) for d in OFFSET.findall(expr)]
        reach = max(reach, max(ranges, default=0) + max(offsets, default=0))
    _level(rules)
    return RuleSet(rules, reach)


def _level(rules: list[Rule]) -> None:
    """Which rules each rule reads the output of, and its level: 0 reads input only, n+1 reads n."""
    recorders: dict[str, set[int]] = {}
    for n, rule in enumerate(rules):
        if "record" in rule.spec:
            recorders.setdefault(rule.spec["record"], set()).add(n)
    alerts = {n for n, rule in enumerate(rules) if "alert" in rule.spec}
    for rule in rules:
        expr = str(rule.spec["expr"])
        names = set(IDENTIFIER.findall(expr))
        for op, value in NAME_MATCHER.findall(expr):
            if op == "=":
                names.add(value)
            else:
                pattern = re.compile(value.encode().decode("unicode_escape"))
                names |= {r for r in recorders if pattern.fullmatch(r)}
        for name in names & recorders.keys():
            rule.reads |= recorders[name]
        if names & {"ALERTS", "ALERTS_FOR_STATE"}:
            rule.reads |= alerts
    pending = set(range(len(rules)))
    while pending:
        ready = {n for n in pending if not rules[n].reads & pending}
        if not ready:
            cycle = ", ".join(rules[n].name for n in sorted(pending))
            raise AssertionError(f"these rules read each other, no replay can order them: {cycle}")
        for n in ready:
            rules[n].level = 1 + max((rules[d].level for d in rules[n].reads), default=-1)
        pending -= ready


def vmalert_rule_files(rules: list[Rule], directory: Path) -> list[Path]:
    """The given rules as vmalert rule files, one per rule file of the pack, group by group, with
    each group's interval explicit, without keep_firing_for (vmalert 1.79 refuses it) and without
    annotations (replay writes none, and it expands them with no `query` function: fatal)."""
    directory.mkdir(parents=True, exist_ok=True)
    by_file: dict[Path, dict[str, dict[str, Any]]] = {}
    for rule in rules:
        groups = by_file.setdefault(rule.file, {})
        group = {"name": rule.group, "interval": f"{rule.interval_ms}ms", "rules": []}
        spec = {k: v for k, v in rule.spec.items() if k not in ("keep_firing_for", "annotations")}
        groups.setdefault(rule.group, group)["rules"].append(spec)
    paths = []
    for n, (source, groups) in enumerate(by_file.items()):
        path = directory / f"{n}-{source.name}"
        path.write_text(yaml.safe_dump({"groups": list(groups.values())}, sort_keys=False))
        paths.append(path)
    return paths


# --- the promtool test cases ------------------------------------------------------------------


@dataclass
class Case:
    test_file: Path
    spec: dict[str, Any]
    rules: RuleSet
    evaluation_ms: int
    slot_ms: int = 0  # where promtool's t=0 lies

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def key(self) -> str:
        return f"{self.test_file.name}::{self.name}"

    @property
    def interval_ms(self) -> int:
        interval = self.spec.get("interval")
        return self.evaluation_ms if interval is None else duration_ms(interval)

    def series(self) -> list[tuple[dict[str, str], list[Value]]]:
        return [
            (parse_series(s["series"]), expand_values(s["values"]))
            for s in self.spec.get("input_series", [])
        ]

    def end_ms(self) -> int:
        tests = self.spec.get("alert_rule_test", []) + self.spec.get("promql_expr_test", [])
        last = max((duration_ms(t["eval_time"]) for t in tests), default=0)
        return max(last, max(r.interval_ms for r in self.rules.rules))

    def length_ms(self) -> int:
        samples = max((len(values) for _, values in self.series()), default=0)
        return max(samples * self.interval_ms, self.end_ms())

    def assertions(self) -> Iterator[tuple[Assertion, dict[str, Any]]]:
        for test in self.spec.get("alert_rule_test", []):
            at = duration_ms(test["eval_time"])
            yield (self.test_file.name, self.name, test["alertname"], at), test
        for test in self.spec.get("promql_expr_test", []):
            at = duration_ms(test["eval_time"])
            yield (self.test_file.name, self.name, test["expr"], at), test


def load_cases() -> list[Case]:
    cases = []
    for path in TEST_FILES:
        suite = yaml.safe_load(path.read_text())
        rules = rule_set(path, suite)
        evaluation = duration_ms(suite.get("evaluation_interval", "1m"))
        for n, test in enumerate(suite["tests"]):
            test.setdefault("name", f"#{n}")
            cases.append(Case(path, test, rules, evaluation))
        names = [c.key for c in cases]
        assert len(set(names)) == len(names), f"{path.name}: two tests share a name"
    return cases


def lay_out(cases: list[Case], now_ms: int) -> None:
    """A slot per case, far enough from the next that no rule reads across, aligned to every
    interval (promtool evaluates at multiples of its interval from t=0), all of them past."""
    align = HOUR_MS
    for case in cases:
        for interval in [case.interval_ms, *(r.interval_ms for r in case.rules.rules)]:
            align = math.lcm(align, interval)
    sizes = [-(-(c.length_ms() + c.rules.reach_ms + HOUR_MS) // align) * align for c in cases]
    start = (now_ms - sum(sizes) - 2 * DAY_MS) // align * align
    for case, size in zip(cases, sizes, strict=True):
        case.slot_ms = start
        start += size


# --- VictoriaMetrics and vmalert ---------------------------------------------------------------


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return bytes(response.read())


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def remote_write(url: str, series: list[tuple[dict[str, str], list[tuple[int, float]]]]) -> None:
    """A Prometheus remote-write request (protobuf, snappy-framed as literals only): the one way
    into VictoriaMetrics that carries staleness markers."""
    request = bytearray()
    for labels, samples in series:
        pairs = (_field(1, k.encode()) + _field(2, v.encode()) for k, v in sorted(labels.items()))
        values = (b"\x09" + struct.pack("<d", v) + b"\x10" + _varint(t) for t, v in samples)
        request += _field(
            1, b"".join(_field(1, p) for p in pairs) + b"".join(_field(2, v) for v in values)
        )
    body = bytearray(_varint(len(request)))
    for pos in range(0, len(request), 65536):
        chunk = request[pos : pos + 65536]
        body += bytes([61 << 2]) + struct.pack("<H", len(chunk) - 1) + chunk
    headers = {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf"}
    http(url + "/api/v1/write", bytes(body), headers)


class StepByStep(ThreadingHTTPServer):
    """vmalert's datasource, in front of VictoriaMetrics: it passes every request through but a
    range query with `or on (...)` or `or ignoring (...)`, which it answers with an instant query
    per step, as vmalert evaluates such a rule when it runs for real. Over a range, MetricsQL's
    `or` fills the gaps of a left-hand series with the values of the right-hand series it matches,
    under the left one's labels: a version that was "stable" once stays stable to the end of the
    range whatever the right-hand side says. An instant query has no gaps to fill."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _StepByStepHandler)
        self.upstream = upstream
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _StepByStepHandler(BaseHTTPRequestHandler):
    server: StepByStep

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        self._serve(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def _serve(self, body: bytes) -> None:
        url = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(url.query)
        if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            params.update(urllib.parse.parse_qs(body.decode()))
        query = params.get("query", [""])[0]
        status = 200
        try:
            if url.path.endswith("/api/v1/query_range") and STEP_BY_STEP.search(query):
                answer = self._step_by_step(query, params)
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() == "content-type"}
                answer = http(self.server.upstream + self.path, body or None, headers)
        except urllib.error.HTTPError as e:
            status, answer = e.code, e.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _step_by_step(self, query: str, params: dict[str, list[str]]) -> bytes:
        start, end = (_seconds(params[k][0]) for k in ("start", "end"))
        step = params["step"][0]
        series: dict[str, dict[str, Any]] = {}
        for n in range(int((end - start) * 1000) // duration_ms(step) + 1):
            at = start + n * duration_ms(step) / 1000
            instant = urllib.parse.urlencode({"query": query, "time": at, "step": step})
            answer = json.loads(http(f"{self.server.upstream}/api/v1/query?{instant}"))
            for result in answer["data"]["result"]:
                key = json.dumps(result["metric"], sort_keys=True)
                series.setdefault(key, {"metric": result["metric"], "values": []})
                series[key]["values"].append(result["value"])
        matrix = {"resultType": "matrix", "result": list(series.values())}
        return json.dumps({"status": "success", "data": matrix}).encode()


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def rfc3339(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


@dataclass
class Outcome:
    """What vmalert and VictoriaMetrics gave for one case."""

    firing: dict[tuple[str, int], list[dict[str, str]]] = field(default_factory=dict)
    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)
    error: str = ""


def replay(case: Case, url: str, datasource: str, work: Path) -> Outcome:
    """Write the case's input, replay its rules level by level, read back what they wrote."""
    slot, step = case.slot_ms, case.interval_ms
    series = []
    for labels, values in case.series():
        shift = slot / 1000 if UNIX_TIME.search(labels.get("__name__", "")) else 0
        samples = [
            (slot + n * step, v + shift if isinstance(v, float) else STALE_NAN)
            for n, v in enumerate(values)
            if v is not None
        ]
        series.append((labels, samples))
    remote_write(url, series)
    http(url + "/internal/force_flush")
    end = slot + case.end_ms()
    points = case.end_ms() // min(r.interval_ms for r in case.rules.rules) + 2
    for level, rules in enumerate(case.rules.levels()):
        args = [
            VMALERT,
            *(f"-rule={path}" for path in vmalert_rule_files(rules, work / f"level{level}")),
            f"-replay.timeFrom={rfc3339(slot)}",
            f"-replay.timeTo={rfc3339(end)}",
            # One request per rule: vmalert 1.79 keeps no alert state from one to the next.
            f"-replay.maxDatapointsPerQuery={points}",
            "-replay.rulesDelay=0",
            "-replay.ruleRetryAttempts=1",
            "-replay.disableProgressBar",
            f"-datasource.url={datasource}",
            "-datasource.queryStep=0",
            f"-remoteWrite.url={url}",
            "-remoteWrite.maxQueueSize=1000000",
            "-httpListenAddr=127.0.0.1:0",
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return Outcome(error=f"vmalert, level {level}: {(done.stdout + done.stderr)[-4000:]}")
        http(url + "/internal/force_flush")  # all of it searchable before the next level reads it
    return read_back(case, url)


def read_back(case: Case, url: str) -> Outcome:
    slot, outcome = case.slot_ms, Outcome()
    alerts = 'ALERTS{alertstate="firing"}'
    export = {"match[]": alerts, "start": slot // 1000, "end": (slot + case.end_ms()) // 1000}
    written: dict[tuple[str, int], list[dict[str, str]]] = {}
    for line in http(f"{url}/api/v1/export?{urllib.parse.urlencode(export)}").splitlines():
        alert = json.loads(line)
        for t in alert["timestamps"]:
            written.setdefault((alert["metric"].get("alertgroup", ""), t), []).append(
                alert["metric"]
            )
    for (_, _, what, at), test in case.assertions():
        if "alertname" in test:
            got = []
            for rule in case.rules.rules:
                if rule.spec.get("alert") != what:
                    continue
                last = slot + at // rule.interval_ms * rule.interval_ms
                got += [
                    {k: v for k, v in labels.items() if k not in DROPPED_ALERT_LABELS}
                    for labels in written.get((rule.group, last), [])
                    if labels.get("alertname") == what
                ]
            outcome.firing[(what, at)] = got
        else:
            query = {"query": what, "time": (slot + at) / 1000, "step": f"{case.evaluation_ms}ms"}
            answer = json.loads(http(f"{url}/api/v1/query?{urllib.parse.urlencode(query)}"))
            result = answer["data"]["result"]
            outcome.samples[(what, at)] = [(r["metric"], float(r["value"][1])) for r in result]
    return outcome


# --- the known differences ---------------------------------------------------------------------


def known_differences() -> dict[Assertion, str]:
    """The listed assertions, each with its reason."""
    known = yaml.safe_load(KNOWN_DIFFERENCES.read_text())
    listed: dict[Assertion, str] = {}
    for entry in known["differences"]:
        reason = str(known["reasons"].get(entry["reason"], "")).strip()
        assert reason, f"the reason {entry['reason']!r} is not given"
        what = entry.get("alertname") or entry["expr"]
        key = (entry["file"], entry["case"], what, duration_ms(entry["eval_time"]))
        assert key not in listed, f"listed twice: {key}"
        listed[key] = entry["reason"]
    return listed


LISTED = known_differences()
CASES = load_cases()


# --- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("victoria-metrics")
    port = free_port()
    args = [
        VICTORIA_METRICS,
        f"-storageDataPath={work / 'data'}",
        f"-httpListenAddr=127.0.0.1:{port}",
        "-retentionPeriod=100y",  # the slots lie weeks in the past
        "-search.disableCache",  # every slot is written once, read at once
        "-loggerLevel=WARN",
    ]
    with daemon(args, port, work / "victoria-metrics.log", "victoria-metrics") as url:
        yield url


@pytest.fixture(scope="session")
def replayed(
    request: pytest.FixtureRequest,
    victoria_metrics: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Outcome]:
    """Every selected case, replayed in parallel, each in its slot of one VictoriaMetrics."""
    selected = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and isinstance(callspec.params.get("case"), Case):
            selected.add(callspec.params["case"].key)
    cases = [c for c in CASES if c.key in selected]
    lay_out(cases, int(time.time() * 1000))
    work = tmp_path_factory.mktemp("vmalert")
    proxy = StepByStep(victoria_metrics)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()

    def run(n: int, case: Case) -> Outcome:
        try:
            return replay(case, victoria_metrics, proxy.url, work / f"case{n}")
        except Exception as e:  # one case's failure is its test's, not every test's
            return Outcome(error=f"{type(e).__name__}: {e}")

    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = {c.key: pool.submit(run, n, c) for n, c in enumerate(cases)}
            return {key: future.result() for key, future in futures.items()}
    finally:
        proxy.shutdown()
        proxy.server_close()


def _labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v!r}" for k, v in sorted(labels.items())) + "}"


def _samples(samples: list[Sample]) -> list[str]:
    return sorted(f"{_labels(labels)} {value}" for labels, value in samples)


def _same_samples(expected: list[Sample], got: list[Sample]) -> bool:
    by_labels = (
        sorted(expected, key=lambda s: _labels(s[0])),
        sorted(got, key=lambda s: _labels(s[0])),
    )
    return len(expected) == len(got) and all(
        e_labels == g_labels
        and (math.isclose(e, g, rel_tol=VALUE_TOLERANCE) or (math.isnan(e) and math.isnan(g)))
        for (e_labels, e), (g_labels, g) in zip(*by_labels, strict=True)
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.key)
def test_promtool_case_under_vmalert(case: Case, replayed: dict[str, Outcome]) -> None:
    outcome = replayed[case.key]
    assert not outcome.error, outcome.error
    failures: list[str] = []
    agreeing: list[str] = []
    for key, test in case.assertions():
        _, _, what, at = key
        if "alertname" in test:
            expected = sorted(
                _labels({**alert.get("exp_labels", {}), "alertname": what})
                for alert in test.get("exp_alerts") or []
            )
            got = sorted(_labels(labels) for labels in outcome.firing[(what, at)])
            same, message = expected == got, f"expected {expected}, vmalert fired {got}"
        else:
            expected_samples = [
                (parse_series(s["labels"]), float(s["value"]))
                for s in test.get("exp_samples") or []
            ]
            got_samples = outcome.samples[(what, at)]
            if not any("__name__" in labels for labels, _ in expected_samples):
                # MetricsQL keeps the metric name through max_over_time(), round() and others.
                got_samples = [
                    ({k: v for k, v in labels.items() if k != "__name__"}, value)
                    for labels, value in got_samples
                ]
            same = _same_samples(expected_samples, got_samples)
            message = f"expected {_samples(expected_samples)}, got {_samples(got_samples)}"
        where = f"{what} at {test['eval_time']}"
        if key not in LISTED and not same:
            failures.append(f"{where}: {message}")
        elif key in LISTED and same:
            agreeing.append(where)
    assert not failures, "\n".join(failures)
    assert not agreeing, f"vmalert now agrees, unlist from {KNOWN_DIFFERENCES.name}: {agreeing}"


def test_every_listed_difference_names_an_assertion() -> None:
    assertions = {key for case in CASES for key, _ in case.assertions()}
    stale = sorted(set(LISTED) - assertions)
    assert not stale, f"{KNOWN_DIFFERENCES.name} lists assertions that do not exist: {stale}"


KEEP_FIRING_FOR = sorted(key for key, reason in LISTED.items() if reason == "keep_firing_for")


@pytest.mark.parametrize("listed", KEEP_FIRING_FOR, ids=lambda k: f"{k[0]}::{k[1]}::{k[2]}@{k[3]}")
def test_a_keep_firing_for_difference_needs_keep_firing_for_under_promtool(
    listed: Assertion, tmp_path: Path
) -> None:
    """The listed assertion alone passes under promtool with the pack as it is, and fails once
    keep_firing_for is taken out of the rules as it is for vmalert 1.79."""
    file, name, alertname, at = listed
    path = RULES / "tests" / file
    suite = yaml.safe_load(path.read_text())
    case = next(t for t in suite["tests"] if t.get("name") == name)
    case["alert_rule_test"] = [
        t
        for t in case.get("alert_rule_test", [])
        if t["alertname"] == alertname and duration_ms(t["eval_time"]) == at
    ]
    case.pop("promql_expr_test", None)
    suite["tests"] = [case]
    passed = []
    for strip in (False, True):
        rule_files = []
        for n, rule_file in enumerate(suite["rule_files"]):
            rules = yaml.safe_load((path.parent / rule_file).read_text())
            for group in rules["groups"]:
                for rule in group["rules"]:
                    if strip:
                        rule.pop("keep_firing_for", None)
            copy = tmp_path / f"{strip}-{n}-{Path(rule_file).name}"
            copy.write_text(yaml.safe_dump(rules, sort_keys=False))
            rule_files.append(str(copy))
        test_file = tmp_path / f"{strip}.test.yml"
        test_file.write_text(yaml.safe_dump({**suite, "rule_files": rule_files}, sort_keys=False))
        command = [require("promtool"), "test", "rules", str(test_file)]
        passed.append(subprocess.run(command, capture_output=True, timeout=60).returncode == 0)
    assert passed[0], "the assertion fails under promtool with the pack as it is"
    assert not passed[1], "the assertion holds under promtool without keep_firing_for: unlist it"


def test_the_pack_loads_in_vmalert_but_for_keep_firing_for(tmp_path: Path) -> None:
    """Each rule file as it is: vmalert 1.79 refuses keep_firing_for and nothing else. Without it,
    every expression is valid MetricsQL and every annotation template (with `query`) is valid."""
    stripped = []
    packs = sorted(RULES.glob("*.rules.yml")) + sorted((RULES / "rollouts").glob("*.rules.yml"))
    for path in packs:
        done = subprocess.run(
            [VMALERT, "-dryRun", f"-rule={path}"], capture_output=True, text=True, timeout=60
        )
        refused = set(re.findall(r"unknown fields in rule: (\w+)", done.stdout + done.stderr))
        assert done.returncode == 0 or refused == {"keep_firing_for"}, done.stdout + done.stderr
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule.pop("keep_firing_for", None)
        stripped.append(tmp_path / f"{path.parent.name}-{path.name}")
        stripped[-1].write_text(yaml.safe_dump(rules, sort_keys=False))
    args = [VMALERT, "-dryRun", "-rule.validateTemplates", "-rule.validateExpressions"]
    done = subprocess.run(
        [*args, *(f"-rule={p}" for p in stripped)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("notation", "values"),
    [  # the examples of Prometheus' unit-testing documentation, and the pack's own forms
        ("-2+4x3", [-2.0, 2.0, 6.0, 10.0]),
        (" 1-2x4", [1.0, -1.0, -3.0, -5.0, -7.0]),
        (" 1x4", [1.0, 1.0, 1.0, 1.0, 1.0]),
        (" 1 _x3 stale", [1.0, None, None, None, "stale"]),
        ("5 25 45+60x2", [5.0, 25.0, 45.0, 105.0, 165.0]),
        ("_ 0.1x1 -3600", [None, 0.1, 0.1, -3600.0]),
    ],
)
def test_series_values_expand_as_promtool_expands_them(notation: str, values: list[Value]) -> None:
    assert expand_values(notation) == values


def test_series_labels_parse_as_promtool_parses_them() -> None:
    text = 'up{job="a",instance="b:1", x = "q\\"r", y=\'s\'}'
    labels = {"__name__": "up", "job": "a", "instance": "b:1", "x": 'q"r', "y": "s"}
    assert parse_series(text) == labels
    assert parse_series('{le="+Inf"}') == {"le": "+Inf"}
    assert parse_series("trt_heartbeat:threshold:x") == {"__name__": "trt_heartbeat:threshold:x"}
