"""The logit lens of the answer (nostalgebraist 2020, "interpreting GPT: the logit lens";
for the residual stream read through the final norm, as here, see also Belrose et al. 2023,
"Eliciting Latent Predictions from Transformers with the Tuned Lens", section 2): what the
model would answer if its last layers were skipped. After each decoder layer l, the
residual stream at the answer position is put through the model's own final norm and
output head (in float32, with Gemma 2's final soft-capping: scoring.answer_logits), and
read as the scoring reads the last layer: yes_logit - no_logit (log-sum-exp over the yes and
no words' first tokens) and P(yes) (the yes tokens' probability under the softmax over the
whole vocabulary). At the last layer this is the model's own score (the final norm's input
is the last layer's output). Where PAI's guidance is on, the lens reads the conditional
pass (with the image), before guidance.

Memory: only two numbers per item and layer are kept (the hidden states of a batch are
read and dropped)."""

import pandas as pd
import torch

from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.probe_plots import finish
from sysattn_exp.evaluation.scoring import answer_logits, answer_scores, final_norm, float32_module
from sysattn_exp.models.loading import LoadedModel

LENS_COLUMNS = ["item", "layer", "log_odds", "p_yes"]


class LogitLens:
    """Collects each scored item's per-layer readings (score_items(lens=...))."""

    def __init__(self, loaded: LoadedModel):
        self.loaded, self.norm = loaded, final_norm(loaded)
        if self.norm is None:
            raise UsageError(
                f"runtime.lens reads through the final norm, and {loaded.model.config.model_type}"
                "'s language model has none named `norm`"
            )
        self.readings: dict[int, torch.Tensor] = {}  # item index -> (L, 2)

    @torch.inference_mode()
    def record(self, items: list[int], states: torch.Tensor, yes_ids, no_ids) -> None:
        """states (L, B, H): each decoder layer's output at the answer position of the
        batch's rows, which are benchmark items `items`."""
        per_layer = []
        for layer_states in states:
            logits = answer_logits(self.loaded, float32_module(self.norm, layer_states))
            yes, no, p_yes = answer_scores(logits, yes_ids, no_ids)
            per_layer.append(torch.stack([yes - no, p_yes], dim=-1).cpu())
        readings = torch.stack(per_layer, dim=1)  # (B, L, 2)
        for row, item in enumerate(items):
            self.readings[item] = readings[row]

    def table(self) -> pd.DataFrame:
        """One row per item (its benchmark index) and decoder layer (0-based)."""
        frames = [
            pd.DataFrame(
                {
                    "item": item,
                    "layer": range(len(values)),
                    "log_odds": values[:, 0].double().numpy(),
                    "p_yes": values[:, 1].double().numpy(),
                }
            )
            for item, values in sorted(self.readings.items())
        ]
        return pd.concat(frames, ignore_index=True)[LENS_COLUMNS]


def lens_plot(table: pd.DataFrame, path, title: str):
    """Mean log-odds (yes_logit - no_logit) by decoder layer, for yes-label and no-label
    items apart (where the two curves part is where the model decides); with an
    intervention, its curves solid and the baseline's dashed. `table`: lens.parquet's
    columns (label, condition, layer, log_odds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = table.groupby(["condition", "label", "layer"])["log_odds"].mean()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {"baseline": "--", "intervention": "-"}
    both = table["condition"].nunique() > 1
    for (condition, label), curve in means.groupby(level=["condition", "label"]):
        layers = curve.index.get_level_values("layer")
        ax.plot(
            layers,
            curve.values,
            styles[condition] if both else "-",
            color="tab:green" if label else "tab:red",
            marker="o",
            markersize=3,
            label=f"{condition}, {'yes' if label else 'no'}-label items",
        )
    ax.axhline(0, color="grey", linewidth=0.8)
    return finish(plt, fig, ax, path, title, "mean yes_logit - no_logit")
