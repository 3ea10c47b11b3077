"""Structured logs: one JSON object per line, in the shape Cloud Logging parses from stdout.

Each line carries `severity`, `message`, the VM key fields and an `outcome` verb in the past tense
("registered", "denied", "ignored", ...). Callers pass facts, never key material.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from .model import VmKey

_LOGGER_NAME = "meshjoin"
_SEVERITY = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "CRITICAL"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelname, "DEFAULT"),
            "message": record.getMessage(),
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "logger": record.name,
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[0] is not None:
            # Type and message only: a traceback's locals can hold anything, its text stays bounded.
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(entry, default=str)


def configure(level: int = logging.INFO, stream=None) -> None:
    """Route meshjoin's logger to stdout (Cloud Logging reads it) as JSON lines (idempotent)."""
    logger = logging.getLogger(_LOGGER_NAME)
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stdout)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def log(severity: str, message: str, *, key: VmKey | None = None, outcome: str | None = None,
        exc_info: bool = False, **fields: Any) -> None:
    record_fields: dict[str, Any] = {}
    if key is not None:
        record_fields["vm"] = str(key)
        record_fields.update(key.log_fields())
    if outcome:
        record_fields["outcome"] = outcome
    record_fields.update(fields)
    logging.getLogger(_LOGGER_NAME).log(
        getattr(logging, severity), message, extra={"fields": record_fields}, exc_info=exc_info)
