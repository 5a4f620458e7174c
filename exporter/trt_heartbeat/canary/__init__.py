"""The canary tooling: one-shot commands that read Prometheus and judge a rollout.

`judge` compares a canary runtime image with stable (`canary-judge`); `guard` generates the
rollout guard's rules from a service's own traffic (`service-rules`). Nothing here imports the
exporter daemon: only the shared leaves (`errors`, `domain`, `documents`, `cliflags`).
"""
