"""Same as `k2jax convert hf-to-orbax ...` (see docs/conversion.md)."""

import sys

from k2jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-orbax", *sys.argv[1:]]))
