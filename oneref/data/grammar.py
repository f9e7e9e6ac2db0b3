"""The RefShapes expression grammar: build, evaluate and word-position an expression.

Three categories, each resolved against the scene by :func:`resolve` (an expression is kept
only when it picks out exactly one shape and no spatial comparison is borderline):

- ``attribute``:   "the [size] [colour] kind|shape"            e.g. "the small blue circle"
- ``superlative``: "the largest|smallest|leftmost|rightmost|topmost|bottommost [colour]
  kind|shape"                                                  e.g. "the largest green shape"
- ``relation``:    "the <desc> left of|right of|above|below the <desc>"
  where the first description alone matches several shapes     e.g. "the square left of the
  red triangle"

The subject word is the head noun (kind or "shape") of the referent's phrase; the object
word is the head noun of the related shape's phrase (relations only).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from oneref.data.shapes import COLOURS, KINDS, SIZE_ORDER, Shape

__all__ = ["Desc", "Expression", "CATEGORIES", "RELATIONS", "SUPERLATIVES", "VOCABULARY",
           "resolve", "make_expression", "COLOUR_WORDS"]

CATEGORIES = ("attribute", "superlative", "relation")
RELATIONS = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}
SUPERLATIVES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")
COLOUR_WORDS = tuple(COLOURS)
VOCABULARY = tuple(sorted(
    {"the", "shape", "left", "right", "of", "above", "below"}
    | set(SIZE_ORDER) | set(COLOURS) | set(KINDS) | set(SUPERLATIVES)))


@dataclass(frozen=True)
class Desc:
    """A noun phrase: optional superlative, size, colour; kind None means "shape"."""

    size: str | None = None
    colour: str | None = None
    kind: str | None = None
    superlative: str | None = None

    def words(self) -> list[str]:
        out = ["the"]
        for word in (self.superlative, self.size, self.colour):
            if word is not None:
                out.append(word)
        out.append(self.kind or "shape")
        return out

    def matches(self, shape: Shape) -> bool:
        return ((self.size is None or shape.size == self.size)
                and (self.colour is None or shape.colour == self.colour)
                and (self.kind is None or shape.kind == self.kind))


@dataclass(frozen=True)
class Expression:
    """A referring expression; ``relation``/``obj`` are set for the relation category."""

    category: str
    target: Desc
    relation: str | None = None
    obj: Desc | None = None

    def words(self) -> list[str]:
        words = self.target.words()
        if self.relation is not None:
            words += self.relation.split() + self.obj.words()
        return words

    @property
    def text(self) -> str:
        return " ".join(self.words())

    @property
    def subject_word(self) -> int:
        """Index (in :meth:`words`) of the referent's head noun."""
        return len(self.target.words()) - 1

    @property
    def object_word(self) -> int:
        """Index of the related shape's head noun, -1 when there is none."""
        return len(self.words()) - 1 if self.relation is not None else -1

    def colour_mentions(self) -> list[str]:
        return [w for w in self.words() if w in COLOURS]


def _superlative(desc: Desc, shapes: list[Shape], candidates: list[int], margin: float
                 ) -> list[int] | None:
    """Shapes among ``candidates`` selected by the superlative; None when borderline."""
    sup = desc.superlative
    if sup in ("largest", "smallest"):
        ranks = [shapes[i].size_rank for i in candidates]
        best = max(ranks) if sup == "largest" else min(ranks)
        return [i for i, r in zip(candidates, ranks) if r == best]
    axis_values = {"leftmost": (lambda s: s.cx, 1), "rightmost": (lambda s: s.cx, -1),
                   "topmost": (lambda s: s.cy, 1), "bottommost": (lambda s: s.cy, -1)}
    if sup not in axis_values:
        raise ValueError(f"unknown superlative {sup!r}; known: {SUPERLATIVES}")
    key, sign = axis_values[sup]
    values = sorted((sign * key(shapes[i]), i) for i in candidates)
    if len(values) > 1 and values[1][0] - values[0][0] <= margin:
        return None
    return [values[0][1]]


def _related(shape: Shape, other: Shape, relation: str, margin: float) -> bool | None:
    """Whether ``shape`` is ``relation`` ``other``; None when within the margin."""
    axis, sign = RELATIONS[relation]
    delta = (shape.cx - other.cx) if axis == "x" else (shape.cy - other.cy)
    delta *= sign
    if abs(delta) <= margin:
        return None
    return delta > 0


def _resolve_desc(desc: Desc, shapes: list[Shape], margin: float) -> list[int] | None:
    candidates = [i for i, s in enumerate(shapes) if desc.matches(s)]
    if desc.superlative is None or not candidates:
        return candidates
    return _superlative(desc, shapes, candidates, margin)


def resolve(expr: Expression, shapes: list[Shape], margin: float) -> list[int] | None:
    """Indices of the shapes ``expr`` refers to, or None if a spatial comparison involved is
    within ``margin`` pixels (too close to call)."""
    found = _resolve_desc(expr.target, shapes, margin)
    if found is None or expr.relation is None:
        return found
    anchors = _resolve_desc(expr.obj, shapes, margin)
    if anchors is None or len(anchors) != 1:
        return None
    anchor = anchors[0]
    out = []
    for i in found:
        if i == anchor:
            continue
        rel = _related(shapes[i], shapes[anchor], expr.relation, margin)
        if rel is None:
            return None
        if rel:
            out.append(i)
    return out


def _attribute_descs(shape: Shape, use_size: bool = True) -> list[Desc]:
    """Every description made of a subset of the shape's attributes (kind None = "shape")."""
    sizes = (None, shape.size) if use_size else (None,)
    return [Desc(size=s, colour=c, kind=k)
            for s, c, k in itertools.product(sizes, (None, shape.colour), (None, shape.kind))]


def _unique(expr: Expression, target: int, shapes: list[Shape], margin: float) -> bool:
    return resolve(expr, shapes, margin) == [target]


def _attribute_options(shapes, target, margin):
    return [Expression("attribute", d) for d in _attribute_descs(shapes[target])
            if d != Desc() and _unique(Expression("attribute", d), target, shapes, margin)]


def _superlative_options(shapes, target, margin):
    out = []
    for base in _attribute_descs(shapes[target], use_size=False):
        if sum(base.matches(s) for s in shapes) < 2:
            continue  # a superlative over a single shape says nothing
        for sup in SUPERLATIVES:
            expr = Expression("superlative", Desc(None, base.colour, base.kind, sup))
            if _unique(expr, target, shapes, margin):
                out.append(expr)
    return out


def _relation_options(shapes, target, margin):
    out = []
    ambiguous = [d for d in _attribute_descs(shapes[target])
                 if sum(d.matches(s) for s in shapes) >= 2]
    for anchor, other in enumerate(shapes):
        if anchor == target:
            continue
        anchor_descs = [d for d in _attribute_descs(other) if d != Desc()
                        and sum(d.matches(s) for s in shapes) == 1
                        and (d.size is None or d.colour is None or d.kind is None)]
        if not anchor_descs:
            continue
        for relation in RELATIONS:
            if not _related(shapes[target], other, relation, margin):
                continue
            for d_t in ambiguous:
                # Every anchor description picks out ``other`` alone, so whether the
                # expression is unique does not depend on which one is said.
                probe = Expression("relation", d_t, relation, anchor_descs[0])
                if _unique(probe, target, shapes, margin):
                    out.extend(Expression("relation", d_t, relation, d_o)
                               for d_o in anchor_descs)
    return out


_OPTIONS = {"attribute": _attribute_options, "superlative": _superlative_options,
            "relation": _relation_options}


def make_expression(shapes: list[Shape], category: str, rng: np.random.Generator,
                    margin: float) -> tuple[int, Expression] | None:
    """A (target index, expression) of the given category that resolves to exactly that
    shape, for a target tried in random order; None when the scene allows none."""
    if category not in _OPTIONS:
        raise ValueError(f"unknown category {category!r}; choose from {CATEGORIES}")
    for target in rng.permutation(len(shapes)).tolist():
        options = _OPTIONS[category](shapes, target, margin)
        if options:
            return target, options[int(rng.integers(len(options)))]
    return None
