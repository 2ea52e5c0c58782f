"""iet_jax.conventions.messages: outside text quoted in messages with what is not printable
escaped."""

import os
from pathlib import Path

from iet_jax.conventions.messages import shown


def test_shown_escapes_what_is_not_printable():
    assert shown("photo 1 é.png") == "photo 1 é.png"  # spaces and letters stay
    assert shown("a\x1b[2Jb") == "a\\x1b[2Jb"  # ESC: would clear the terminal
    assert shown("x\ny\rz\t") == "x\\ny\\rz\\t"  # forged lines
    assert shown("evil\u202egnp.exe") == "evil\\u202egnp.exe"  # right-to-left override
    assert shown("\x7f\x9b") == "\\x7f\\x9b"  # DEL and the 8-bit CSI
    assert shown("a\U000e0001") == "a\\U000e0001"
    # An undecodable byte of a file name (kept by Python as a lone surrogate) comes back as
    # the byte, and the result can be printed.
    name = os.fsdecode(b"bad\xff.png")
    assert shown(name) == "bad\\xff.png" and shown(Path(name)) == "bad\\xff.png"
    shown(name).encode("utf-8")
    assert shown(b"raw\x1b") == "raw\\x1b"
    # Multi-line messages keep their line breaks on request, nothing else.
    assert shown("line 1\nline \x1b2", keep_newlines=True) == "line 1\nline \\x1b2"
    # Escaping twice changes nothing more.
    assert shown(shown("a\x1bb\n")) == shown("a\x1bb\n")
    assert shown(ValueError("bad\x07")) == "bad\\x07"
