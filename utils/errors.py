"""One exception type for mistakes a user can fix, and the wrapper every entry point runs in: it
turns that exception into one line and makes the output readable when it goes to a file or a pipe."""
from __future__ import annotations

import sys
import warnings
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (flag, file, dataset, record): printed as one line, exit 2."""


def interactive() -> bool:
    """True when stdout and stderr are both terminals. Progress bars are drawn only then: written
    to a log file or a pipe, every redraw of a bar becomes a line of carriage returns and escape
    codes, and the epoch lines drown in them."""
    return all(_isatty(stream) for stream in (sys.stdout, sys.stderr))


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no such method, or a closed stream
        return False


def _line_buffered_when_redirected() -> None:
    """A redirected stdout is block-buffered by Python: its lines would reach the file in chunks,
    after the stderr lines (warnings, the final error) written later. One line at a time keeps
    the log in the order things happened."""
    for stream in (sys.stdout, sys.stderr):
        if not _isatty(stream):
            try:
                stream.reconfigure(line_buffering=True)
            except (AttributeError, ValueError, OSError):  # not a text stream of its own (a test's capture)
                pass


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point; a UserError becomes `error: <message>` on stderr and exit status 2.
    Warnings print as one `warning: <message>` line instead of Python's two-line source echo.
    Output going to a file or a pipe is written line by line (and progress bars default to off
    there, see `interactive`)."""
    _line_buffered_when_redirected()
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
