"""Fields saved under an earlier name (configs, recipe files, sweep folders) read back under their current name."""

from __future__ import annotations

import warnings

from .errors import ConfigError


def current_names(values: dict, renamed: dict[str, str], where: str) -> dict:
    """``values`` with every field named in ``renamed`` (earlier name -> current name) moved to its current name,
    with a ``FutureWarning`` naming ``where`` (the file or config read); both names at once is a ``ConfigError``."""
    moved = dict(values)
    for old, new in renamed.items():
        if old not in moved:
            continue
        if new in moved:
            raise ConfigError(new, f"{where} sets both {old!r} (the earlier name of {new!r}) and {new!r}; keep only "
                                   f"{new!r}.")
        moved[new] = moved.pop(old)
        warnings.warn(f"{where}: {old!r} is now called {new!r} and was read as such; save it again (or rename the "
                      "field) to silence this warning.", FutureWarning, stacklevel=3)
    return moved
