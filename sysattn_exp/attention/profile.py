"""Where attention goes: per decoder layer and query head, the mean share of attention that
the answer position (and every text query) gives to system, image and text keys, and to the
first position alone (`bos`), averaged over items. Collected from the fused path's
per-modality masses (no attention matrix), after the job's intervention if it has one.

The first real position of a sequence (BOS, or whatever token opens the prompt) is the
classic attention sink: a key that many heads attend to heavily whatever its content
(Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453). It is part of the system span; its own column tells a BOS sink from
attention to the system prompt. With grouped-query attention, query head h reads KV head
h // (n_heads / n_kv_heads), as transformers' repeat_kv lays them out (`kv_head`).

Two tables: per (layer, head) (`head_table`: attention_profile_heads.csv, the "sink
atlas") and per layer (`table`: attention_profile.csv), the mean of the first over heads.
`top_heads` reads a per-head file back: the heads with the highest share.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sysattn_exp.attention.modality import (
    FIRST_KEY,
    MODALITIES,
    TEXT,
    answer_rows,
    first_real_key,
)
from sysattn_exp.errors import UsageError, first_line

if TYPE_CHECKING:  # pandas is imported where a table is made: scripts/device_check.py
    import pandas as pd  # imports the attention layer on a bare GPU image without it

QUERIES = ("answer", "text_rows")
SHARES = (*MODALITIES, FIRST_KEY)
HEAD_COLUMNS = ["layer", "head", "kv_head", "queries", "n_queries", *SHARES]
TOP_HEADS_BY = ("system", FIRST_KEY)  # what top_heads ranks heads by


class AttentionProfile:
    """Sums, per (layer, queries), of every query head's shares (H, len(SHARES)), and the
    number of query rows summed. Given to the model as `attention_profile`; the attention
    function binds it to each call's keys (for_call)."""

    def __init__(self):
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.counts: dict[tuple[int, str], int] = {}
        self.kv_heads: dict[int, int] = {}

    def for_call(self, key_modality: torch.Tensor, key: torch.Tensor) -> "CallProfile":
        """This profile bound to one attention call: key_modality (B, N) over the whole
        sequence, key (B, KV, K, D) with K <= N (a sliding-window layer's cache keeps only
        the last K keys, which may no longer hold the first position)."""
        first = first_real_key(key_modality)[:, key_modality.shape[1] - key.shape[2] :]
        return CallProfile(self, first, key.shape[1])

    def record(
        self, layer: int, shares: dict, key_modality, rows: slice, q_len: int, kv_heads: int
    ) -> None:
        """shares: SHARES name -> (B, H, len(rows)) share of each query row's attention."""
        k_len = key_modality.shape[1]
        per_row = torch.stack([shares[m] for m in SHARES], dim=-1).float().transpose(1, 2)
        query_modality = key_modality[:, k_len - q_len :][:, rows]
        masks = {
            "answer": answer_rows(key_modality, q_len)[:, rows],
            "text_rows": query_modality == TEXT,
        }
        self.kv_heads[layer] = kv_heads
        for kind, mask in masks.items():
            if mask.any():
                key = (layer, kind)
                # per_row[mask]: (rows, H, shares)
                self.sums[key] = self.sums.get(key, 0) + per_row[mask].sum(dim=0).cpu().double()
                self.counts[key] = self.counts.get(key, 0) + int(mask.sum())

    def head_table(self) -> "pd.DataFrame":
        """One row per (layer, queries, head): each share's mean over the query rows
        (HEAD_COLUMNS; system + image + text sum to 1, less a learned sink's mass)."""
        import pandas as pd

        rows = []
        for layer, kind in sorted(self.sums):
            means = (self.sums[(layer, kind)] / self.counts[(layer, kind)]).tolist()
            group = len(means) // self.kv_heads[layer]
            for head, values in enumerate(means):
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "kv_head": head // group,
                        "queries": kind,
                        "n_queries": self.counts[(layer, kind)],
                    }
                    | dict(zip(SHARES, values, strict=True))
                )
        return pd.DataFrame(rows, columns=HEAD_COLUMNS)

    def table(self) -> "pd.DataFrame":
        """One row per (layer, queries): the mean over heads of head_table's shares."""
        heads = self.head_table()
        table = heads.groupby(["layer", "queries", "n_queries"], sort=True)[list(SHARES)].mean()
        return table.reset_index()[["layer", "queries", "n_queries", *SHARES]]


@dataclass
class CallProfile:
    """An AttentionProfile bound to one attention call: first_key (B, K) marks each
    sequence's first real position among the call's keys (none where a sliding window
    dropped it); kv_heads is the call's number of KV heads."""

    profile: AttentionProfile
    first_key: torch.Tensor
    kv_heads: int

    def record(self, layer: int, shares: dict, key_modality, rows: slice, q_len: int) -> None:
        self.profile.record(layer, shares, key_modality, rows, q_len, self.kv_heads)


def top_heads(
    path: Path | str, k: int, by: str = "system", layers: list[int] | None = None
) -> list[tuple[int, int]]:
    """The `k` (layer, head) pairs of `layers` (None: every layer) whose answer position
    gives the highest mean share to `by` (system: the whole system span; bos: the first
    position, the attention sink of Xiao et al. 2023), highest first (ties: lower layer,
    then lower head), from a per-head profile (attention_profile_heads.csv of a
    +task=profile job). Raises UsageError (one line naming the file) when the file has no
    per-head rows or k is not in 1..#heads (of those layers)."""
    import pandas as pd

    path = Path(path)
    if by not in TOP_HEADS_BY:
        raise UsageError(f"top heads by={by!r} is unknown; allowed: {', '.join(TOP_HEADS_BY)}")
    try:
        table = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UsageError(f"{path}: cannot read a per-head profile ({first_line(e)})") from None
    needed = ["layer", "head", "queries", by]
    if any(c not in table.columns for c in needed) or not (table["queries"] == "answer").any():
        raise UsageError(
            f"{path} has no per-head profile rows (columns {', '.join(needed)} with queries "
            "'answer'); give the attention_profile_heads.csv of a +task=profile job"
        )
    answer = table[table["queries"] == "answer"]
    where = ""
    if layers is not None:
        answer = answer[answer["layer"].isin(layers)]
        where = f" of layers {min(layers)}-{max(layers)}"
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(answer):
        raise UsageError(
            f"top_k={k!r} must be an integer in 1..{len(answer)}, the heads{where} in {path}"
        )
    ranked = answer.sort_values([by, "layer", "head"], ascending=[False, True, True], kind="stable")
    return [(int(r.layer), int(r.head)) for r in ranked.head(k).itertuples(index=False)]


def heatmap(table: "pd.DataFrame", path: Path, title: str) -> Path:
    """layer x modality, colour = share of the answer position's attention."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    answer = table[table["queries"] == "answer"].set_index("layer")[list(MODALITIES)]
    fig, ax = plt.subplots(figsize=(4.5, 1.5 + 0.28 * len(answer)))
    image = ax.imshow(answer.values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(MODALITIES)), list(MODALITIES))
    ax.set_yticks(range(len(answer)), answer.index)
    ax.set_ylabel("decoder layer")
    for (i, j), value in pd.DataFrame(answer.values).stack().items():
        ax.text(
            j,
            i,
            f"{value:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if value < 0.6 else "black",
        )
    fig.colorbar(image, ax=ax, label="share of attention")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def atlas(heads: "pd.DataFrame", path: Path, title: str) -> Path:
    """The sink atlas: one panel per share (system, image, text, bos), each a layer x
    head image of the answer position's mean share (head_table's 'answer' rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    answer = heads[heads["queries"] == "answer"]
    grids = {name: answer.pivot(index="layer", columns="head", values=name) for name in SHARES}
    n_layers, n_heads = grids["system"].shape
    width = max(2.2, 0.22 * n_heads + 1.2)
    fig, axes = plt.subplots(
        1,
        len(SHARES),
        figsize=(width * len(SHARES) + 1.0, 1.8 + 0.22 * n_layers),
        squeeze=False,
        layout="constrained",
    )
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        image = ax.imshow(grid.values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        step = max(1, n_heads // 8)
        ax.set_xticks(range(0, n_heads, step), grid.columns[::step])
        ax.set_yticks(range(n_layers), grid.index)
    axes[0][0].set_ylabel("decoder layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of attention")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
