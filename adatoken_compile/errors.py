"""User-facing errors: one line, naming the file and the fix; the CLI exits non-zero."""


class InputError(Exception):
    """Bad input a user can act on (file, shape, dtype, value). Printed as one line by the CLI."""


class ScheduleMismatch(InputError):
    """A schedule or artifact made for another model."""
