"""The one exception type a stage raises for a problem the user can fix."""


class StageError(Exception):
    """A problem with the input or the params, with a message that says what to do.

    `main()` prints it as one line and exits non-zero; tests assert on its text.
    """
