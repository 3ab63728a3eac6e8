"""Benchmarks: peer and hpcdl run side by side in one invocation, ratios printed."""
