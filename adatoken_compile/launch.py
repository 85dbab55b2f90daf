"""torchrun, with the tool's exit status and error line: ``python -m adatoken_compile.launch``.

It takes torchrun's own arguments (``--standalone``, ``--nproc-per-node``, ``--nnodes``, ...) and
runs the same launcher in-process. What differs is the end of a failed launch: torchrun prints
its own failure summary and traceback (some 40 lines) after the tool's one-line ``error: ...``
and exits 1 whatever its workers' status; this launcher keeps torchrun's own log below errors,
prints nothing of its own when a worker already said what went wrong, and exits with the
workers' status (2 for bad input, 128 + n for a signal). Everything else (rendezvous, restarts,
environment) is torchrun's.

    OMP_NUM_THREADS=1 python -m adatoken_compile.launch --standalone --nproc-per-node 2 \\
        -m adatoken_compile calibrate --data questions.json --scenes scans/ --out runs/cal
"""

from __future__ import annotations

import logging
import sys

# torchrun's loggers: worker failures, the SIGTERM it sends the other workers, its rendezvous notes
_TORCHRUN_LOGGERS = ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")


def exit_status(failures: dict) -> int:
    """One status for a failed launch: the first worker's exit code that is not the SIGTERM torchrun
    sent the others after the first failure (a signal ``n`` as 128 + n, as a shell reports it)."""
    codes = [f.exitcode for _, f in sorted(failures.items())]
    own = [c for c in codes if c is not None and c > 0] or [c for c in codes if c is not None and c != -15] or codes
    code = own[0] if own and own[0] is not None else 1
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> None:
    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run
    except ImportError:
        sys.stderr.write("error: the launcher needs the [compile] extra (torch); install it with "
                         "pip install 'adatoken-compile[compile]'\n")
        sys.exit(2)
    for name in _TORCHRUN_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        # the failing worker printed its one line (rank 0 prints the failing rank's); torchrun's
        # summary would only repeat it as a traceback
        sys.exit(exit_status(e.failures))
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; temporary outputs removed\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
