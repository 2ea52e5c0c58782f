"""Quoting outside text (file names, paths, names read from files) in terminal messages.

Outside text can hold anything a file name can: escape sequences that would drive the
terminal (ESC [ 2 J clears it), carriage returns and newlines that forge lines, right-to-left
overrides that reorder what is shown, and bytes that are not valid UTF-8 (which Python keeps
as lone surrogates, and `print` refuses to encode).

- `shown(text)` escapes every character that is not printable (`str.isprintable`) as a
  Python escape (`\\x1b`, `\\n`, `\\u202e`; an undecodable byte of a file name as `\\xNN`), so
  a message shows exactly one line per quoted name and every name can be read back.
  Printable text, non-ASCII letters and backslashes included, is left as it is.
- `printable(text, limit)` does the same and cuts the result to about `limit` characters,
  saying how much was cut: for names read from untrusted files, which can be megabytes long.
"""

from __future__ import annotations

import os
import sys

__all__ = ["command", "printable", "shown"]

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _piece(char: str, keep_newlines: bool) -> str:
    return char if char.isprintable() or (keep_newlines and char == "\n") else _escaped(char)


def _as_text(text: object) -> str:
    if isinstance(text, (bytes, os.PathLike)):
        return os.fsdecode(text)
    return str(text)


def shown(text: object, keep_newlines: bool = False) -> str:
    """`text` (a str, a path, anything `str()` or `os.fsdecode` takes) for a message, with
    every non-printable character escaped. `keep_newlines=True` keeps the line breaks of a
    multi-line message (an exception text) and escapes everything else."""
    text = _as_text(text)
    if text.isprintable():
        return text
    return "".join(_piece(char, keep_newlines) for char in text)


def printable(text: object, limit: int = 200) -> str:
    """`shown(text)` cut to at most `limit` characters (escapes count as their printed
    length), the rest replaced by `... (N more characters)`."""
    text = _as_text(text)
    out, used = [], 0
    for i, char in enumerate(text):
        piece = _piece(char, False)
        if used + len(piece) > limit:
            return "".join(out) + f"... ({len(text) - i} more characters)"
        out.append(piece)
        used += len(piece)
    return "".join(out)


def command(script: str, module: str) -> str:
    """A command's name for its usage line: the console script `script` when it runs as that
    (`iet-train`), else `python -m MODULE`."""
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if called.removesuffix(".exe") == script else f"python -m {module}"
