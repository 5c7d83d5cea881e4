"""The Python API's names for what the command line calls flags: its errors name the argument (`base_size`),
not the flag (`--base-size`), and its docstrings list every setting, written from the settings table."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from ..base.errors import UsageError
from .settings import FLAGS, table

# Run options whose Python name is not the flag's: `--timeout` is `timeout_s=`.
ARGUMENT_OF_FLAG = {"timeout": "timeout_s", "json": "json", "gpus": "gpus"}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


def as_arguments(text: str) -> str:
    """A message or a help text written for the command line, for a Python caller: `--base-size 4096` reads
    `base_size 4096`, "command line: unknown field 'x'" reads "unknown argument 'x'"."""
    text = text.replace(f"{FLAGS}: unknown field", "unknown argument").replace("\\[", "[")

    def name(match: re.Match[str]) -> str:
        flag = match.group(1)
        return ARGUMENT_OF_FLAG.get(flag, flag.replace("-", "_"))

    return _FLAG.sub(name, text)


@contextlib.contextmanager
def python_names(enabled: bool = True) -> Iterator[None]:
    """Inside the block, a UsageError's message names Python arguments instead of flags."""
    try:
        yield
    except UsageError as exc:
        if enabled and exc.args:
            exc.args = (as_arguments(str(exc.args[0])), *exc.args[1:])
        raise


TYPE_NAMES = {
    "str": "str",
    "int": "int",
    "px": "int or text like '8k'",
    "float": "float",
    "bool": "bool",
    "floats": "list of floats",
    "refs": "list of 'SOURCE[:SCALE]'",
    "texts": "list of str",
}


def settings_doc(indent: str = "    ") -> str:
    """Every setting a call takes as a keyword argument: its name, type and help, as the flags' help says it."""
    lines = []
    for name, setting in table().items():
        if not setting.help:
            continue
        help_text = as_arguments(setting.help() if callable(setting.help) else setting.help)
        lines.append(f"{indent}{name} ({TYPE_NAMES[setting.kind]}): {help_text}")
    return "\n".join(lines)
