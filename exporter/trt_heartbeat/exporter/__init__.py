"""The exporter daemon: probe every GPU on a timer in worker processes and serve the heartbeat.

`app` composes it: settings (`config`), targets (`gpus`), one probe loop per target
(`scheduler`, `worker`, `backends`), NVML polling (`nvml_poller`), the snapshot the collectors
read (`state`, `health`, `collector`) and the HTTP edge (`web`).
"""
