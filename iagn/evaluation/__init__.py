"""Evaluation: predictions with explanations, metrics, localization, speed, plots."""
