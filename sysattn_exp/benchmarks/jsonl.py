"""The user's own paired yes/no data: one JSON record a line,
{"id", "group", "image", "question", "answer"}, `image` relative to the file (a record
without one is a text-only question, as for a text-only LM), answer yes|no."""

from pathlib import Path

from sysattn_exp.benchmarks.base import (
    Benchmark,
    Item,
    check_template,
    json_lines,
    open_image_file,
)
from sysattn_exp.errors import UsageError

FIELDS = ("id", "group", "image", "question", "answer")
REQUIRED = ("id", "group", "question", "answer")


def parse_record(record, where: str, root: Path) -> Item:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: must be a JSON object with fields {', '.join(FIELDS)}")
    missing = [f for f in REQUIRED if record.get(f) in (None, "")]
    if missing:
        raise UsageError(
            f"{where}: missing field {missing[0]!r} (required: {', '.join(REQUIRED)}; "
            "optional: image)"
        )
    answer = str(record["answer"]).strip().lower()
    if answer not in ("yes", "no"):
        raise UsageError(f"{where}: answer {record['answer']!r} must be yes or no")
    return Item(
        item_id=str(record["id"]),
        group_id=str(record["group"]),
        image_id=str(root / str(record["image"])) if record.get("image") else None,
        question=str(record["question"]),
        label=answer == "yes",
    )


def read_items(path: Path) -> list[Item]:
    items, seen = [], set()
    for number, record in json_lines(path):
        item = parse_record(record, f"{path} line {number}", path.parent)
        if item.item_id in seen:
            raise UsageError(f"{path} line {number}: id {item.item_id!r} appears twice")
        seen.add(item.item_id)
        items.append(item)
    if not items:
        raise UsageError(f"benchmark.path={path} holds no records")
    return items


def load(cfg) -> Benchmark:
    if not cfg.get("path"):
        raise UsageError("benchmark.path is required for benchmark=jsonl: a .jsonl file of records")
    path = Path(cfg.path)
    if not path.is_file():
        raise UsageError(f"benchmark.path={path} is not a file")
    # The groups are the user's: no structure is assumed beyond "all right to count".
    return Benchmark("jsonl", read_items(path), check_template(cfg.template), open_image_file)
