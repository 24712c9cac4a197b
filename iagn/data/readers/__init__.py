"""Readers that turn each dataset layout into a `RawDataset` (then a manifest)."""
