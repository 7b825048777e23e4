class DataError(ValueError):
    """Bad input data; the message names the file (or dataset), row and field."""
