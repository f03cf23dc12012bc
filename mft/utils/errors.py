"""The one exception type for mistakes a user can fix (bad file, bad key, bad value).

Entry points catch it and print its message as one paragraph, without a traceback.
"""


class MftError(Exception):
    """A user-facing error: the message names the file, line or key and what was expected."""
