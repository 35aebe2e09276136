"""Hand checks of the scoring and runtime keys a job reads (UsageError: one line naming the
key and what is allowed), run before the model loads. Kept together, as they are, until a
config schema checks these keys."""

from sysattn_exp.errors import UsageError

SCORING_MODES = ("logit", "generate")


def scoring_mode(scoring) -> str:
    mode = scoring.get("mode", "logit")
    if mode not in SCORING_MODES:
        raise UsageError(f"scoring.mode={mode!r} is unknown; allowed: {', '.join(SCORING_MODES)}")
    return mode


def max_new_tokens(scoring) -> int:
    value = scoring.get("max_new_tokens", 8)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"scoring.max_new_tokens={value!r} must be a whole number >= 1")
    return value


def parser_name(scoring) -> str:
    """scoring.parser: how generated answers are read (native: each benchmark's own rule;
    mme: MME's eval tool rule for all)."""
    return scoring.get("parser", "native")


def runtime_number(cfg, key: str, default: float, minimum: float = 0.0) -> float:
    value = cfg.runtime.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise UsageError(f"runtime.{key}={value!r} must be a number >= {minimum:g}")
    return value


def progress_seconds(cfg) -> float:
    """runtime.progress_seconds: interval of the progress lines logged without a terminal."""
    return runtime_number(cfg, "progress_seconds", 60.0)


def sharing_settings(cfg) -> dict:
    """How concurrent jobs share the baseline (shared_baseline.SharedBaseline)."""
    batch_size = cfg.model.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"model.batch_size={batch_size!r} must be a whole number >= 1")
    return {
        "batch_size": cfg.model.batch_size,
        "part_items": int(runtime_number(cfg, "baseline_part_items", 256, minimum=1)),
        "lease_seconds": runtime_number(cfg, "lease_seconds", 300.0, minimum=0.001),
        "progress_seconds": progress_seconds(cfg),
    }
