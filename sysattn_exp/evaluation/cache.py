"""Per-item scores on disk, written as they are computed, so that a killed job resumes
where it stopped and a finished one recomputes nothing.

One directory per condition (a hash of everything that determines the scores: model and
revision, dtype, batch size, scoring words, intervention and resolved layers, the
dataset's revision, the environment that computes them (torch and transformers versions,
device name, planned attention kernels: identity.condition) and the code: SCORES_VERSION
and scores_code_digest()) holds `condition.json` and append-only JSON-lines files, one
per writing process: each line is one scored batch, written whole and flushed to disk
before the next batch starts. Processes never write the same file, so concurrent jobs
cannot corrupt each other; a line cut short by a kill is ignored when read. Items are
keyed by benchmark, item id, the image's content (a hash of its bytes or pixels, so a
replaced picture is scored anew) and the exact prompt.

Why the code is in the key twice. A version number bumped by hand is forgotten as often
as not, and then stale scores are served silently. So the condition also holds a digest
of the code that computes scores (SCORING_MODULES), taken from each module's syntax tree
with docstrings removed and unparsed: a change to what the code does gives a new digest,
while comments, docstrings and formatting do not, so that editing documentation keeps
the cache (and the job keys, which include the condition) as they were. The digest is
the same in every process of one checkout and Python minor version. SCORES_VERSION
stays for what the digest cannot see: a change of meaning outside these modules (a
benchmark loader's question text is in the prompt and so in the item key already).
"""

import ast
import functools
import hashlib
import importlib.util
import json
import os
import socket
import uuid
from pathlib import Path

from sysattn_exp.files import write_json

# Bump whenever scores change for a reason outside SCORING_MODULES (see above).
SCORES_VERSION = (
    3  # 2: p_yes; questions without an image. 3: images.open_image (transparency on white)
)

# The modules whose code computes an item's scores from its prompt and image: loading
# (dtype, placement), the forward passes, the attention rules and kernels, the built-in
# models' construction, and this cache's own format.
SCORING_MODULES = (
    "sysattn_exp.evaluation.cache",
    "sysattn_exp.attention.fused",
    "sysattn_exp.evaluation.generation",
    "sysattn_exp.benchmarks.images",
    "sysattn_exp.attention.intervention",
    "sysattn_exp.attention.kernels",
    "sysattn_exp.attention.modality",
    "sysattn_exp.models.loading",
    "sysattn_exp.models.prompts",
    "sysattn_exp.models.random_weights",
    "sysattn_exp.attention.rules",
    "sysattn_exp.evaluation.scoring",
    "sysattn_exp.models.tiny",
    "sysattn_exp.models.toy_model",
)


@functools.cache
def scores_code_digest() -> str:
    """code_digest of SCORING_MODULES (once per process)."""
    return code_digest([module_source(name) for name in SCORING_MODULES])


def code_digest(sources: list[str]) -> str:
    """A digest of Python sources' code without docstrings, comments and formatting."""
    return digest([ast.unparse(without_docstrings(ast.parse(source))) for source in sources])


def module_source(name: str) -> str:
    """The source text of module `name` (read, not imported)."""
    return Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")


def without_docstrings(tree: ast.Module) -> ast.Module:
    """`tree` with the docstring of every module, class and function removed."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


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
        return self.read()[0]

    def read(self) -> tuple[dict[str, tuple[float, float, float]], dict[str, list[str]]]:
        """load's scores, and item key -> the attention paths (kernels.note_path names) that
        computed its batch: a rerun served from the cache reports the paths of the run that
        computed its scores (the fused path is chosen per call by shape, not planned)."""
        scores, paths = {}, {}
        for batch in self.batches():
            scores.update(zip(batch["keys"], batch["values"], strict=True))
            paths.update(dict.fromkeys(batch["keys"], batch["paths"]))
        return scores, paths

    def batches(self):
        """Each complete line of every file: keys, values (yes, no, p_yes) and paths."""
        for path in sorted(self.dir.glob("scores-*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    batch = json.loads(line)
                    values = list(zip(batch["yes"], batch["no"], batch["p_yes"], strict=True))
                    if len(values) != len(batch["keys"]):
                        raise ValueError
                    yield {"keys": batch["keys"], "values": values, "paths": batch["paths"]}
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # the torn last line of a killed writer

    def save(
        self,
        keys: list[str],
        yes: list[float],
        no: list[float],
        p_yes: list[float],
        paths=(),
    ) -> None:
        """One scored batch as one line; `paths`: the attention paths that computed it."""
        line = {"keys": keys, "yes": yes, "no": no, "p_yes": p_yes, "paths": sorted(paths)}
        with open(self.file, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
            out.flush()
            os.fsync(out.fileno())


def item_key(benchmark: str, item_id: str, image_digest: str | None, prompt: str) -> str:
    return digest([benchmark, item_id, image_digest, prompt])
