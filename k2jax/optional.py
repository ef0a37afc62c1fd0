"""Optional dependencies: a missing one is one line naming the pip extra that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from k2jax.errors import UserError

# module -> the k2jax extra that installs it (pyproject.toml's optional-dependencies)
EXTRA_OF = {"torch": "compare", "transformers": "compare", "matplotlib": "compare",
            "libtpu": "tpu", "lm_eval": "eval"}


def require(module: str, purpose: str) -> ModuleType:
    """import `module`, or raise UserError: '<purpose> needs <module>: pip install ...'."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRA_OF[module.split(".")[0]]
        raise UserError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                        f"pip install 'k2jax[{extra}]'") from None
