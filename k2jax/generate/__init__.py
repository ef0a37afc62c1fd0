"""Text generation with a key/value cache: bucketed prefill + chunked decode on a device mesh."""

from k2jax.generate.generator import Generator
from k2jax.generate.sampling import SamplingParams

__all__ = ["Generator", "SamplingParams"]
