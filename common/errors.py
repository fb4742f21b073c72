"""The one exception type for what a user can fix (bad data, a bad flag, a missing or corrupt file, a config
that does not match its checkpoint): ``common.cli`` prints it as one ``error:`` line and exits with status 1."""


class UserError(ValueError):
    """An error in what the user gave us, with a message that says where (file:line or --flag), what was
    expected and what to do. A ValueError, so code that already catches ValueError keeps working."""
