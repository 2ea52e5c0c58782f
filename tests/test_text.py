"""iet_jax.conventions.text: outside text quoted safely in messages (`shown`, `printable`)."""

import os
from pathlib import Path

from iet_jax.conventions.text import printable, shown


def test_escapes_control_and_invisible_characters():
    fake = "x\x1b[32mwrote out.png\x1b[0m\r\n\u202etxt.exe\udcff\x7f"
    got = printable(fake)
    assert got == "x\\x1b[32mwrote out.png\\x1b[0m\\r\\n\\u202etxt.exe\\xff\\x7f"  # an undecodable file-name byte: \\xNN
    assert got.isprintable()


def test_keeps_printable_text_and_backslashes():
    assert printable("Ünïcode naïve 写真 C:\\data\\x.png") == "Ünïcode naïve 写真 C:\\data\\x.png"


def test_cuts_long_text_saying_how_much():
    assert printable("a" * 250) == "a" * 200 + "... (50 more characters)"
    assert printable("\x1b" * 10, limit=9) == "\\x1b\\x1b... (8 more characters)"
    assert printable("short", limit=5) == "short"
    huge = "y" * 50_000_000  # a 50 MB name costs no more than its first characters
    assert len(printable(huge)) < 250


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
