"""One exception type for mistakes a user can fix, and the wrapper that turns it into one line."""
from __future__ import annotations

import sys
import warnings
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (flag, file, dataset, record): printed as one line, exit 2."""


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point; a UserError becomes `error: <message>` on stderr and exit status 2.
    Warnings print as one `warning: <message>` line instead of Python's two-line source echo."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
