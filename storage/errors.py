class DataError(ValueError):
    """Bad input data; the message names the file (or dataset), row and field."""


class BadRow(DataError):
    """One row that cannot be used; `reason` is how `on_bad_rows="skip"` counts it."""

    def __init__(self, message: str, reason: str = "bad_row"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # crosses Ray's process boundary with its reason
        return type(self), (str(self), self.reason)
