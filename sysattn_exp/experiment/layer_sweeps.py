"""Per-layer localisation (+sweep=layers, +sweep=windows): the rule in every window of
`sweep.window` consecutive decoder layers, window starts `sweep.stride` apart, on the
model's own depth.

Hydra's basic sweeper needs its values when the sweep starts, and the depth is the
model's. So the sweep files give `layers.start` as `${sysattn.window_starts:...}`, a
resolver (registered by the entry point) that reads the depth from the model's config
(load_config: config.json only, no weights, as a dry run does) and hands Hydra the range
of starts, `range(0, depth - window + 1, stride)`; `layers.end` follows each job's start
as `${sysattn.window_end:...}` (start + window). Every job is then an ordinary
layers.start/end job: its key, score cache and run name are those of the same range
given by hand (the sweep section is not in the job key: identity.NOT_IN_JOB_KEY). Where
`stride` does not divide `depth - window` (the last layers) or exceeds `window` (gaps),
some layers are in no window: the sweep names them when it starts.

A window larger than the model, or a window or stride that is not a whole number >= 1,
is refused as the sweep starts (UsageError: one line, exit status 2)."""

import logging

from sysattn_exp.errors import UsageError
from sysattn_exp.models.loading import load_config

log = logging.getLogger(__name__)
_WARNED: set[tuple[int, int, int]] = set()  # the starts are resolved twice as a sweep starts


def window_starts(depth: int, window: int, stride: int) -> list[int]:
    """The first layer of every window of `window` consecutive layers of a `depth`-layer
    decoder, `stride` apart from layer 0 (UsageError when the window exceeds the depth)."""
    for key, value in (("sweep.window", window), ("sweep.stride", stride)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{key}={value!r} must be a whole number >= 1")
    if window > depth:
        raise UsageError(
            f"sweep.window={window} is larger than the model's {depth} decoder layers; "
            f"allowed 1 to {depth}"
        )
    return list(range(0, depth - window + 1, stride))


def sweep_starts(model, window: int, stride: int) -> str:
    """`layers.start`'s values for Hydra's basic sweeper, as its range(start, stop, step)
    override text, from the depth in `model`'s config (the model section)."""
    depth = load_config(model).get_text_config().num_hidden_layers
    starts = window_starts(depth, window, stride)
    covered = {layer for start in starts for layer in range(start, start + window)}
    uncovered = sorted(set(range(depth)) - covered)
    if uncovered and (depth, window, stride) not in _WARNED:
        # a stride that does not divide depth - window, or one above the window
        _WARNED.add((depth, window, stride))
        log.warning(
            "sweep.window=%d sweep.stride=%d on %d decoder layers: layers %s are in no window",
            window,
            stride,
            depth,
            ", ".join(map(str, uncovered)),
        )
    return f"range(0,{starts[-1] + 1},{stride})"
