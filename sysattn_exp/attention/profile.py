"""Where attention goes: per decoder layer, the mean share of attention that the answer
position (and every text query) gives to system, image and text keys, averaged over heads
and items. Collected from the fused path's per-modality masses (no attention matrix),
after the job's intervention if it has one."""

from pathlib import Path

import pandas as pd
import torch

from sysattn_exp.attention.modality import MODALITIES, TEXT, answer_rows

QUERIES = ("answer", "text_rows")


class AttentionProfile:
    def __init__(self):
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.counts: dict[tuple[int, str], int] = {}

    def record(self, layer: int, shares: dict, key_modality, rows: slice, q_len: int) -> None:
        """shares: modality -> (B, H, len(rows)) share of each query row's attention."""
        k_len = key_modality.shape[1]
        per_row = torch.stack([shares[m] for m in MODALITIES], dim=-1).float().mean(dim=1)
        query_modality = key_modality[:, k_len - q_len :][:, rows]
        masks = {
            "answer": answer_rows(key_modality, q_len)[:, rows],
            "text_rows": query_modality == TEXT,
        }
        for kind, mask in masks.items():
            if mask.any():
                key = (layer, kind)
                self.sums[key] = self.sums.get(key, 0) + per_row[mask].sum(dim=0).cpu().double()
                self.counts[key] = self.counts.get(key, 0) + int(mask.sum())

    def table(self) -> pd.DataFrame:
        """One row per (layer, queries): the mean share of each modality (rows sum to 1)."""
        rows = [
            {"layer": layer, "queries": kind, "n_queries": self.counts[(layer, kind)]}
            | dict(
                zip(
                    MODALITIES,
                    (self.sums[(layer, kind)] / self.counts[(layer, kind)]).tolist(),
                    strict=True,
                )
            )
            for layer, kind in sorted(self.sums)
        ]
        return pd.DataFrame(rows, columns=["layer", "queries", "n_queries", *MODALITIES])


def heatmap(table: pd.DataFrame, path: Path, title: str) -> Path:
    """layer x modality, colour = share of the answer position's attention."""
    import matplotlib

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
