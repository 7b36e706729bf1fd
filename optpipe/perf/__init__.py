"""Performance: the latency harness (inputs, workloads, statistics) and the regression check."""
