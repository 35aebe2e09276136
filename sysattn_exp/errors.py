"""The one exception type that means "the user's input is wrong" (exit status 2)."""


class UsageError(Exception):
    """Bad configuration or data. The message is one line naming the key or file and
    what is allowed; the entry point prints it without a traceback and exits with 2."""


def one_line(error: Exception) -> str:
    """An exception's whole message on one line, without the config search path Hydra
    appends to its composition errors."""
    text = str(error).split("Config search path")[0]
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def first_line(error: Exception) -> str:
    """An exception's message in one line (its type's name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def usage_error_in(error: BaseException) -> UsageError | None:
    """The UsageError `error` is or was raised from (its __cause__ / __context__ chain):
    Hydra and OmegaConf wrap what a resolver raises in their own exceptions."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UsageError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
