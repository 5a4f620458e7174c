#!/bin/sh
# node-problem-detector custom plugin: sets the node condition GPUInferenceUnhealthy when a GPU
# of this node fails the canonical inference probe. The probe command's exit codes are the plugin
# protocol's: 0 OK, 1 problem, 2 (bad input) unknown; its --summary output is the one line NPD
# shows as the condition's message. Extra arguments are passed on (e.g. --backend cuda).
exec trt-heartbeat-exporter probe --count 3 --timeout 5s --summary "$@"
