"""Flower ServerApp for fedgen: a thin adapter over `fedgen.federation.coordinator`."""
