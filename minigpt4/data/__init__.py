"""Interaction tables, splits, importers and torch-side batches."""
