"""`python -m sysattn_exp.report`: the command (its code: experiment/report.py)."""

from sysattn_exp.experiment.report import main

if __name__ == "__main__":
    main()
