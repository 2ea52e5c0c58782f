"""How messages quote outside text: file names, paths, dataset names, exception texts.

Outside text can hold anything a file name can: escape sequences that would drive the
terminal (ESC [ 2 J clears it), carriage returns and newlines that forge lines, right-to-left
overrides that reorder what is shown, and bytes that are not valid UTF-8 (which Python keeps as
lone surrogates, and `print` refuses to encode). `shown(text)` escapes every character that
is not printable, so a message shows exactly one line per quoted name and every name can be
read back.
"""

from __future__ import annotations

import os

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


def shown(text: object, keep_newlines: bool = False) -> str:
    """`text` (a str, a path, anything `str()` or `os.fsdecode` takes) for a message.

    Every character that is not printable (`str.isprintable`: control characters, escape
    sequences, format characters such as the right-to-left override, lone surrogates) is
    written as a Python escape (`\\x1b`, `\\n`, `\\u202e`); an undecodable byte of a file name
    as `\\xNN`. Spaces and printable non-ASCII letters stay. `keep_newlines=True` keeps the
    line breaks of a multi-line message (an exception text) and escapes everything else.
    """
    if isinstance(text, (bytes, os.PathLike)):
        text = os.fsdecode(text)
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() or (keep_newlines and char == "\n")
                   else _escaped(char) for char in text)
