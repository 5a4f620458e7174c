"""canary-judge: compare a canary track with its baseline from what Prometheus recorded.

prometheus.py asks, queries.py says what to ask and collects the answers, stats.py holds the
tests, verdict.py turns them into checks and a verdict, report.py and plot.py show it.
"""
