"""The rollout guard: an inference service's own traffic, compared between its versions.

source.py reads a source (where the request counters, latency and drift metrics live and which
labels say service and track) from a built-in name or a file; rules.py writes the recording and
alerting rules for sources; the canary judge (judge/traffic.py) reads the same sources.
"""
