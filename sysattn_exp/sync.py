"""`python -m sysattn_exp.sync`: the command (its code: experiment/sync.py)."""

from sysattn_exp.experiment.sync import main

if __name__ == "__main__":
    main()
