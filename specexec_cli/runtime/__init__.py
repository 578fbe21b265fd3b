"""Offloaded runtime: stream target decoder layers from host RAM or disk to the compute device."""
