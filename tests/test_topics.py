"""The topic labeller on hand-made responses, against labels written out by hand."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from surprise_probe.analyses.intention.topics import (
    AMBIGUOUS,
    OTHER,
    label_topic,
    lexicon_overlaps,
    validate_lexicon,
)

FRUIT = {"apple": ["apple"], "banana": ["banana", "plantain"], "cherry": ["cherr"], "pine": ["pine"],
         "pineapple": ["pineapple"], "creme": ["crème brûlée"], "uber": ["über"]}

CASES = [
    # text, label, matched word, start
    ("I would pick an apple.", "apple", "apple", 16),
    ("Bananas first, then apples.", "banana", "Bananas", 0),
    ("APPLE pie and CHERRIES", "apple", "APPLE", 0),
    ("Cherries are red; apples too.", "cherry", "Cherries", 0),
    ("A plantain is not a banana.", "banana", "plantain", 2),
    ("Nothing about fruit here.", OTHER, "", -1),
    ("", OTHER, "", -1),
    ("snapple and crabapple are not apples", "apple", "apples", 30),  # word starts only
    ("Pineapples!", AMBIGUOUS, "Pineapples", 0),  # 'pine' and 'pineapple' both start at 0
    ("a pine tree, then a pineapple", "pine", "pine", 2),
    ("Die Crème brûlée ist gut", "creme", "Crème brûlée", 4),  # unicode stem with a space, case
    ("ÜBERall", "uber", "ÜBERall", 0),  # unicode upper case
    ("(apple)", "apple", "apple", 1),
    ("_apple is glued to an underscore", OTHER, "", -1),
    ("9apple has a digit before it", OTHER, "", -1),
]


@pytest.mark.parametrize(("text", "label", "matched", "start"), CASES)
def test_labels_hand_made_responses(text, label, matched, start):
    result = label_topic(text, FRUIT)
    assert (result.label, result.matched, result.start) == (label, matched, start)
    if start >= 0:
        assert text[result.start : result.end].lower() == result.stem


def test_ambiguous_keeps_every_candidate_and_the_span():
    result = label_topic("pineapple juice", FRUIT)
    assert result.label == AMBIGUOUS
    assert result.candidates == ("pine", "pineapple")
    assert (result.start, result.end, result.stem) == (0, 9, "pineapple")
    assert not result.is_topic
    assert result.to_dict()["candidates"] == ["pine", "pineapple"]


def test_decomposed_unicode_text_is_normalised():
    decomposed = "Cre\u0300me bru\u0302le\u0301e"  # NFD forms of the accented letters
    assert label_topic(decomposed, FRUIT).label == "creme"


def test_validate_lexicon_lowercases_and_rejects_bad_lexicons():
    assert validate_lexicon({"A": ["Apple", "APP"], "b": ["b"]}) == {"A": ("apple", "app"), "b": ("b",)}
    bad = [
        ({"apple": ["apple"]}, "at least 2 topics"),
        (["apple"], "must be an object"),
        ({"apple": [], "b": ["b"]}, "non-empty list of stems"),
        ({"apple": "apple", "b": ["b"]}, "non-empty list of stems"),
        ({"apple": [""], "b": ["b"]}, "not a non-empty string"),
        ({"other": ["x"], "b": ["b"]}, "reserved"),
        ({"a": ["same"], "b": ["same"]}, "belongs to two topics"),
    ]
    for topics, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_lexicon(topics, where="f.jsonl:3")
    with pytest.raises(ValueError, match="f.jsonl:3"):
        validate_lexicon({}, where="f.jsonl:3")


def test_overlaps_are_listed():
    assert lexicon_overlaps(validate_lexicon({"pine": ["pine"], "pineapple": ["pineapple"]})) == [
        ("pine", "pine", "pineapple", "pineapple")
    ]
    assert lexicon_overlaps(validate_lexicon({"a": ["apple"], "b": ["banana"]})) == []


def test_builtin_lexicons_have_no_overlapping_stems():
    path = resources.files("surprise_probe") / "data" / "intention.jsonl"
    for line in path.read_text().splitlines():
        lexicon = validate_lexicon(json.loads(line)["topics"])
        assert len(lexicon) >= 6
        assert lexicon_overlaps(lexicon) == []
