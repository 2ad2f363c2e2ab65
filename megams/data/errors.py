"""The one exception of megams.data."""


class DataError(ValueError):
    """Bad data input, phrased for the user on ONE line: the file (or config field) and what was expected.

    Tools print it as `error: <message>` and exit 2; the trainer does the same before any rank trains.
    """

    def __init__(self, message: str):
        # One line, whatever the caller interpolated (a file name with a newline, an OS message).
        super().__init__(" ".join(str(message).split("\n")))
