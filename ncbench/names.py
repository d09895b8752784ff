"""Names users choose (teams, attacks), folded so that look-alike spellings meet.

One place for the rules, used by the store (team names) and the plugin registry (attack names).
"""

from __future__ import annotations

import unicodedata


def fold(text: str) -> str:
    """NFKC, case folding, and no combining marks: 'ＴＥ\u0301AM' and 'team' fold alike."""
    folded = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text).casefold())
    return unicodedata.normalize("NFC", "".join(c for c in folded if unicodedata.category(c) != "Mn"))


# Letters that look like Latin ones (the Cyrillic and Greek ones NFKC leaves alone), and ASCII
# sequences read as one letter (Unicode TR39 confusables, abridged). Both sides of a comparison
# get the same skeleton, so 'i' and 'l' may share one.
_LOOKALIKES = str.maketrans(
    {
        "а": "a",
        "в": "b",
        "е": "e",
        "ё": "e",
        "к": "k",
        "м": "m",
        "н": "h",
        "о": "o",
        "р": "p",
        "с": "c",
        "т": "t",
        "у": "y",
        "х": "x",
        "ѕ": "s",
        "і": "l",
        "ї": "l",
        "ј": "j",
        "ԁ": "d",
        "ԛ": "q",
        "ԝ": "w",
        "һ": "h",
        "ɡ": "g",
        "ո": "n",
        "օ": "o",
        "ս": "u",
        "α": "a",
        "β": "b",
        "ε": "e",
        "η": "n",
        "ι": "l",
        "κ": "k",
        "ν": "v",
        "ο": "o",
        "ρ": "p",
        "τ": "t",
        "υ": "u",
        "χ": "x",
        "ı": "l",
        "ʟ": "l",
        "ɪ": "l",
        "i": "l",
        "1": "l",
        "|": "l",
        "0": "o",
        "5": "s",
    }
)
_SEQUENCES = (("rn", "m"), ("vv", "w"), ("cl", "d"))
_UNKNOWN = "?"  # a letter or digit outside ASCII with no known look-alike


def name_skeleton(name: str) -> str:
    """What ``name`` looks like: folded (:func:`fold`), look-alike letters mapped to ASCII, ASCII
    punctuation, spaces and invisible characters dropped, other letters and digits as '?'."""
    text = fold(name).translate(_LOOKALIKES)
    for sequence, letter in _SEQUENCES:
        text = text.replace(sequence, letter)
    kept = []
    for char in text:
        if char.isascii():
            if char.isalnum():
                kept.append(char)
        elif unicodedata.category(char)[0] in "LN":
            kept.append(_UNKNOWN)
    return "".join(kept)
