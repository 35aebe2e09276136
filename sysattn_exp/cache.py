"""Per-item scores on disk, written as they are computed, so that a killed job resumes
where it stopped and a finished one recomputes nothing.

One directory per condition (a hash of everything that determines the scores: model and
revision, dtype, scoring words, intervention and resolved layers, the dataset's revision
and SCORES_VERSION) holds `condition.json` and append-only JSON-lines files, one per
writing process: each line is one scored batch, written whole and flushed to disk before
the next batch starts. Processes never write the same file, so concurrent jobs cannot
corrupt each other; a line cut short by a kill is ignored when read. Items are keyed by
benchmark, item id, the image's content (a hash of its bytes or pixels, so a replaced
picture is scored anew) and the exact prompt.
"""

import hashlib
import json
import os
import socket
import uuid
from pathlib import Path

from sysattn_exp.files import write_json

# Bump whenever the scoring code changes what it computes for the same inputs (a new
# column, another formula, a fixed bug): older cached scores are then never served.
SCORES_VERSION = (
    3  # 2: p_yes; questions without an image. 3: images.open_image (transparency on white)
)


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


class ScoreCache:
    def __init__(self, root: Path, condition: dict):
        self.dir = Path(root) / digest(condition)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "condition.json").exists():
            write_json(self.dir / "condition.json", condition)
        self.file = (
            self.dir / f"scores-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        )

    def load(self) -> dict[str, tuple[float, float, float]]:
        """item key -> (yes_logit, no_logit, p_yes), from every complete line of every file."""
        scores = {}
        for path in sorted(self.dir.glob("scores-*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    batch = json.loads(line)
                    values = zip(batch["yes"], batch["no"], batch["p_yes"], strict=True)
                    scores.update(zip(batch["keys"], values, strict=True))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # the torn last line of a killed writer
        return scores

    def save(self, keys: list[str], yes: list[float], no: list[float], p_yes: list[float]) -> None:
        line = json.dumps({"keys": keys, "yes": yes, "no": no, "p_yes": p_yes}) + "\n"
        with open(self.file, "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())


def item_key(benchmark: str, item_id: str, image_digest: str | None, prompt: str) -> str:
    return digest([benchmark, item_id, image_digest, prompt])
