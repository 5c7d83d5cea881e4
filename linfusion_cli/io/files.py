"""Reading the files users hand us without letting them hang, exhaust or crash the run.

Every file linfusion reads (prompt files, presets, sidecars, input images) goes through `read_regular` or
`open_regular`: a regular file only (a FIFO, a device such as /dev/zero, a folder is refused, never waited on),
opened non-blocking, and never more than a stated number of bytes. JSON and YAML are parsed so that a hostile
file fails with a message instead of a traceback: duplicate keys are refused, numbers too long to convert and
nesting too deep become errors, and YAML aliases may not expand past a small budget (a 330-byte "billion
laughs" file would otherwise become gigabytes). `quote` keeps any echoed value short in messages.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO, Any

from ..base.errors import LinFusionError, UsageError
from ..base.text import QUOTE_CHARS, quote

YAML_ALIAS_BUDGET = 10_000  # nodes that aliases may add to a document once expanded
_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str | None:
    return next((name for test, name in _FILE_KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a file")


def open_regular(path: str | Path, limit: int, what: str, error: type[LinFusionError] = UsageError) -> IO[bytes]:
    """Open a regular file for reading (symlinks to one are fine), refusing anything else or anything larger
    than `limit` bytes. Non-blocking open: a FIFO is refused at once instead of waiting for a writer."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"cannot read {what} {quote(str(path))}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        kind = _kind(info.st_mode)
        if kind is not None:
            raise error(f"{what} {quote(str(path))} is {kind}, not a regular file")
        if info.st_size > limit:
            raise error(f"{what} {quote(str(path))} is {_size(info.st_size)}; the limit is {_size(limit)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, limit: int, what: str, error: type[LinFusionError] = UsageError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (see `open_regular`); a file that grows past
    the limit while being read is refused too."""
    with open_regular(path, limit, what, error) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {quote(str(path))} is larger than {_size(limit)}")
    return data


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


# --- parsers --------------------------------------------------------------------------------------------------


class ParseError(ValueError):
    """A JSON or YAML document that cannot be used; the message is short and says why."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ParseError(f"the key {quote(key)} appears twice")
        out[key] = value
    return out


def load_json(text: str) -> Any:
    """json.loads that refuses duplicate keys, and turns over-long numbers and deep nesting into ParseError."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except ParseError:
        raise
    except json.JSONDecodeError as exc:
        raise ParseError(f"not valid JSON ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        raise ParseError("nested too deeply") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ParseError(f"a value cannot be read ({str(exc).split(';')[0][:QUOTE_CHARS]})") from None


def load_yaml(text: str) -> tuple[Any, Any]:
    """(data, root node) of a YAML document, safely constructed; the node carries line numbers.

    Refused with ParseError: invalid YAML (with its line), duplicate mapping keys, recursive aliases, aliases that
    would add more than YAML_ALIAS_BUDGET nodes once expanded, nesting too deep, numbers too long."""
    import yaml

    try:
        loader = yaml.SafeLoader(text)  # the reader refuses control characters here already
    except yaml.YAMLError as exc:
        raise ParseError(f"not valid YAML ({quote(getattr(exc, 'problem', None) or str(exc))})") from None
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_nodes(root)
        return loader.construct_document(root), root
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ParseError(f"{line}not valid YAML ({quote(getattr(exc, 'problem', None) or str(exc))})") from None
    except RecursionError:
        raise ParseError("nested too deeply") from None
    except ParseError:
        raise
    except (ValueError, OverflowError) as exc:
        raise ParseError(f"a value cannot be read ({str(exc).split(';')[0][:QUOTE_CHARS]})") from None
    finally:
        loader.dispose()


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_nodes(root: Any) -> None:
    """Expanded size of the node graph (aliases are shared nodes), without expanding it; duplicate keys."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ParseError(f"line {node.start_mark.line + 1}: an alias refers to itself")
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in seen:
                        raise ParseError(f"line {k.start_mark.line + 1}: the key {quote(k.value)} appears twice")
                    seen.add(k.value)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    if sizes[id(root)] - len(sizes) > YAML_ALIAS_BUDGET:
        raise ParseError(
            f"its aliases (*name) expand to {sizes[id(root)]:,} values from {len(sizes):,} written; "
            f"at most {YAML_ALIAS_BUDGET:,} more are allowed: write the values out"
        )
