"""One place that hides secrets: passwords in URIs and every secret the agent has read.

Used by the log filter (every handler, so the journal's fields too), `check-config`, the
`T/state` report and error messages. A secret is registered when it is read (the MQTT password);
a URI's password is recognised wherever a URI appears in a text.
"""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import unquote

MASK = "***"
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<pw>[^\s@/]*)@")
_MIN_SECRET = 3  # shorter "secrets" would mask ordinary words and numbers everywhere
_secrets: set[str] = set()
_lock = threading.Lock()


def remember(secret: str | None) -> None:
    """Hide `secret` from now on wherever text passes through `redact`."""
    if secret and len(secret) >= _MIN_SECRET:
        with _lock:
            _secrets.add(secret)


def remember_uri(uri: object) -> None:
    """Remember the password in `uri` (if any) as a secret: then even an error message that
    quotes it out of its URI hides it."""
    if isinstance(uri, str):
        m = _URI_PASSWORD.search(uri)
        if m:
            remember(unquote(m["pw"]))
            remember(m["pw"])


def redact(text: str) -> str:
    """`text` with URI passwords and remembered secrets replaced by ``***``."""
    if not isinstance(text, str):
        text = str(text)
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class Filter(logging.Filter):
    """Redacts each record's message, exception text and string fields before any handler
    formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in list(vars(record).items()):
            if key.isupper() and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of `logger` (the root logger by default)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, Filter) for f in handler.filters):
            handler.addFilter(Filter())

