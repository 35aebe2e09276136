"""Writing files so that a killed process never leaves a partial one behind."""

import json
import os
import uuid
from pathlib import Path


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` to a temporary name unique to this call, then rename it to `path`
    (atomic on one file system, so concurrent writers never interleave)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, value: dict) -> None:
    write_atomically(path, lambda p: p.write_text(json.dumps(value, indent=2) + "\n"))
