"""Benchmarks of the kvpn operator against a real control plane (figures, not pass/fail)."""
