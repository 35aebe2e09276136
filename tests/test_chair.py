"""CHAIR's object extraction and metrics on captions whose answers were worked out by hand
from the original's rules (LisaAnne/Hallucination utils/chair.py)."""

import pytest

from sysattn_exp.evaluation.chair import (
    caption_objects,
    chair_metrics,
    ground_truth_objects,
    score_caption,
    vocabulary,
)


def objects(caption: str) -> list[str]:
    return [obj for _, obj in caption_objects(caption)]


def test_synonym_file_has_the_80_coco_objects():
    assert len(set(vocabulary().node.values())) == 80


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        # plurals, irregular ones included
        ("Two dogs and three cats beside some mice.", ["dog", "cat", "mouse"]),
        ("Knives, buses, sheep and skis.", ["knife", "bus", "sheep", "skis"]),
        ("People and children with oxen.", ["person", "person", "cow"]),
        # synonyms name their COCO object
        ("A puppy on the sofa near a television.", ["dog", "couch", "tv"]),
        ("A corgi.", ["dog"]),  # a listed word is not singularised ("corgus")
        # multi-word objects, plural too
        ("Teddy bears, hot dogs, a dining table.", ["teddy bear", "hot dog", "dining table"]),
        ("Wine glasses and a cell phone.", ["wine glass", "cell phone"]),
        # "baby"/"adult" animals and "passenger" vehicles are not people
        ("A baby elephant and an adult giraffe.", ["elephant", "giraffe"]),
        ("A passenger train and a passenger jet.", ["train", "airplane"]),
        ("A baby and a bow tie.", ["person", "tie"]),
        # a toilet's seat is not a chair
        ("The toilet seat is up.", ["toilet"]),
        ("The seat of the toilet.", ["toilet"]),
        ("A seat by the window.", ["chair"]),
        # every mention counts, repeats too
        ("A dog. The dog is brown.", ["dog", "dog"]),
        # none
        ("A sunny day at the beach.", []),
        # the original's quirk: its synonym line holds " motor bike" (two spaces after the
        # comma), so "motor bike" never counts; "motorbike" does
        ("A motor bike and a motorbike.", ["motorcycle"]),
        ("A motor cycle and an iPhone.", ["motorcycle"]),  # "iPhone" is listed capitalised
    ],
)
def test_caption_objects(caption, expected):
    assert objects(caption) == expected


def test_ground_truth_from_instances_and_reference_captions():
    truth = ground_truth_objects(["person", "dog"], ["A man on a bike with his puppy."])
    assert truth == {"person", "dog", "bicycle"}


def test_metrics_by_hand():
    scores = [
        # mentions dog, couch, cat, dog: cat is hallucinated; 11 words
        score_caption("Two dogs on a sofa with a cat. The dogs sleep.", {"dog", "couch"}),
        # person, pizza: none hallucinated; 4 words
        score_caption("A man eating pizza.", {"person", "pizza"}),
        # no object mentioned; 3 words
        score_caption("A sunny street.", {"car"}),
    ]
    assert scores[0].hallucinated == [("cat", "cat")]
    metrics = chair_metrics(scores)
    assert metrics["chair_s"] == pytest.approx(1 / 3)
    assert metrics["chair_i"] == pytest.approx(1 / 6)  # 1 hallucinated of 6 mentions
    assert metrics["recall"] == pytest.approx(4 / 5)  # (2 + 2 + 0) of (2 + 2 + 1)
    assert metrics["caption_length"] == pytest.approx(6.0)  # (11 + 4 + 3) / 3
    assert (metrics["n_object_mentions"], metrics["n_hallucinated_mentions"]) == (6, 1)


def test_metrics_with_nothing_to_count_are_zero():
    metrics = chair_metrics([score_caption("Nothing here.", set())])
    assert (metrics["chair_s"], metrics["chair_i"], metrics["recall"]) == (0.0, 0.0, 0.0)
