"""Flax NNX model families, one file each; built from explicit arguments (training/factory.py builds
them from a run config)."""
