"""The HTTP edge: a hardened transport (`server`), what each path answers (`routes`), the
exposition of /metrics (`exposition`) and the exporter-toolkit web configuration (`config`)."""
