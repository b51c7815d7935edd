"""The harnesses tests, benchmarks and the demo share: control plane, real-node cluster, kvpn world, netns lab."""
