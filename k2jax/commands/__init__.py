"""CLI subcommands, one module each (see k2jax/cli.py)."""
