"""Ahead-of-time TPU compiles of the complete train step: does a plan fit, how fast might it be."""
