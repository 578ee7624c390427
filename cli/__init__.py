"""The freeshap-dq command line (click).

:func:`main` is the console entry point. It is light on purpose: a Ctrl-C while the heavy modules (torch,
transformers) are still being imported, or a second one while the process is exiting, ends the command with
exit code 130 and one line, never a traceback.
"""

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def main() -> None:
    try:
        from freeshap_dq.cli.main import cli

        cli()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting changes nothing
        sys.stderr.write("interrupted before the command started; nothing was written.\n")
        sys.stderr.flush()
        # os._exit, not sys.exit: an interrupt inside an import can leave the interpreter set to re-raise SIGINT at
        # shutdown (the process then dies of the signal, not with 130); nothing is written yet, so nothing is lost
        os._exit(EXIT_INTERRUPTED)
