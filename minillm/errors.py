"""The two exceptions library code raises; ``minillm.cli`` turns them into exit codes."""


class MiniLLMError(Exception):
    """A problem the user can fix. The message says what went wrong and what to do. Exit code 1."""

    exit_code = 1


class UsageError(MiniLLMError):
    """A bad option or config value. Exit code 2."""

    exit_code = 2
