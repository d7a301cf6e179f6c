"""Analyses of trained models and sweeps: shape planning, interaction metrics, reports."""
