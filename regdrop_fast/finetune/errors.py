"""User-facing errors of the fine-tuning job: the CLI prints them as one line, no traceback."""


class FinetuneError(Exception):
    """A problem with the user's input (files, columns, labels, flags, folders)."""
