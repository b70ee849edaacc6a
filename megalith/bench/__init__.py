"""Peer benchmarks: the same training step under megalith and under the frameworks users compare it with."""
