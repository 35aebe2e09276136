"""A job's benchmark as an MLflow dataset (mlflow.data), logged as its run's input with
context 'evaluation' (tracking.log_job): the runs table's Dataset column and filter then
name the benchmark, and the jobs of one benchmark configuration share one dataset (MLflow
stores a dataset once per experiment, name and digest) across runs and sweeps.

- name: the benchmark and what chooses its items and questions' wording: split, subsets,
  the prompt preset (a template given in place of the preset: 'template:<hash>'), the
  half of locate's split ('toy split=demo prompt=native');
- digest: a hash of the items table (predictions.parquet's item columns: the items, their
  groups, images, questions and labels; not the rendered prompts, which depend on the
  model, nor any score) and the dataset revision (benchmark.revision);
- source: where the items came from: the local file or folder (benchmark.path or
  data_dir; a caption job's caption.data_dir), the Hugging Face hub id with its split and
  revision, or, for the toy benchmark drawn in code, the module that draws it."""

import hashlib
import warnings
from pathlib import Path

import pandas as pd

from sysattn_exp.evaluation.cache import digest

CONTEXT = "evaluation"  # the input's mlflow.data.context tag
# predictions.parquet's columns that describe an item (yes/no jobs) or an image (captions).
ITEM_COLUMNS = ("item_id", "group_id", "image_id", "question", "label", "file_name")
DIGEST_CHARS = 16  # shown in the UI beside the name; MLflow allows up to 36
TOY_SOURCE = "sysattn_exp.benchmarks.toy"  # the toy benchmark's items are drawn in code


def items_table(job_dir: Path) -> pd.DataFrame:
    """The job's items: predictions.parquet's ITEM_COLUMNS, in its row order."""
    predictions = pd.read_parquet(job_dir / "predictions.parquet")
    return predictions[[c for c in ITEM_COLUMNS if c in predictions.columns]]


def items_digest(items: pd.DataFrame, revision) -> str:
    """DIGEST_CHARS hex digits of sha256 over the items' rows (pandas' row hashes) and
    the dataset revision."""
    rows = pd.util.hash_pandas_object(items, index=False).values
    rows_hash = hashlib.sha256(rows.tobytes()).hexdigest()
    return digest([list(items.columns), rows_hash, revision])[:DIGEST_CHARS]


def dataset_name(config: dict) -> str:
    """'<benchmark>[ split=..][ subsets=..][ prompt=..][ half=..]' from config.yaml."""
    benchmark = config["benchmark"]
    parts = [benchmark["name"]]
    for key in ("split", "subsets"):
        value = benchmark.get(key)
        if value is not None:
            parts.append(f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}")
    template = benchmark.get("template")
    if template is not None:
        parts.append(f"prompt=template:{digest(template)[:8]}")
    elif benchmark.get("prompt") is not None:
        parts.append(f"prompt={benchmark['prompt']}")
    if benchmark.get("split_half") is not None:
        parts.append(f"half={benchmark['split_half']}")
    return " ".join(parts)


def dataset_source(config: dict):
    """The mlflow.data source of the job's items (see the module's docstring)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    benchmark, caption = config["benchmark"], config.get("caption") or {}
    local = benchmark.get("path") or benchmark.get("data_dir") or caption.get("data_dir")
    if local:
        # MLflow registers its local file source class twice (resolving a path by the
        # registry warns that it is ambiguous): the first one, directly.
        found = (s for s in get_registered_sources() if s._get_source_type() == "local")
        return next(found)(str(Path(local).resolve()))
    if benchmark.get("hub_id"):
        split = benchmark.get("split")
        return HuggingFaceDatasetSource(
            path=benchmark["hub_id"],
            split=split if isinstance(split, str) else None,
            revision=benchmark.get("revision"),
        )
    return CodeDatasetSource(tags={"mlflow.source.name": TOY_SOURCE})


def benchmark_dataset(job_dir: Path, config: dict):
    """The job's benchmark as an mlflow.data PandasDataset (name, digest and source above;
    its schema and row count from the items table)."""
    import mlflow

    items = items_table(job_dir)
    with warnings.catch_warnings():
        # MLflow's hint that integer columns cannot hold missing values is about a model's
        # input schema; an items table is complete, and the hint would print on every job.
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        return mlflow.data.from_pandas(
            items,
            source=dataset_source(config),
            name=dataset_name(config),
            digest=items_digest(items, config["benchmark"].get("revision")),
        )
