"""One error type for user mistakes, shown as a single line by the CLIs."""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""
