"""Same as `k2jax convert orbax-to-hf ...` (see docs/conversion.md)."""

import sys

from k2jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "orbax-to-hf", *sys.argv[1:]]))
