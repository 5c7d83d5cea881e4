"""AUTOMATIC1111's prompt editing, read the way A1111 reads it (modules/prompt_parser.py of A1111 1.7+), so that
a prompt written for it changes at the same steps:

- `[from:to:when]` is `from` until step `when`, then `to`; `[to:when]` adds `to` at `when`; `[from::when]` removes
  `from` at `when`. `when` with a decimal point is a fraction of the steps (`0.5`: half of them), without one a
  step number (`10`), both counted in the steps of the stage that runs them.
- `[a|b|c]` takes `a`, `b`, `c` in turn, one step each.
- They nest, and hold emphasis: `[(red:1.2) fox:dog:0.3]`; `[word]` (no `:` or `|`) stays A1111's emphasis, and
  `\\[` a literal bracket. A bracket that closes nothing is kept as text.

`schedule(text, steps)` is A1111's list of (last step, text) pairs, and `text_at` the text for a 0-based sampler
step: the first pair whose last step is at least the step, as A1111's `reconstruct_cond_batch` picks it."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"\\.|[\[\]():|]|[^\\\[\]():|]+", re.S)
_NUMBER = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$")


@dataclass
class Group:
    """A run of pieces (text, edits, alternations, brackets kept as text)."""

    pieces: list[object]


@dataclass
class Edit:
    before: Group
    after: Group
    when: str  # as written: "0.5" (a fraction) or "10" (a step)


@dataclass
class Alternate:
    options: list[Group]


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _TOKEN.findall(text)
        self.at = 0

    def group(self, stops: tuple[str, ...] = ()) -> Group:
        pieces: list[object] = []
        while self.at < len(self.tokens) and self.tokens[self.at] not in stops:
            token = self.tokens[self.at]
            if token == "[":
                pieces.append(self.square())
            elif token == "(":
                self.at += 1
                inner = self.group((")",))
                closed = self._take(")")
                pieces.extend(["(", inner, ")" if closed else ""])
            else:
                self.at += 1
                pieces.append(token)
        return Group(pieces)

    def _take(self, token: str) -> bool:
        if self.at < len(self.tokens) and self.tokens[self.at] == token:
            self.at += 1
            return True
        return False

    def square(self) -> object:
        """After `[`: an edit, an alternation, or emphasis (kept as brackets for the weights' parser)."""
        start = self.at
        self.at += 1
        parts = [self.group((":", "|", "]"))]
        separators = []
        while self.at < len(self.tokens) and self.tokens[self.at] in (":", "|"):
            separators.append(self.tokens[self.at])
            self.at += 1
            parts.append(self.group((":", "|", "]")))
        if not self._take("]"):
            self.at = start + 1  # never closed: the bracket is text (emphasis to the end, as A1111 reads it)
            return "["
        if separators and all(s == "|" for s in separators):
            return Alternate(parts)
        edit = self._edit(parts, separators)
        if edit is not None:
            return edit
        return Group(["[", *_joined(parts, separators), "]"])

    @staticmethod
    def _edit(parts: list[Group], separators: list[str]) -> Edit | None:
        if separators not in ([":"], [":", ":"]):
            return None
        when = "".join(p for p in parts[-1].pieces if isinstance(p, str))
        if len(parts[-1].pieces) > 1 or _NUMBER.match(when) is None:
            return None
        if len(parts) == 2:
            return Edit(Group([]), parts[0], when.strip())
        return Edit(parts[0], parts[1], when.strip())


def _joined(parts: list[Group], separators: list[str]) -> list[object]:
    out: list[object] = [parts[0]]
    for sep, part in zip(separators, parts[1:], strict=True):
        out.extend([sep, part])
    return out


def parse(text: str) -> Group:
    """The prompt as a tree of text, edits and alternations (a `)`, `:` or `|` at the top level is text)."""
    return _Parser(text).group()


def is_scheduled(text: str) -> bool:
    """Whether the prompt changes between steps (holds an edit or an alternation)."""
    return _changes(parse(text))


def _changes(node: object) -> bool:
    if isinstance(node, (Edit, Alternate)):
        return True
    return isinstance(node, Group) and any(_changes(piece) for piece in node.pieces)


def _step(when: str, steps: int) -> int:
    value = float(when)
    step = value * steps if "." in when else value
    return min(steps, int(step))


def _walk(node: object, steps: int, found: set[int]) -> None:
    if isinstance(node, Edit):
        at = _step(node.when, steps)
        if at >= 1:
            found.add(at)
        _walk(node.before, steps, found)
        _walk(node.after, steps, found)
    elif isinstance(node, Alternate):
        found.update(range(1, steps + 1))
        for option in node.options:
            _walk(option, steps, found)
    elif isinstance(node, Group):
        for piece in node.pieces:
            _walk(piece, steps, found)


def _render(node: object, step: int, steps: int) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, Edit):
        return _render(node.before if step <= _step(node.when, steps) else node.after, step, steps)
    if isinstance(node, Alternate):
        return _render(node.options[(step - 1) % len(node.options)], step, steps)
    if isinstance(node, Group):
        return "".join(_render(piece, step, steps) for piece in node.pieces)
    raise TypeError(f"not a prompt node: {node!r}")


def schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt schedule: (last step, text) pairs for a stage of `steps` sampler steps."""
    tree = parse(text)
    found = {steps}
    _walk(tree, steps, found)
    return [(end, _render(tree, end, steps)) for end in sorted(found)]


def text_at(pairs: list[tuple[int, str]], step: int) -> str:
    """The text at 0-based sampler step `step`."""
    return next((text for end, text in pairs if step <= end), pairs[-1][1])
