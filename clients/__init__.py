"""Flower ClientApp for fedgen: a thin adapter over `fedgen.federation.hospital`."""
