"""Resolve a user's ``package.module:attribute`` reference (their model or dataset factory)."""
from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str, what: str) -> Any:
    """The object ``path`` names, or one clear ValueError naming ``what`` (e.g. "model") and the path."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {path!r}: give your own as 'package.module:factory'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what} {path!r} cannot be imported: {exc}") from None
