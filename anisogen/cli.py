"""One error convention for every command line (``pipelines/*.py``).

A **user error** (a missing or unreadable input, a bad flag value, data that cannot be used) prints one
line ``error: <what> (<file / flag / row>): <how to fix>`` on stderr and exits 2. Anything else is an
internal error: it keeps its traceback and exits 1. Ctrl-C exits 130 with one line.

User errors are :class:`UserError` (and its subclasses across the package: ``CorpusError``,
``GenerateInputError``, ``ConfigMismatch``, ``AuditInputError``, ``EmbeddingFileError``, ``ShardFormatError``,
``IncompleteRunError``, ``TrainInputError``, ...) plus the OS's "this path" errors (``FileNotFoundError``,
``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``). Scripts end with::

    if __name__ == "__main__":
        sys.exit(run_cli(main))

and the installed console scripts (``anisogen-<name>``, ``[project.scripts]`` in pyproject.toml) call
``anisogen.commands.<name>:entry``, made by :func:`console_script`, which does the same.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(ValueError):
    """An error the user can fix from the command line; its message is one line saying how."""


PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, (UserError,) + PATH_ERRORS)


def one_line(exc: BaseException) -> str:
    """The error's message on one line (OS errors as ``<path>: <reason>``)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def run_cli(main: Callable[..., int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` (or ``main()``) and turn user errors into one line and exit status 2."""
    try:
        rc = main(argv) if argv is not None else main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return int(rc or 0)


def console_script(main: Callable[..., int | None]) -> Callable[[], None]:
    """The ``[project.scripts]`` target for ``main``: a no-argument callable that runs ``sys.exit(run_cli(main))``,
    so ``anisogen-<name>`` and ``python pipelines/<name>.py`` exit and report errors the same way."""

    def entry() -> None:
        sys.exit(run_cli(main))

    entry.__doc__ = f"Console-script entry point: ``sys.exit(run_cli({main.__module__}.main))``."
    return entry


def add_deprecated_alias(group, old: str, new: str, *, dest: str, nargs=None, type=None, const=None) -> None:
    """Accept ``old`` as a hidden alias of ``new`` for one release: it stores into ``dest`` like the new flag
    and prints one deprecation line on stderr. ``const`` makes it a flag (store_const / store_true style)."""
    import argparse

    class _Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated, use {new} (the old name goes away in the next release)",
                  file=sys.stderr)
            if const is not None:
                setattr(namespace, dest, const)
            elif isinstance(getattr(namespace, dest, None), list):
                getattr(namespace, dest).append(values)
            else:
                setattr(namespace, dest, values)

    kwargs = {"nargs": 0} if const is not None else {"nargs": nargs, "type": type}
    group.add_argument(old, dest=f"_deprecated_{dest}", action=_Deprecated, help=argparse.SUPPRESS, **kwargs)


def resolve_device(value: str | None) -> str:
    """A ``--device`` value as a torch device string: ``auto`` (or ``None``) is ``cuda`` when torch sees a GPU,
    else ``cpu``; anything else is returned as given."""
    if value in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return value
