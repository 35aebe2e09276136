"""MME's rule for reading yes / no from a generated answer: the default parser of every
benchmark without one of its own. A module of its own, free of pandas and omegaconf, so that
generation (and scripts/device_check.py) can use it without the benchmarks package."""


def mme_answer(text: str) -> str:
    """ "yes", "no" or "unknown", as the MME benchmark's eval tool parses a generated answer
    (eval_tool/calculation.py, parse_pred_ans: exactly yes/no; else "yes" within the first
    4 characters -> yes, else "no" within them -> no, else "other"), after the
    normalisation lmms-eval applies before it (tasks/mme/utils.py: lowercase, strip,
    periods removed). "unknown" is our name for MME's "other": neither answer, counted
    wrong. The parser of every benchmark without one of its own (scoring.parser=mme: of
    all)."""
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    if "yes" in answer[:4]:
        return "yes"
    if "no" in answer[:4]:
        return "no"
    return "unknown"
