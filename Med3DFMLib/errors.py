"""User-facing errors: one readable line, no traceback unless the user asks for one."""


class Med3DFMError(Exception):
    """An error caused by the user's input or environment (bad file, no memory, wrong model).

    The CLI prints `str(err)` as a single line and exits non-zero; anything else is a bug and
    keeps its traceback.
    """
