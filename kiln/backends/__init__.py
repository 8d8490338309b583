"""Backends: tactics per device; cpu/ and cuda/ register theirs on import."""
