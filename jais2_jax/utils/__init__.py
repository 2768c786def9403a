"""Lowest layer: helpers with no knowledge of the model (staged, atomic outputs)."""
