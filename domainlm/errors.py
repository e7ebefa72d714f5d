"""The one exception type for mistakes a user can fix: the CLI prints it without a traceback."""


class UserError(Exception):
    """A problem caused by input (recipe, shard, path, hardware); the message says the fix."""
