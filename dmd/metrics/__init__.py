"""Metrics: feature networks and Frechet distances on their features."""
