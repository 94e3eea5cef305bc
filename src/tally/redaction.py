"""Passwords inside URLs (redis://:secret@host, postgresql://user:secret@host) are
masked before any text leaves the process: every log line and every error printed.
"""

from __future__ import annotations

import re

MASK = "***"
_URL_CREDENTIALS = re.compile(
    r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s'\"]*):(?P<password>[^@/\s'\"]+)@", re.IGNORECASE
)


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _URL_CREDENTIALS.sub(rf"\g<head>:{MASK}@", text)
