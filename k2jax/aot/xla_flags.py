"""XLA/libtpu flags for one compile: `train.xla_flags` (a LIBTPU_INIT_ARGS-style string,
"--xla_tpu_enable_async_collective_fusion=true --xla_enable_async_all_gather=true") passed as
the compile's `compiler_options`.

Precedence (checked on libtpu 0.0.42.1 in tests/test_xla_flags.py): libtpu reads
LIBTPU_INIT_ARGS once, when it starts; a compile's options override it flag by flag. So a flag
named in `train.xla_flags` wins, and LIBTPU_INIT_ARGS still applies to every flag the config
does not name. The options are per compile, so one process can compile plans with different
flags (`k2jax aot --search`, the calibration), which LIBTPU_INIT_ARGS cannot do.
"""

from __future__ import annotations

import re

from k2jax.errors import ConfigError, UserError

_FLAG = re.compile(r"--([A-Za-z_][\w]*)(?:=(\S*))?$")


def parse_xla_flags(text: str, key: str = "train.xla_flags") -> dict[str, str]:
    """{"xla_foo": "true", ...} from "--xla_foo=true --xla_bar" (a bare flag means true)."""
    options: dict[str, str] = {}
    for word in (text or "").split():
        found = _FLAG.match(word)
        if not found:
            raise ConfigError(key, f"expected flags like --xla_name=value separated by spaces, "
                              f"got {word!r}")
        options[found.group(1)] = found.group(2) if found.group(2) is not None else "true"
    return options


def compile_with_flags(lowered, text: str, key: str = "train.xla_flags"):
    """`lowered.compile()` with the flags of `text`; a flag this compiler does not take (an
    unknown name, or a chip-config flag libtpu accepts only at start-up) is one clear line."""
    options = parse_xla_flags(text, key)
    if not options:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=options)
    except Exception as err:  # jax raises JaxRuntimeError(INVALID_ARGUMENT: No such compile option)
        rejected = re.search(r"No such compile option: '?([\w]+)'?", str(err))
        if rejected is None:
            raise
        raise UserError(f"{key}: this compiler does not take --{rejected.group(1)} (an unknown "
                        f"flag, or one libtpu reads only at start-up: set that one in "
                        f"LIBTPU_INIT_ARGS instead)") from None
