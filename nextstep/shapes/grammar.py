"""The two grammars of the shapes world: captions and edit instructions.

`Caption` and `Edit` each have a formatter (`str(...)`) and a strict parser
(`parse_caption`, `parse_instruction`) that raises `CaptionError` naming what it
could not read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NextStepError
from .world import BACKGROUNDS, COLOURS, DARK_SUFFIX, NUMBER_WORDS, RELATIONS, SHAPES


class CaptionError(NextStepError, ValueError):
    """A caption or edit instruction outside the shapes-world grammar."""


@dataclass(frozen=True)
class Phrase:
    """`[COLOUR] SHAPE`; colour None means any colour."""

    shape: str
    colour: str | None = None

    def words(self) -> str:
        return f"{self.colour} {self.shape}" if self.colour else self.shape

    def with_article(self) -> str:
        w = self.words()
        return ("an " if w.startswith("orange") else "a ") + w

    def matches(self, shape: str | None, colour: str | None) -> bool:
        return shape == self.shape and (self.colour is None or colour == self.colour)


@dataclass(frozen=True)
class Caption:
    """A parsed caption. form: "single" | "and" | "count" | "relation"; for "count", `objects`
    holds the same phrase N times."""

    form: str
    objects: tuple[Phrase, ...]
    relation: str | None = None
    background: str = "light"

    def __str__(self) -> str:
        objs = self.objects
        if self.form == "single":
            text = objs[0].with_article()
        elif self.form == "and":
            text = f"{objs[0].with_article()} and {objs[1].with_article()}"
        elif self.form == "count":
            text = f"{NUMBER_WORDS[len(objs)]} {objs[0].words()}s"
        elif self.form == "relation":
            text = f"{objs[0].with_article()} {self.relation} {objs[1].with_article()}"
        else:
            raise ValueError(f"unknown caption form {self.form!r}")
        return text + (DARK_SUFFIX if self.background == "dark" else "")


@dataclass(frozen=True)
class Edit:
    """A parsed edit instruction. `phrase` is the object referred to (recolour, remove) or added
    (add); `colour` the new colour of a recolour; `background` the new background."""

    op: str
    phrase: Phrase | None = None
    colour: str | None = None
    background: str | None = None

    def __str__(self) -> str:
        if self.op == "recolour":
            return f"make the {self.phrase.words()} {self.colour}"
        if self.op == "add":
            return f"add {self.phrase.with_article()}"
        if self.op == "remove":
            return f"remove the {self.phrase.words()}"
        if self.op == "background":
            return f"change the background to {self.background}"
        raise ValueError(f"unknown edit op {self.op!r}")


class _Words:
    """A cursor over the words of a caption, with errors that say where parsing stopped."""

    def __init__(self, text: str, what: str) -> None:
        self.text, self.what = text, what
        self.words = text.split(" ")
        self.i = 0

    def fail(self, expected: str) -> CaptionError:
        got = f"{self.words[self.i]!r} (word {self.i + 1})" if self.i < len(self.words) else "the end"
        return CaptionError(f"cannot parse {self.what} {self.text!r}: expected {expected}, got {got}")

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, *allowed: str) -> str:
        w = self.peek()
        if w is None or w not in allowed:
            raise self.fail(" or ".join(repr(a) for a in allowed))
        self.i += 1
        return w

    def end(self) -> None:
        if self.i != len(self.words):
            raise self.fail("the end of the " + self.what)

    def colour(self) -> str | None:
        if self.peek() in COLOURS:
            self.i += 1
            return self.words[self.i - 1]
        return None

    def shape(self, plural: bool = False, after_colour_slot: bool = False) -> str:
        names = [s + "s" for s in SHAPES] if plural else list(SHAPES)
        w = self.peek()
        if w not in names:
            what = "a shape (" + ", ".join(names) + ")"
            raise self.fail(("a colour or " if after_colour_slot else "") + what)
        self.i += 1
        return w[:-1] if plural else w

    def phrase(self, article: bool) -> Phrase:
        if article:
            a = self.take("a", "an")
            if (a == "an") != (self.peek() == "orange"):
                raise CaptionError(f"cannot parse {self.what} {self.text!r}: use 'an' before 'orange' "
                                   f"and 'a' before any other word (word {self.i})")
        colour = self.colour()
        return Phrase(self.shape(after_colour_slot=colour is None), colour)


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise CaptionError(f"a {what} must be a string, got {type(text).__name__}")
    t = text.strip()
    if not t:
        raise CaptionError(f"the {what} is empty")
    if t != t.lower():
        raise CaptionError(f"cannot parse {what} {text!r}: the grammar is lower case")
    if " ".join(t.split()) != t:
        raise CaptionError(f"cannot parse {what} {text!r}: words must be separated by single spaces")
    return t


def parse_caption(text: str) -> Caption:
    """Parse a caption of the shapes-world grammar; `CaptionError` says where it does not fit."""
    t = _clean(text, "caption")
    background = "light"
    if t.endswith(DARK_SUFFIX):
        background, t = "dark", t[: -len(DARK_SUFFIX)]
    w = _Words(t, "caption")
    w.text = text.strip()
    first = w.peek()
    counts = {v: k for k, v in NUMBER_WORDS.items()}
    if first in counts:
        w.take(first)
        colour = w.colour()
        shape = w.shape(plural=True, after_colour_slot=colour is None)
        w.end()
        return Caption("count", (Phrase(shape, colour),) * counts[first], None, background)
    a = w.phrase(article=True)
    if w.peek() is None:
        return Caption("single", (a,), None, background)
    if w.peek() == "and":
        w.take("and")
        b = w.phrase(article=True)
        w.end()
        return Caption("and", (a, b), None, background)
    for rel in RELATIONS:
        n = len(rel.split(" "))
        if " ".join(w.words[w.i:w.i + n]) == rel:
            w.i += n
            b = w.phrase(article=True)
            w.end()
            return Caption("relation", (a, b), rel, background)
    raise w.fail("'and', a relation (" + ", ".join(RELATIONS) + ") or the end"
                 + ("" if "background" not in t else "; a background clause must read ' on a dark background'"))


def parse_instruction(text: str) -> Edit:
    """Parse an edit instruction; `CaptionError` says where it does not fit."""
    t = _clean(text, "instruction")
    w = _Words(t, "instruction")
    op = w.take("make", "add", "remove", "change")
    if op == "make":
        w.take("the")
        # `make the [COLOUR] SHAPE COLOUR`: the colour before the shape is optional.
        colour = w.colour()
        shape = w.shape(after_colour_slot=colour is None)
        new = w.take(*COLOURS)
        w.end()
        return Edit("recolour", Phrase(shape, colour), colour=new)
    if op == "add":
        p = w.phrase(article=True)
        w.end()
        return Edit("add", p)
    if op == "remove":
        w.take("the")
        colour = w.colour()
        p = Phrase(w.shape(after_colour_slot=colour is None), colour)
        w.end()
        return Edit("remove", p)
    for word in ("the", "background", "to"):
        w.take(word)
    bg = w.take(*BACKGROUNDS)
    w.end()
    return Edit("background", background=bg)
