"""Benchmark of orama-sni-router beside HAProxy and a direct connection, on loopback.

Run `python3 -m bench` from the repository root; `--smoke` runs every part in seconds.
"""
