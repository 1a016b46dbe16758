"""Our train step against the peers: `python -m benchmarks.peers.run`."""
