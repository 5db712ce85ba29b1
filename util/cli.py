"""Running a command-line entry point: one-line errors and honest exit codes."""

import signal
import sys
import threading
import warnings

from util.errors import USER_ERRORS, SaveError
from util.processes import die_with_parent


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def _terminate_as_interrupt(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the first one counts: a second must not cut the checkpoint short
    raise KeyboardInterrupt


def run_cli(main, argv=None):
    """Call main(argv); bad input exits with status 2 and a one-line 'error: ...' message, a
    failed write (a full disk) with status 1 and one line saying what failed. SIGTERM (`kill`,
    `timeout`, a scheduler ending the job) stops the run as Ctrl-C does: the trainers write their
    checkpoint, so the same command resumes; exit status 130 either way. The SIGTERM handler and
    the one-line warnings last only as long as the call: a caller in the same process (a test,
    a notebook) gets its own back."""
    previous_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _terminate_as_interrupt) if main_thread else None
    try:
        die_with_parent()  # a job of batch.py ends with it
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SaveError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        warnings.formatwarning = previous_format
        if main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
