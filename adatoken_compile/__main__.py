"""``python -m adatoken_compile ...`` (and ``torchrun ... -m adatoken_compile ...``): the CLI.

:func:`run` is also the ``adatoken-compile`` console script. It makes SIGINT and SIGTERM end
the process with one line before anything is imported (the CLI then installs the handlers that
also remove temporary outputs), so an interrupt while starting up is no traceback either.
"""

import os
import signal
import sys


def _interrupted(signum, frame):  # pragma: no cover - exercised through subprocess tests
    sys.stderr.write(f"error: interrupted by signal {signum} while starting; nothing written\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def run():
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupted)
    from adatoken_compile.cli import main  # after the handlers: starting up takes a while

    main(prog_name="adatoken-compile")  # the command's name in messages, however it was started


if __name__ == "__main__":
    run()
