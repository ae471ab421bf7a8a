"""Attacks that measure what a released fedgen model leaks, and the metrics that score them."""
