"""The user's mistakes, told apart from the program's.

:class:`UserError` is raised where input a user gave is refused: a flag, a config field, an
engine setting, a sampling parameter, a checkpoint, tokenizer or GGUF file, a prompt too long for
the context. Its message names what is wrong and what to give instead. It subclasses
``ValueError``, so code that catches ``ValueError`` keeps working.

The command line prints a ``UserError`` as one ``minicpm: error: ...`` line and exits 2; any other
exception is a bug, printed with its traceback (exit 1).
"""

from __future__ import annotations


class UserError(ValueError):
    """Input a user gave is refused; the message says what and why."""


__all__ = ["UserError"]
