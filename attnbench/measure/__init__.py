"""Measurements of one built module: FLOPs, peak memory, latency, and the environment record."""
