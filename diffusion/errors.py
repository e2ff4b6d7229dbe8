"""Errors the user can act on.

Anything raised as ``T2IError`` is printed by the CLI as one line (``t2i: error: ...``) with no
traceback: it names the problem (a params key, a missing stage input, an unknown model name) and,
where there is one, the fix.
"""


class T2IError(Exception):
    """A problem with the user's input or environment, reported in one line."""


class ConfigError(T2IError):
    """A missing, unknown or malformed key in params.yaml."""


class MissingInputError(T2IError):
    """A stage input (shards, embeddings, checkpoint, ...) does not exist yet."""


def require_path(path, what: str, hint: str):
    """Return ``path`` as a Path if it exists, else raise a one-line MissingInputError."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise MissingInputError(f"{what} not found at {p} ({hint})")
    return p
