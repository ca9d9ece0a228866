"""JSON serialization of arguments, results and errors.

JSON, not pickle: every input, checkpoint and output stays readable with plain SQL
(``inputs->>0``). A value that JSON cannot carry is refused at the boundary with an
error naming it, before anything is written.
"""

from __future__ import annotations

import json
import re
import traceback
from typing import Any

from .errors import PayloadTooLarge, SerializationError

# an escaped NUL (\u0000) not itself escaped (\\u0000 is a backslash and "u0000")
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def dumps(value: Any, *, what: str, max_bytes: int) -> str:
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"{what} cannot be serialized to JSON: {exc}") from exc
    if "\\u0000" in text and _NUL.search(text):
        # valid JSON, but Postgres's jsonb refuses it: refused here, naming the value,
        # rather than failing a whole group-committed batch of other workflows' writes
        raise SerializationError(f"{what} contains a NUL character (\\u0000), which "
                                 "Postgres cannot store in jsonb")
    if "\\ud" in text or "\\uD" in text:
        # a lone surrogate (\ud800 without its pair) is valid JSON text that jsonb
        # refuses ("Unicode low surrogate must follow a high surrogate"): the slow
        # check only when an escaped surrogate appears at all
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise SerializationError(f"{what} contains a lone surrogate character "
                                     "(not valid UTF-8), which Postgres cannot store"
                                     ) from None
    if len(text) > max_bytes:
        raise PayloadTooLarge(
            f"{what} is {len(text)} bytes serialized; the limit is {max_bytes} "
            "(EngineConfig.max_payload_bytes)"
        )
    return text


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def dump_args(args: tuple[Any, ...], kwargs: dict[str, Any], *, workflow: str,
              max_bytes: int) -> str:
    """Serialize a workflow's arguments, naming the first argument that cannot be."""
    try:
        return dumps({"args": list(args), "kwargs": kwargs},
                     what=f"arguments of workflow {workflow!r}", max_bytes=max_bytes)
    except SerializationError:
        # the slow path only on failure: find the argument to name
        for i, a in enumerate(args):
            _check(a, f"argument {i} of workflow {workflow!r}")
        for k, v in kwargs.items():
            _check(v, f"argument {k!r} of workflow {workflow!r}")
        raise


def _check(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"{what} cannot be serialized to JSON: {exc}") from exc


# Longest exception message recorded: an error must always be storable, whatever the
# exception carried (a 2 MB message once made the failure unwritable, and the workflow
# looped to 'dead' re-running its steps, with the error lost).
MAX_ERROR_MESSAGE = 8000


def clean_text(text: str, limit: int) -> str:
    """``text`` as Postgres can store it in jsonb: NULs and lone surrogates replaced,
    cut to ``limit`` characters (saying how much was cut)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = f"{text[:limit]}... [{len(text) - limit} more characters cut]"
    return text


def error_payload(exc: BaseException) -> dict[str, Any]:
    """What is recorded of an exception: its type, message and a short traceback, each
    cleaned and cut so that the record can always be written."""
    try:
        message = str(exc)
    except Exception as err:  # a __str__ that raises must not lose the failure
        message = f"<str() of the exception raised {type(err).__name__}>"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
    return {"type": clean_text(type(exc).__name__, 200),
            "message": clean_text(message, MAX_ERROR_MESSAGE),
            "traceback": clean_text(tb[-4000:], 4100)}
