"""pattern.en's `singularize`, the singulariser of CHAIR's original code (Rohrbach et al.
2018, github.com/LisaAnne/Hallucination utils/chair.py: `from pattern.en import
singularize`), reproduced so that CHAIR figures equal the published ones
(caption.singularize=original).

The rules are those of pattern 3.6's pattern/text/en/inflect.py (Tom De Smedt, BSD; its
singular rules adapted from Bermi Ferrer's Inflector), the version `pip install pattern`
gives under Python 3, where the authors' chair.py runs today; restated here as tables and
applied in pattern's order:
1. a hyphenated word whose second part is a preposition: its first part (mothers-in-law);
2. a word ending in "'": the singular of the rest + "'s";
3. a word that is the *end* of an uninflected or uncountable word is returned unchanged
   (pattern tests `entry.endswith(word)`: "ice" is the end of "rice", "wine" of "swine");
4. a word ending in one of the -ie words + "s" gives that -ie word ("collies" -> "collie",
   "doggies" -> "doggie"; "^pie" and "^tie" hold a literal "^", so "ties" and "pies" fall
   through);
5. a word ending in an -s singular + "es" gives that singular (the bare entry: "buses",
   and so "minibuses" and "airbuses", -> "bus");
6. a word ending in an irregular plural: that ending replaced ("women" -> "woman");
7. the first suffix rule (a regular expression) that matches, e.g. "(o)es$" -> "\\1", and
   last "s$" -> "" ("bus" -> "bu", "glass" -> "glas", "tennis" -> "tenni").
Known effects on CHAIR's words: "bus" -> "bu" is never counted, "ties" -> "ty", "canoes"
-> "cano", "glass" -> "glas" (hence the original's "wine glas" double word), "sports
ball" is never found ("sports" -> "sport"), nor "tennis racket" ("tennis" -> "tenni").
pattern 2.6 (Python 2, the authors' own runs) has no step 5 and a few uninflected words
fewer; on the COCO synonym list and its plurals it differs only in "airbuses" (2.6:
"airbus", an airplane; 3.6: "bus") and "minibuses" ("minibus" / "bus": a bus either way).
"""

import re

PLURAL_PREPOSITIONS = frozenset(
    [
        "about",
        "above",
        "across",
        "after",
        "among",
        "around",
        "at",
        "athwart",
        "before",
        "behind",
        "below",
        "beneath",
        "beside",
        "besides",
        "between",
        "betwixt",
        "beyond",
        "but",
        "by",
        "during",
        "except",
        "for",
        "from",
        "in",
        "into",
        "near",
        "of",
        "off",
        "on",
        "onto",
        "out",
        "over",
        "since",
        "till",
        "to",
        "under",
        "until",
        "unto",
        "upon",
        "with",
    ]
)
UNINFLECTED = [
    "aircraft",
    "antelope",
    "bison",
    "bream",
    "breeches",
    "britches",
    "carp",
    "cattle",
    "chassis",
    "clippers",
    "cod",
    "contretemps",
    "corps",
    "debris",
    "diabetes",
    "djinn",
    "eland",
    "elk",
    "flounder",
    "gallows",
    "georgia",
    "graffiti",
    "headquarters",
    "herpes",
    "high-jinks",
    "homework",
    "innings",
    "jackanapes",
    "mackerel",
    "measles",
    "mews",
    "moose",
    "mumps",
    "news",
    "offspring",
    "pincers",
    "pliers",
    "proceedings",
    "rabies",
    "salmon",
    "scissors",
    "series",
    "shears",
    "species",
    "swine",
    "swiss",
    "trout",
    "tuna",
    "whiting",
    "wildebeest",
]
UNCOUNTABLE = [
    "advice",
    "bread",
    "butter",
    "cannabis",
    "cheese",
    "electricity",
    "equipment",
    "fruit",
    "furniture",
    "garbage",
    "gravel",
    "happiness",
    "information",
    "ketchup",
    "knowledge",
    "love",
    "luggage",
    "mathematics",
    "mayonnaise",
    "meat",
    "mustard",
    "news",
    "progress",
    "research",
    "rice",
    "sand",
    "software",
    "understanding",
    "water",
]
IE_WORDS = [
    "algerie",
    "auntie",
    "beanie",
    "birdie",
    "bogie",
    "bombie",
    "bookie",
    "collie",
    "cookie",
    "cutie",
    "doggie",
    "eyrie",
    "freebie",
    "goonie",
    "groupie",
    "hankie",
    "hippie",
    "hoagie",
    "hottie",
    "indie",
    "junkie",
    "laddie",
    "laramie",
    "lingerie",
    "meanie",
    "nightie",
    "oldie",
    "^pie",
    "pixie",
    "quickie",
    "reverie",
    "rookie",
    "softie",
    "sortie",
    "stoolie",
    "sweetie",
    "techie",
    "^tie",
    "toughie",
    "valkyrie",
    "veggie",
    "weenie",
    "yuppie",
    "zombie",
]
# Singulars ending in "s", whose plural is + "es" (pattern's "s-singular" category).
S_SINGULARS = [
    "acropolis",
    "aegis",
    "alias",
    "asbestos",
    "bathos",
    "bias",
    "bus",
    "caddis",
    "canvas",
    "chaos",
    "christmas",
    "cosmos",
    "dais",
    "digitalis",
    "epidermis",
    "ethos",
    "gas",
    "glottis",
    "ibis",
    "lens",
    "mantis",
    "marquis",
    "metropolis",
    "pathos",
    "pelvis",
    "polis",
    "rhinoceros",
    "sassafras",
    "trellis",
]
# Irregular plural ending -> singular ending. No key ends another, so the order in which
# pattern's dict is searched (arbitrary under Python 2) never matters.
IRREGULAR = {
    "men": "man",
    "people": "person",
    "children": "child",
    "sexes": "sex",
    "axes": "axe",
    "moves": "move",
    "teeth": "tooth",
    "geese": "goose",
    "feet": "foot",
    "zoa": "zoon",
    "atlantes": "atlas",
    "atlases": "atlas",
    "beeves": "beef",
    "brethren": "brother",
    "corpora": "corpus",
    "corpuses": "corpus",
    "kine": "cow",
    "ephemerides": "ephemeris",
    "ganglia": "ganglion",
    "genii": "genie",
    "genera": "genus",
    "graffiti": "graffito",
    "helves": "helve",
    "leaves": "leaf",
    "loaves": "loaf",
    "monies": "money",
    "mongooses": "mongoose",
    "mythoi": "mythos",
    "octopodes": "octopus",
    "opera": "opus",
    "opuses": "opus",
    "oxen": "ox",
    "penes": "penis",
    "penises": "penis",
    "soliloquies": "soliloquy",
    "testes": "testis",
    "trilbys": "trilby",
    "turves": "turf",
    "numena": "numen",
    "occipita": "occiput",
    "our": "my",
}
# (pattern, replacement) in pattern's order; the first that matches is applied. Some lack
# "(?i)" as in pattern (irrelevant here: CHAIR lower-cases first). "[octop|vir]" and
# "[m|l]" are character classes, as written there.
SUFFIX_RULES = [
    (r"(?i)(.)ae$", r"\1a"),
    (r"(?i)(.)itis$", r"\1itis"),
    (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"),
    (r"(?i)(matr)ices$", r"\1ix"),
    (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"),
    (r"(?i)(alias|status)es$", r"\1"),
    (r"(?i)([octop|vir])i$", r"\1us"),
    (r"(?i)(cris|ax|test)es$", r"\1is"),
    (r"(?i)(shoe)s$", r"\1"),
    (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"),
    (r"(?i)([m|l])ice$", r"\1ouse"),
    (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"),
    (r"(?i)(.)ombies$", r"\1ombie"),
    (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"),
    (r"([^d]ea)ves$", r"\1f"),
    (r"arves$", "arf"),
    (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"),
    (r"(?i)([lr])ves$", r"\1f"),
    (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"),
    (r"(?i)(tive)s$", r"\1"),
    (r"(?i)(hive)s$", r"\1"),
    (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"),
    (r"(?i)(.)yses$", r"\1ysis"),
    (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"),
    (r"(?i)(n)ews$", r"\1ews"),
    (r"(?i)s$", ""),
]
SUFFIX_RULES = [(re.compile(pattern), replacement) for pattern, replacement in SUFFIX_RULES]


def singularize(word: str) -> str:
    """The singular pattern.en's singularize gives for `word` (as a noun), quirks included:
    see the module docstring."""
    if "-" in word:
        parts = word.split("-")
        if parts[1] in PLURAL_PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    if any(entry.endswith(lower) for entry in UNINFLECTED + UNCOUNTABLE):
        return word
    for ie_word in IE_WORDS:
        if lower.endswith(ie_word + "s"):
            return ie_word
    for s_singular in S_SINGULARS:
        if lower.endswith(s_singular + "es"):
            return s_singular
    for plural, singular in IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for pattern, replacement in SUFFIX_RULES:
        match = pattern.search(word)
        if match:
            # pattern drops a group reference whose group did not take part in the match
            # (the "-ses" rule's alternatives); re.sub would insert "" for it anyway.
            return pattern.sub(replacement, word)
    return word
