"""Save the builtin tiny LLaVA as a checkpoint directory, to try `model.name_or_path=DIR`
(the same loading path as a real hub model) without any download.

    python scripts/save_tiny_checkpoint.py outputs/tiny-ckpt
    python -m sysattn_exp model.name_or_path=outputs/tiny-ckpt
"""

import argparse

from sysattn_exp.models.tiny import build_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, processor = build_tiny_llava(seed=args.seed)
    model.save_pretrained(args.out_dir)
    processor.save_pretrained(args.out_dir)
    print(f"saved to {args.out_dir}")


if __name__ == "__main__":
    main()
