"""CHAIR singularises as the original does (pattern.en's singularize, issue 18 section 5):
a table over every word of the COCO synonym list and its plural
(tests/data/chair_singular_original.tsv, written from pattern's rules and reviewed by
hand), the quirks' effect on CHAIR, and lemminflect as the corrected alternative."""

from pathlib import Path

import pytest
from cli import run_main

from sysattn_exp.evaluation.chair import caption_objects, score_caption, vocabulary
from sysattn_exp.evaluation.singular import singularize

TABLE = Path(__file__).parent / "data" / "chair_singular_original.tsv"


def table() -> list[tuple[str, str]]:
    rows = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            word, singular = line.split("\t")[:2]
            rows.append((word, singular))
    return rows


def synonym_words() -> set[str]:
    vocab = vocabulary()
    return {w.lower() for synonym in vocab.node for w in synonym.split(" ") if w}


def test_table_covers_every_synonym_word():
    words = {word for word, _ in table()}
    assert synonym_words() <= words
    assert len(words) == len(table())  # no word twice


def test_singularize_matches_pattern_on_every_synonym_word_and_plural():
    wrong = [(w, singularize(w), s) for w, s in table() if singularize(w) != s]
    assert not wrong, wrong[:10]


@pytest.mark.parametrize(
    ("word", "singular"),
    [
        # rules beyond the synonym list's words, from pattern's tables
        ("women", "woman"),  # irregular ending "men"
        ("mothers-in-law", "mother-in-law"),  # a preposition after the hyphen
        ("dogs'", "dog's"),
        ("ice", "ice"),  # the end of the uncountable "rice"
        ("wine", "wine"),  # the end of the uninflected "swine"
        ("lenses", "lens"),  # an -s singular + "es"
        ("octopi", "octopus"),  # "[octop|vir]" + "i"
        ("wolves", "wolf"),
        ("analyses", "analysis"),
        ("pizza", "pizza"),
        ("pasta", "pastum"),  # "([ti])a$" -> "\1um" applies to singulars too
        ("flour", "flmy"),  # irregular ending "our" -> "my"
    ],
)
def test_singularize_rules(word, singular):
    assert singularize(word) == singular


def objects(caption: str, singularizer: str) -> list[str]:
    return [obj for _, obj in caption_objects(caption, vocabulary(singularizer))]


@pytest.mark.parametrize(
    ("caption", "original", "lemminflect"),
    [
        ("A bus and two buses.", ["bus"], ["bus", "bus"]),  # "bus" -> "bu"
        ("Men wearing ties.", ["person"], ["person", "tie"]),  # "ties" -> "ty"
        ("Two canoes on the lake.", [], ["boat"]),  # "canoes" -> "cano"
        ("Two collies and three doggies.", ["dog", "dog"], ["dog", "dog"]),
        ("A wine glass and wine glasses.", ["wine glass"] * 2, ["wine glass"] * 2),
        ("A tennis racket.", ["tennis racket"], ["tennis racket"]),  # via "racket" alone
        ("Airbuses at the gate.", ["bus"], ["airplane"]),  # "airbuses" -> "bus"
        ("Thieves and magpies.", [], ["person", "bird"]),
    ],
)
def test_caption_objects_original_and_lemminflect(caption, original, lemminflect):
    assert objects(caption, "original") == original
    assert objects(caption, "lemminflect") == lemminflect


def test_original_is_the_default():
    assert vocabulary().singularize is singularize
    score = score_caption("A red bus.", {"bus"})
    assert score.mentions == [] and score.recalled == set()


def test_cli_unknown_singularizer_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    status = run_main(tmp_path, monkeypatch, "+task=caption", "caption.singularize=nltk")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1
    assert "caption.singularize='nltk'" in lines[0] and "original, lemminflect" in lines[0]
