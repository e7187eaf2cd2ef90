"""Topic lexicons and the topic labeller: which topic a response mentions first.

A lexicon maps a topic name to a list of lowercase stems, e.g. ``{"apple": ["apple"],
"banana": ["banana"]}``. A stem matches where it starts a word (the character before it is not a
letter, digit or underscore; any continuation is allowed, so ``"apple"`` matches "Apples" and
"applesauce" but not "pineapple"). Matching ignores case, Unicode-aware.

The label of a text is the topic of its earliest match. Two buckets are never dropped:

- ``"other"``: no stem of the lexicon occurs;
- ``"ambiguous"``: stems of two or more topics match at the same earliest position (e.g. stems
  ``"pine"`` and ``"pineapple"`` of different topics on "pineapples").

The label keeps the matched span and text, so a reader can audit every decision.

>>> lexicon = validate_lexicon({"apple": ["apple"], "banana": ["banana", "plantain"]})
>>> label_topic("Bananas are great, and so are apples.", lexicon).label
'banana'
>>> label_topic("Pineapple juice", lexicon).label
'other'
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass

__all__ = [
    "OTHER",
    "AMBIGUOUS",
    "BUCKETS",
    "TopicLabel",
    "validate_lexicon",
    "lexicon_overlaps",
    "label_topic",
    "Labeller",
]

OTHER = "other"
AMBIGUOUS = "ambiguous"
BUCKETS = (AMBIGUOUS, OTHER)


@dataclass(frozen=True)
class TopicLabel:
    """The first topic a text mentions, with the evidence.

    ``start``/``end`` index the matched stem in the (NFC-normalised) text; ``matched`` is the whole
    word it starts; ``candidates`` lists every topic matching at ``start`` (more than one:
    ``label == "ambiguous"``). With no match: ``label == "other"``, ``start == end == -1``.
    """

    label: str
    start: int = -1
    end: int = -1
    matched: str = ""
    stem: str = ""
    candidates: tuple[str, ...] = ()

    @property
    def is_topic(self) -> bool:
        """True when the label is a lexicon topic (not a bucket)."""
        return self.label not in BUCKETS

    def to_dict(self) -> dict:
        out = asdict(self)
        out["candidates"] = list(self.candidates)
        return out


def validate_lexicon(topics: object, where: str = "topics") -> dict[str, tuple[str, ...]]:
    """Check a ``{topic: [stem, ...]}`` mapping; return it with NFC, lower-cased stems.

    Errors name ``where`` (e.g. ``file:line``) and the bad value: a lexicon needs at least two
    topics, topic names are non-empty strings other than ``"other"``/``"ambiguous"``, stems are
    non-empty strings, and one stem may not belong to two topics.
    """
    if not isinstance(topics, Mapping):
        raise ValueError(
            f"{where}: 'topics' must be an object mapping topic -> list of stems, got {type(topics).__name__}"
        )
    if len(topics) < 2:
        raise ValueError(f"{where}: 'topics' needs at least 2 topics to have a choice, got {len(topics)}")
    lexicon: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for topic, stems in topics.items():
        if not isinstance(topic, str) or not topic.strip():
            raise ValueError(f"{where}: topic names must be non-empty strings, got {topic!r}")
        if topic.strip().lower() in BUCKETS:
            raise ValueError(f"{where}: topic name {topic!r} is reserved for a label bucket; rename it")
        if isinstance(stems, str) or not isinstance(stems, (list, tuple)) or not stems:
            raise ValueError(
                f"{where}: topic {topic!r} needs a non-empty list of stems, got {stems!r:.80}"
            )
        clean = []
        for stem in stems:
            if not isinstance(stem, str) or not stem.strip():
                raise ValueError(f"{where}: topic {topic!r} has a stem that is not a non-empty string: {stem!r}")
            stem = unicodedata.normalize("NFC", stem.strip()).lower()
            if stem in owner and owner[stem] != topic:
                raise ValueError(f"{where}: stem {stem!r} belongs to two topics, {owner[stem]!r} and {topic!r}")
            owner[stem] = topic
            clean.append(stem)
        lexicon[topic] = tuple(dict.fromkeys(clean))
    return lexicon


def lexicon_overlaps(lexicon: Mapping[str, tuple[str, ...]]) -> list[tuple[str, str, str, str]]:
    """Pairs of stems of different topics where one is a prefix of the other.

    Such pairs can match at the same position and make a text ``"ambiguous"``; a lexicon without
    them labels every mention unambiguously. Returns ``(topic_a, stem_a, topic_b, stem_b)`` with
    ``stem_a`` a prefix of ``stem_b``.

    >>> lexicon_overlaps({"pine": ("pine",), "pineapple": ("pineapple",)})
    [('pine', 'pine', 'pineapple', 'pineapple')]
    """
    pairs = []
    items = [(topic, stem) for topic, stems in lexicon.items() for stem in stems]
    for topic_a, stem_a in items:
        for topic_b, stem_b in items:
            if topic_a != topic_b and stem_b.startswith(stem_a) and stem_a != stem_b:
                pairs.append((topic_a, stem_a, topic_b, stem_b))
    return pairs


class Labeller:
    """A compiled lexicon: ``Labeller(lexicon)(text) -> TopicLabel``."""

    def __init__(self, lexicon: Mapping[str, tuple[str, ...]] | Mapping[str, list[str]]):
        self.lexicon = validate_lexicon(dict(lexicon))
        alternatives = sorted(
            ((stem, topic) for topic, stems in self.lexicon.items() for stem in stems),
            key=lambda pair: -len(pair[0]),
        )
        self._topic_of = {stem: topic for stem, topic in alternatives}
        # One pattern per stem (longest first), so overlapping stems at one position are all seen.
        self._patterns = [
            (re.compile(r"(?<!\w)" + re.escape(stem), re.IGNORECASE), stem) for stem, _ in alternatives
        ]

    def __call__(self, text: str) -> TopicLabel:
        if not isinstance(text, str):
            raise TypeError(f"label_topic expects text, got {type(text).__name__}")
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        best_start, hits = None, []
        for pattern, stem in self._patterns:
            match = pattern.search(text)
            if match is None:
                continue
            if best_start is None or match.start() < best_start:
                best_start, hits = match.start(), [(stem, match)]
            elif match.start() == best_start:
                hits.append((stem, match))
        if best_start is None:
            return TopicLabel(OTHER)
        topics = tuple(sorted({self._topic_of[stem] for stem, _ in hits}))
        stem, match = max(hits, key=lambda hit: len(hit[0]))  # the longest stem at that position
        word_end = match.end()
        while word_end < len(text) and (text[word_end].isalnum() or text[word_end] in "-'"):
            word_end += 1
        return TopicLabel(
            label=topics[0] if len(topics) == 1 else AMBIGUOUS,
            start=match.start(),
            end=match.end(),
            matched=text[match.start() : word_end],
            stem=stem,
            candidates=topics,
        )


def label_topic(text: str, lexicon: Mapping[str, tuple[str, ...]] | Mapping[str, list[str]]) -> TopicLabel:
    """The first topic ``text`` mentions (see the module docstring for the rules).

    >>> label_topic("I love CHERRIES and apples", {"apple": ["apple"], "cherry": ["cherr"]}).matched
    'CHERRIES'
    """
    return Labeller(lexicon)(text)
