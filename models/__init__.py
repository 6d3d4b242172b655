"""Edgeline models."""
