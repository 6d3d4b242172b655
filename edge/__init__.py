"""Edgeline edge."""
