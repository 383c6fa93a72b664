"""Errors that capsid reports to users.

Every failure a user can cause or fix is a :class:`CapsidError` carrying a
one-line message and a hint; the CLI prints ``capsid: error: <message>; <hint>``
and exits 255. Anything else escaping to the CLI is a bug.
"""

from __future__ import annotations


class CapsidError(Exception):
    """A failure with a message for the user and a hint on what to do."""

    exit_code = 255

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(CapsidError):
    """The command line itself is wrong."""


class ImageFormatError(CapsidError):
    """An image file is damaged, truncated or not an image at all."""


class ImageNotFoundError(CapsidError):
    """The named image does not exist."""


class OutputExistsError(CapsidError):
    """The target of a write exists and ``--force`` was not given."""


class ToolError(CapsidError):
    """An external tool (tar2sqfs, unsquashfs, squashfuse, …) failed."""


class RuntimeSetupError(CapsidError):
    """The container could not be set up (namespaces, mounts, binds)."""
