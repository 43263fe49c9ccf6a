"""Algorithms: pure tensor math that chooses codes and parameters (no files, no modules)."""
