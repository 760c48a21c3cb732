"""Bad input on the command line: one line on stderr naming the flag or field, exit status 2, no traceback.

The library validates and raises named errors (``ConfigError``, the estimator's ValueErrors naming
``method.rank=...``, ``FileNotFoundError`` for a missing data package); every command is wrapped in
:func:`exit_2_on_bad_input`, the one place that turns them into CLI errors. An error that lists several
problems (``issues``, e.g. a run config's) prints one ``error:`` line per problem. No torch here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import typer

# ValueError covers ConfigError, MethodNameError, the estimator's option errors.
BAD_INPUT = (ValueError, FileNotFoundError)
EXIT_BAD_INPUT = 2  # what click uses for usage errors (a bad --flag value), so both kinds agree


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line (a message spread over lines is joined)."""
    return "error: " + " ".join(str(err).split())


def error_lines(err: BaseException) -> list[str]:
    """:func:`error_line`, or one ``error:`` line per problem for an error listing several (an ``issues`` tuple,
    as the run config's RunConfigError has: its message holds one problem per line)."""
    if isinstance(getattr(err, "issues", None), tuple):
        return [error_line(line) for line in str(err).splitlines() if line.strip()]
    return [error_line(err)]


def exit_2_on_bad_input(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a typer command: BAD_INPUT errors print :func:`error_line` to stderr and exit with status 2."""

    @functools.wraps(command)  # typer reads the options from the wrapped signature
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BAD_INPUT as err:
            for line in error_lines(err):
                typer.echo(line, err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return run


def run_or_exit_2(call: Callable[[], Any], bad_input: tuple[type[BaseException], ...] | None = None) -> Any:
    """``call()``; the named bad-input errors of a long command (a run config, a data row, a model path, a run
    that cannot start) print their ``error:`` lines and exit 2. Narrower than :func:`exit_2_on_bad_input`, so a
    ValueError from deep inside a training run still shows its traceback."""
    if bad_input is None:
        bad_input = _train_errors()
    try:
        return call()
    except bad_input as err:
        for line in error_lines(err):
            typer.echo(line, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _train_errors() -> tuple[type[BaseException], ...]:
    """The named errors of `slimtune train` (its modules import torch: loaded only by that command)."""
    from slimtune.config import ConfigError
    from slimtune.files import AdapterFileError
    from slimtune.train.checkpoint_read import CheckpointError
    from slimtune.train.config import RunConfigError
    from slimtune.train.data import BadRow
    from slimtune.train.distributed import DistributedError
    from slimtune.train.model import ModelLoadError
    from slimtune.train.run import RunError

    return (ConfigError, RunConfigError, FileNotFoundError, AdapterFileError, BadRow, ModelLoadError, RunError,
            DistributedError, CheckpointError)
