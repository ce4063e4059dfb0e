"""One exception type for mistakes a user can fix, and the wrapper every entry point runs in: it
turns that exception into one line and makes the output readable when it goes to a file or a pipe."""
from __future__ import annotations

import errno
import signal
import sys
import threading
import warnings
from pathlib import Path
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


def os_error_message(err: OSError, doing: str, path: str | Path | None = None) -> str:
    """One line for an operating-system error: what was being done, on which path, and why. A path
    through a file (`--record_root` naming a file, say) names that file."""
    where = Path(err.filename if err.filename is not None else path) if (err.filename or path) else None
    reason = err.strerror or str(err) or type(err).__name__
    lead = f"cannot {doing} " if doing else ""
    if where is None:
        return f"{lead.strip() or 'operating-system error'}: {reason}"
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{lead}{where}: {blocker} is a file, not a folder"
    if err.errno == errno.ENAMETOOLONG:
        return f"{lead}{where}: a name in it is too long ({max(len(p) for p in where.parts)} characters)"
    return f"{lead}{where}: {reason}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point; a UserError becomes `error: <message>` on stderr and exit status 2, and
    so does, as a last resort, an operating-system error (full disk, permission, a path through a
    file), printed with its path instead of a traceback. Warnings print as one `warning: <message>`
    line instead of Python's two-line source echo. SIGTERM and SIGHUP (a plain `kill`, a closed
    terminal, a sweep stopping its jobs) stop the command like Ctrl-C, so that it removes its
    unfinished output and releases the folders it holds; a signal the caller ignores (`nohup`)
    stays ignored. Output going to a file or a pipe
    is written line by line (and progress bars default to off there, see `interactive`)."""
    _line_buffered_when_redirected()
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:  # an ignored SIGHUP (nohup) stays ignored
                old[sig] = signal.signal(sig, _interrupt)
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        print(f"error: {os_error_message(err, '')}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        for sig, handler in old.items():  # in-process callers (tests) get their own handlers back
            signal.signal(sig, handler)
