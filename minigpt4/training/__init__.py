"""Accelerate training loops, run folders and checkpoints."""
