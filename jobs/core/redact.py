"""Secrets out of every output: what a job prints, writes to its step record and returns to Airflow.

Why one helper: the publish step reports the Feast registry config, and production configs carry
credentials (a SQL registry ``postgresql://user:password@host/db``, a Redis
``connection_string: "host:6379,password=..."``). Whatever reaches stdout, ``reports/dt=D/steps/*.json``
or an XCom is readable by far more people than the config file, so every output path
(:func:`jobs.core.settings.run_cli`, :func:`jobs.pipeline._timed`, the rollback and backfill CLIs) passes
its result through :func:`redact`.

What counts as a secret: the value of a key named like a credential (``password``, ``*_password``,
``secret``, ``*_secret``, ``api_key``, ``access_token``, ``credentials``, ...), in a dict or in text
(``key=value``, ``key: value``, ``'key': 'value'``), and the password of a URL's user info
(``scheme://user:password@host``). Counters such as ``tokens`` or ``events_per_token`` are not.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
_SECRET_WORD = (r"(?:(?:[a-z0-9]+[_-])*(?:password|passwd|pwd|secret|passphrase|credentials?"
                r"|api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|client[_-]?secret"
                r"|(?:access|auth|refresh|api|bearer|session|sas|id)[_-]?token)|token)")
_SECRET_KEY = re.compile(rf"^{_SECRET_WORD}$", re.IGNORECASE)
# key=value / key: value / 'key': 'value' / "key": "a b"; an unquoted value runs to a space, quote, , & ; ) or }
_KEY_VALUE = re.compile(rf"(?P<key>\b{_SECRET_WORD}\b['\"]?\s*[=:]\s*)"
                        rf"(?:\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)'|(?P<bare>[^'\"\s,&;)}}]+))", re.IGNORECASE)
# scheme://user:password@host (the user stays, the password goes); also scheme://:password@host
_URL_USERINFO = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s'\"]*:)(?P<password>[^@/\s'\"]+)(?=@)", re.IGNORECASE)


def is_secret_key(key: object) -> bool:
    """Whether a mapping key names a credential (its value is masked whatever it is)."""
    return isinstance(key, str) and bool(_SECRET_KEY.match(key))


def redact_text(text: str) -> str:
    """``text`` with URL passwords and credential ``key=value`` values replaced by ``***``."""
    text = _URL_USERINFO.sub(lambda m: m["head"] + MASK, text)
    return _KEY_VALUE.sub(_mask_value, text)


def _mask_value(m: re.Match) -> str:
    quote = '"' if m["dq"] is not None else "'" if m["sq"] is not None else ""
    return f"{m['key']}{quote}{MASK}{quote}"


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings, scalars) with every secret masked.

    Any other object (a pydantic config, a Path, a numpy number) is kept as it is unless its text
    holds a secret; then it becomes its redacted text, so nothing leaks by way of ``str``."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    text = str(obj)
    masked = redact_text(text)
    return obj if masked == text else masked
