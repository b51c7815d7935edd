"""Test harness: a real Kubernetes control plane and the operator as a subprocess."""
