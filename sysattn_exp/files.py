"""Writing files so that a killed process never leaves a partial one behind, and reading
text files as people save them."""

import codecs
import json
import os
import uuid
from pathlib import Path

from sysattn_exp.errors import UsageError


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` to a temporary name unique to this call, then rename it to `path`
    (atomic on one file system, so concurrent writers never interleave)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, value: dict) -> None:
    write_atomically(path, lambda p: p.write_text(json.dumps(value, indent=2) + "\n"))


def read_text(path) -> str:
    """A text file as people save it: UTF-8 with or without a byte-order mark (or UTF-16
    with one, as spreadsheets export "Unicode text"), lines ended by LF, CRLF or CR, all
    returned as "\\n". `path`: a Path or an importlib.resources Traversable. A file that is
    not text in these encodings is a UsageError naming it."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")
