"""Flower ClientApp for fedgen: a thin adapter over `fedgen.hospital`."""
