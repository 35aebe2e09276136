"""Train the toy LLaVA (sysattn_exp/models/toy_model.py) and write its weights.

    python scripts/train_toy.py                      # -> sysattn_exp/models/toy_weights.safetensors
    python scripts/train_toy.py --out w.safetensors --seed 1

Deterministic from --seed: it runs on one CPU thread (about 4 minutes on the project's
2-core CPU) and prints the weights' sha256 digest.
"""

import argparse
import time
import warnings

import torch
from safetensors.torch import save_file

from sysattn_exp.models import toy_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(toy_model.WEIGHTS))
    for key, value in toy_model.DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*image_hidden_states.*")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    options = {key: getattr(args, key) for key in toy_model.DEFAULTS}
    model, _ = toy_model.train(
        **options, log=lambda line: print(f"{time.time() - start:5.0f}s {line}", flush=True)
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out)
    seconds = time.time() - start
    print(f"wrote {args.out} in {seconds:.0f}s; sha256 of the weights {toy_model.digest(model)}")


if __name__ == "__main__":
    main()
