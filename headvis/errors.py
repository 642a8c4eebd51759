"""The one exception type whose message is meant for the user, and how entry points report errors."""

import os
import sys
import traceback
from typing import Callable

__all__ = ["HeadvisError", "run_cli"]


class HeadvisError(Exception):
    """Bad input or an unmet requirement: the CLI prints the message alone and exits 2."""


def run_cli(body: Callable[[], None], *, interrupted: str = "", prefix: str = "") -> int:
    """Run an entry point's body; exit code 0, 2 (HeadvisError), 130 (Ctrl-C) or 1 (a bug).

    The user sees one line, never a traceback (HEADVIS_DEBUG=1 prints it for bugs); `prefix` starts it
    (a torchrun scan's "rank 3: ", so that the failing process is named).
    """
    try:
        body()
    except HeadvisError as e:
        print(f"headvis: {prefix}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted:
            print(f"headvis: {prefix}{interrupted}", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line for the user, the trace on request
        if os.environ.get("HEADVIS_DEBUG"):
            traceback.print_exc()
        print(f"headvis: {prefix}internal error: {type(e).__name__}: {e} (HEADVIS_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return 0
