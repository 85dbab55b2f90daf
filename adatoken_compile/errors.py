"""User-facing errors: one line, naming the file and the fix; the CLI exits 2.

The form is ``<file or option>: <what is wrong>; <how to fix it>``. The Python API raises the same
exception with the same message; it subclasses :class:`ValueError`, so code that already
catches bad values catches it too.
"""


class InputError(ValueError):
    """Bad input a user can act on (file, shape, dtype, value). Printed as one line by the CLI."""


class ScheduleMismatch(InputError):
    """A schedule or artifact made for another model."""


def first_line(e: BaseException) -> str:
    """An exception's first line, at most 200 characters: what a one-line error quotes of a library's."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:200]
