"""The one exception type for bad input: the CLI prints it as a single line and exits with code 2."""


class UsageError(ValueError):
    """Bad input from the user (an argument, a file, a model): message names the argument."""
