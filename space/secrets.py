"""Credentials in URLs (``postgresql+psycopg2://user:password@host/db``): masked before anything is logged, printed
or shown, and taken from the environment instead of space.yaml.

A URL setting of space.yaml (``search.optuna_storage``, ``search.address``, ``tracking.uri``) may name environment
variables as ``${NAME}``, e.g. ``postgresql+psycopg2://mps:${PGPASSWORD}@db:5432/optuna``; they are expanded when
the space is loaded, and an unset one is an error naming the key and the variable. ``mask`` replaces the password
of every URL in a text with ``***``; the search masks space.yaml before it logs it to MLflow, and every URL it
prints.
"""

from __future__ import annotations

import os
import re

__all__ = ["expand_env", "mask"]

_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):(?P<password>[^@\s/'\"]+)@")
_ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}")


def mask(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(lambda m: f"{m['head']}:***@", text)


def expand_env(value: str, where: str = "") -> str:
    """``value`` with each ``${NAME}`` replaced by the environment variable NAME; an unset one is a ValueError
    naming the variable (and ``where``, the key path, when given)."""

    def one(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in os.environ:
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}environment variable {name} is not set (referenced as ${{{name}}})")
        return os.environ[name]

    return _ENV_REF.sub(one, value)
