"""Edgeline central."""
