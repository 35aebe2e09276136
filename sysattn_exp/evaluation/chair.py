"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"): which COCO
objects a caption mentions, which of them are not in the image, and the metrics over a
set of captions.

Faithful to the authors' utils/chair.py (github.com/LisaAnne/Hallucination): the same
synonym list (data/coco_synonyms.txt, copied unchanged), the same pipeline (tokens, every
word singularised, double words joined, "seat" dropped beside "toilet", synonyms kept)
with its hard-coded rules, ground truth from instances *and* reference captions, and the
same counting (CHAIR_i counts every mention, repeats included). Singularising is
pattern.en's `singularize` as the original runs it (sysattn_exp/evaluation/singular.py, quirks
included: "bus" -> "bu" is never counted; caption.singularize=original, the default), or
lemminflect's noun lemma (caption.singularize=lemminflect: corrected, not comparable with
published numbers). Recall follows the version in OPERA / VCD (unique objects per
caption). The tokeniser differs from the original's NLTK one (README, CHAIR section).
"""

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import numpy as np
import pandas as pd
from lemminflect import getLemma

from sysattn_exp.benchmarks.base import SummedStatistics
from sysattn_exp.evaluation import singular
from sysattn_exp.files import read_text

# Pairs of tokens (after singularising) read as one word, and what they count as.
# The original's list, in its order; "stove top oven" has three words and, as in the
# original, never matches (only pairs are looked up).
COCO_DOUBLE_WORDS = [
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
]
# "baby bird" / "adult bird" is a bird, not a person (baby, adult are person synonyms).
ANIMAL_WORDS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra"]
ANIMAL_WORDS += ["giraffe", "animal", "cub"]
# "passenger jet" is a jet, not a person.
VEHICLE_WORDS = ["jet", "train"]


@dataclass(frozen=True)
class Vocabulary:
    """COCO's 80 objects and the words that name them."""

    node: dict[str, str]  # every synonym -> its COCO object (the first word of its line)
    double_words: dict[str, str]  # "teddy bear" -> "teddy bear", "baby cat" -> "cat", ...
    # word -> its singular, applied to every caption word (SINGULARIZERS)
    singularize: Callable[[str], str] = singular.singularize

    def __contains__(self, word: str) -> bool:
        return word in self.node


def parse_synonyms(text: str) -> dict[str, str]:
    """Synonym -> object, read as the original reads synonyms.txt: each line stripped and
    split on ", ". Kept as it does, quirks included: "scooter,  motor bike" yields the entry
    " motor bike" (leading space), which no caption word can ever equal."""
    node = {}
    for line in text.splitlines():
        synonyms = line.strip().split(", ")
        if synonyms == [""]:
            continue
        for synonym in synonyms:
            node[synonym] = synonyms[0]
    return node


def double_word_rules() -> dict[str, str]:
    rules = {word: word for word in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        rules[f"baby {animal}"] = animal
        rules[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        rules[f"passenger {vehicle}"] = vehicle
    rules["bow tie"] = "tie"
    rules["toilet seat"] = "toilet"
    # The original's singulariser made "glass" "glas"; harmless to keep.
    rules["wine glas"] = "wine glass"
    return rules


@cache
def vocabulary(singularizer: str = "original") -> Vocabulary:
    """The synonym list and double words, with the named singulariser (SINGULARIZERS)."""
    text = read_text(files("sysattn_exp") / "data" / "coco_synonyms.txt")
    return Vocabulary(parse_synonyms(text), double_word_rules(), SINGULARIZERS[singularizer])


# Runs of letters and digits, hyphenated ones kept whole ("t-shirt"), as NLTK's word
# tokenizer keeps them; "dog's" -> "dog", "s" (NLTK: "dog", "'s").
TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def tokenize(caption: str) -> list[str]:
    return TOKEN.findall(caption.lower())


def lemminflect_singular(word: str) -> str:
    """lemminflect's noun lemma (every word treated as a noun, as pattern's singularize
    does), except that a word already in the synonym list is kept: lemminflect would turn
    "corgi" into "corgus"; every other listed word has the same object either way."""
    if word in vocabulary("original").node:
        return word
    return getLemma(word, upos="NOUN")[0]


# caption.singularize: "original" = pattern's singularize as CHAIR's code runs it (the
# published figures); "lemminflect" = corrected ("bus", "ties", "canoes" counted), not
# comparable with published numbers. README, CHAIR section, lists where they differ.
SINGULARIZERS = {"original": singular.singularize, "lemminflect": lemminflect_singular}


def join_double_words(words: list[str], vocab: Vocabulary) -> list[str]:
    """Left to right, a pair that is a double word becomes one word (the original's loop)."""
    joined, i = [], 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in vocab.double_words:
            joined.append(vocab.double_words[pair])
            i += 2
        else:
            joined.append(words[i])
            i += 1
    return joined


def caption_objects(caption: str, vocab: Vocabulary | None = None) -> list[tuple[str, str]]:
    """Every mention of a COCO object in the caption, in order, repeats kept:
    (the word as matched, singularised, the COCO object it names)."""
    vocab = vocab or vocabulary()
    words = join_double_words([vocab.singularize(w) for w in tokenize(caption)], vocab)
    # The original's rule: with a toilet in the caption, "seat" is the toilet's, not a chair.
    if "toilet" in words and "seat" in words:
        words = [w for w in words if w != "seat"]
    return [(w, vocab.node[w]) for w in words if w in vocab]


def ground_truth_objects(
    category_names: Iterable[str],
    reference_captions: Iterable[str],
    vocab: Vocabulary | None = None,
) -> set[str]:
    """An image's objects: its instance annotations' categories (each a COCO object name)
    and every object its reference captions mention."""
    vocab = vocab or vocabulary()
    objects = {vocab.node[name] for name in category_names}
    for caption in reference_captions:
        objects.update(obj for _, obj in caption_objects(caption, vocab))
    return objects


@dataclass(frozen=True)
class CaptionScore:
    mentions: list[tuple[str, str]]  # (word, object) per mention, repeats kept
    hallucinated: list[tuple[str, str]]  # the mentions whose object is not in the image
    ground_truth: frozenset[str]
    n_words: int  # whitespace-separated words of the caption

    @property
    def recalled(self) -> set[str]:
        """Ground-truth objects the caption mentions (each once)."""
        return {obj for _, obj in self.mentions} & self.ground_truth


def score_caption(caption: str, ground_truth: set[str], vocab: Vocabulary | None = None):
    mentions = caption_objects(caption, vocab)
    hallucinated = [(w, obj) for w, obj in mentions if obj not in ground_truth]
    return CaptionScore(mentions, hallucinated, frozenset(ground_truth), len(caption.split()))


def chair_metrics(scores: list[CaptionScore]) -> dict[str, float]:
    """CHAIR_s = captions with a hallucinated object / captions; CHAIR_i = hallucinated
    mentions / object mentions (every mention counts, repeats too, as in the original);
    recall = sum over captions of ground-truth objects mentioned (unique) / sum of
    ground-truth objects; caption_length = mean words per caption. A ratio with nothing to
    count (no captions, no mentions, no ground truth) is 0, as the per-caption scores of
    the original are."""
    n_mentions = sum(len(s.mentions) for s in scores)
    n_hallucinated = sum(len(s.hallucinated) for s in scores)
    n_ground_truth = sum(len(s.ground_truth) for s in scores)
    return {
        "chair_s": ratio(sum(bool(s.hallucinated) for s in scores), len(scores)),
        "chair_i": ratio(n_hallucinated, n_mentions),
        "recall": ratio(sum(len(s.recalled) for s in scores), n_ground_truth),
        "caption_length": ratio(sum(s.n_words for s in scores), len(scores)),
        "n_images": len(scores),
        "n_object_mentions": n_mentions,
        "n_hallucinated_mentions": n_hallucinated,
    }


def ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def caption_counts(image_ids: list[int], scores: list[CaptionScore]) -> pd.DataFrame:
    """One row per caption: group_id (its image: one caption per image, so the image is
    the bootstrap's group), hallucinated (whether it mentions an object not in the
    image), mentions and hallucinated_mentions (counts, repeats included)."""
    return pd.DataFrame(
        {
            "group_id": image_ids,
            "hallucinated": [bool(s.hallucinated) for s in scores],
            "mentions": [len(s.mentions) for s in scores],
            "hallucinated_mentions": [len(s.hallucinated) for s in scores],
        }
    )


def chair_columns(captions: pd.DataFrame) -> pd.DataFrame:
    """Per image (SummedStatistics.columns): captions, hallucinated captions, object
    mentions and hallucinated mentions, from caption_counts' frame."""
    values = captions[["hallucinated", "mentions", "hallucinated_mentions"]].astype(float)
    values.insert(0, "captions", 1.0)
    return values.groupby(captions["group_id"].to_numpy(), sort=True).sum()


def chair_from_sums(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CHAIR_s = hallucinated captions / captions, CHAIR_i = hallucinated mentions /
    mentions (a ratio of sums, not a mean of per-caption ratios); 0 with nothing to count,
    as chair_metrics gives."""
    return {
        "chair_s": zero_if_empty(sums["hallucinated"], sums["captions"]),
        "chair_i": zero_if_empty(sums["hallucinated_mentions"], sums["mentions"]),
    }


def zero_if_empty(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    part, whole = np.asarray(part, float), np.asarray(whole, float)
    out = np.zeros(np.broadcast(part, whole).shape)
    np.divide(part, whole, out=out, where=whole != 0)
    return out


# CHAIR_s and CHAIR_i given SE, CI and change statistics (evaluation.stats).
CHAIR_STATISTICS = SummedStatistics(("chair_s", "chair_i"), chair_columns, chair_from_sums)
