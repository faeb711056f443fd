"""Benchmark scripts: each prints a markdown table and writes JSON (see bench/results/)."""
