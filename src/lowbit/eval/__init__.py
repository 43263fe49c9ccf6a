"""Measurement: task metrics, output error, size and latency, and the reports built from them."""
