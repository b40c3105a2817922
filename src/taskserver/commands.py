"""One way to parse a command line: every ``python -m`` entry point is a typer command.

The ``taskserver`` CLI is a typer app; the processes it and the chart start (workers, the warm
lane's worker, recovery, the request lane's drainer and endpoint, the training launcher) each
declare their options as a typed function and run it through :func:`run`, so ``--help``, types,
repeatable options and usage errors (exit 2, naming the option) behave the same everywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer
from typer.exceptions import TyperException


def run(command: Callable[..., Any], argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Parse ``argv`` (default: ``sys.argv[1:]``) for ``command`` and call it; return its value.

    A usage error prints the usage and the reason and exits 2; ``--help`` prints and exits 0.
    """
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return typer.main.get_command(app).main(args=args, prog_name=prog, standalone_mode=False)
    except TyperException as exc:  # a usage error (exit 2) or another error typer reports itself
        show = getattr(exc, "show", None)
        if show is None:
            raise
        show()
        raise SystemExit(exc.exit_code) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(130) from None
