"""Tests that run the daemon as a subprocess (crash, signals, peers, faults on the wire)."""
