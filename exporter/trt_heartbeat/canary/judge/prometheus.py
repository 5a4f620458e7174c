"""A small client for the Prometheus HTTP API: instant and range queries, nothing else.

Every failure becomes a `PrometheusError` whose message says what went wrong in one line:
unreachable, timed out, an HTTP error with Prometheus' own explanation, or an answer that is not
the API's JSON.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trt_heartbeat.errors import HeartbeatError

Opener = Callable[..., Any]


class PrometheusError(HeartbeatError):
    """Prometheus could not be asked, or answered with an error."""


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    values: list[tuple[float, float]]  # (unix time, value); one pair for an instant query


class PrometheusClient:
    def __init__(self, url: str, timeout: float = 10.0, opener: Opener | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise PrometheusError(f"--prometheus: not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._open = opener or urllib.request.urlopen

    def query(self, expr: str, at: float) -> list[Series]:
        """An instant query evaluated at `at`."""
        return self._series(self._get("query", {"query": expr, "time": f"{at:.3f}"}))

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return self._series(self._get("query_range", params))

    def _get(self, endpoint: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
        try:
            with self._open(url, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = _api_error(err.read()) or str(err.reason)
            raise PrometheusError(
                f"Prometheus at {self.url} answered HTTP {err.code}: {detail}"
            ) from None
        except OSError as err:  # URLError carries the socket's error in `reason`
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
                raise PrometheusError(
                    f"Prometheus at {self.url} did not answer within {self.timeout:g}s"
                ) from None
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {reason}") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise PrometheusError(
                f"{self.url} did not answer with the Prometheus API's JSON (is it Prometheus?)"
            ) from None
        if not isinstance(document, dict) or document.get("status") != "success":
            raise PrometheusError(f"Prometheus at {self.url}: {_api_error(body) or 'error'}")
        data = document.get("data")
        if not isinstance(data, dict):
            raise PrometheusError(f"Prometheus at {self.url}: answer without data")
        return data

    def _series(self, data: dict[str, Any]) -> list[Series]:
        kind, result = data.get("resultType"), data.get("result", [])
        if kind == "vector":
            return [
                Series(r["metric"], [(float(r["value"][0]), float(r["value"][1]))]) for r in result
            ]
        if kind == "matrix":
            return [
                Series(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in result
            ]
        raise PrometheusError(f"Prometheus at {self.url}: unexpected result type {kind!r}")


def _api_error(body: bytes) -> str:
    """Prometheus' own explanation of an error, where the body carries one."""
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    if isinstance(document, dict) and document.get("error"):
        return f"{document.get('errorType', 'error')}: {document['error']}"
    return ""
