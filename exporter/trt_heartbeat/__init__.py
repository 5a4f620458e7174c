"""trt-heartbeat-exporter: an active end-to-end inference heartbeat for every GPU of a node."""

__version__ = "0.1.0"
