"""The error the command-line tools turn into a one-line message instead of a traceback."""


class ToolError(RuntimeError):
    """A problem with the user's input (config, paths, flags, environment), stated with its fix."""
