from trt_heartbeat.cli import main

main()
