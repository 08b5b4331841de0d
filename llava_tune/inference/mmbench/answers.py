"""Prompts as XTuner's mmbench tool builds them, option rotations, and the letter in a free-form answer."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from llava_tune.constants import IMAGE_TOKEN

if TYPE_CHECKING:  # the template module pulls in transformers; only its type is needed here
    from llava_tune.data.template import Message

INSTRUCTION = "Answer with the option's letter from the given choices directly."
INSTRUCTION_CN = "请直接回答选项字母。"
"""XTuner's closing instruction, English and (for text with CJK characters) Chinese."""

# --------------------------------------------------------------------------- prompts


def _has_cjk(text: str) -> bool:
    return re.search("[\u4e00-\u9fff]", text) is not None


def build_prompt(question: str, options: Mapping[str, str], hint: str | None = None) -> str:
    """The question text as XTuner's `mmbench` tool lays it out, without the image marker.

    `[hint\\n]question\\nA. ...\\nB. ...\\n` + the instruction to answer with the letter.
    """
    text = f"{hint}\n{question}\n" if hint is not None else f"{question}\n"
    text += "".join(f"{letter}. {option}\n" for letter, option in options.items())
    return text + (INSTRUCTION_CN if _has_cjk(text) else INSTRUCTION)


def build_messages(question: str, options: Mapping[str, str],
                   hint: str | None = None) -> list[Message]:
    """One user turn: `<image>\\n` then `build_prompt`'s text (the image goes first, as XTuner)."""
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{build_prompt(question, options, hint)}"}]


def rotate_options(options: Mapping[str, str], answer: str | None,
                   shift: int) -> tuple[dict[str, str], str | None]:
    """Options moved `shift` places up (the text under B goes to A) and the answer with them.

    The letters stay; with N options, shifts 0..N-1 put the right text once under each letter.
    """
    letters = list(options)
    texts = list(options.values())
    n = len(letters)
    rotated = {letters[j]: texts[(j + shift) % n] for j in range(n)}
    if answer is None:
        return rotated, None
    return rotated, letters[(letters.index(answer) - shift) % n]


# --------------------------------------------------------------------------- letters

_SOLE_LETTER = re.compile(r"[\s*\"'`]*[(\[{]?\s*([A-Za-z])\s*[)\]}]?[\s*\"'`.:,;!。]*")
_LEADING_LABEL = re.compile(r"[\s*\"'`]*(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])[.):](?=\s|$))")
_STATEMENT = re.compile(
    r"\b(?:answer|option|choice)s?\b(?:\s+(?:is|would be|should be))?\s*[:：]?\s*"
    r"(?:option\s+|choice\s+)?\**([(\[])?([A-Za-z])([)\]])?\**(?![A-Za-z0-9'’])",
    re.IGNORECASE)
_CAPITAL = re.compile(r"(?<![A-Za-z0-9'’])([A-Z])(?![A-Za-z0-9'’])")
_WORD_AFTER = re.compile(r"\s+([a-z]+)")
_CONNECTORS = frozenset({"or", "and", "nor", "vs", "versus", "then"})


def _norm_text(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" \"'`*.!。")


def _phrase_in(phrase: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


def extract_letter(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer chooses, or None (nothing found, or ambiguous).

    Tried in order, the first rule that fires decides:
    1. the answer is a letter alone, any case, maybe bracketed or punctuated: "b", "(A)", "C.";
    2. it starts with a label: "A) blue", "B. blue", "(c) green";
    3. it states one: "The answer is B", "Answer: C", "the correct option is (b)" (a lower-case
       letter only when bracketed or followed by punctuation or the end: "the answer is a blue
       circle" says nothing);
    4. its whole text equals one option's text ("blue" when B is "blue");
    5. it holds exactly one stand-alone capital option letter ("It is B."); a capital A or I
       before a lower-case word is read as the article / pronoun ("A blue star.");
    6. it contains exactly one option's text as a phrase ("It is blue."); an option whose text
       is part of another matched option's text yields to it ("light blue" over "blue").
    A letter from rules 1-2 that is not an option gives None; two different letters in rules
    3 or 5, or two options in rule 6, give None.
    """
    answer = text.strip()
    if not answer:
        return None
    match = _SOLE_LETTER.fullmatch(answer)
    if match:
        letter = match.group(1).upper()
        return letter if letter in options else None
    match = _LEADING_LABEL.match(answer)
    if match:
        letter = (match.group(1) or match.group(2)).upper()
        return letter if letter in options else None

    stated = set()
    for match in _STATEMENT.finditer(answer):
        letter = match.group(2)
        bracketed = match.group(1) is not None and match.group(3) is not None
        if letter.islower() and not bracketed:
            # "the answer is a blue circle": an article, not option A.
            if not re.match(r"\s*([.,;:!)\]]|$)", answer[match.end():]):
                continue
        if letter.upper() in options:
            stated.add(letter.upper())
    if len(stated) == 1:
        return stated.pop()
    if len(stated) > 1:
        return None

    normalized = _norm_text(answer)
    texts = {letter: _norm_text(option) for letter, option in options.items()}
    exact = [letter for letter, option in texts.items() if option and option == normalized]
    if exact:
        return exact[0] if len(exact) == 1 else None

    capitals = set()
    for match in _CAPITAL.finditer(answer):
        letter = match.group(1)
        if letter not in options:
            continue
        if letter in "AI":
            word = _WORD_AFTER.match(answer, match.end())
            if word and word.group(1) not in _CONNECTORS:
                continue
        capitals.add(letter)
    if len(capitals) == 1:
        return capitals.pop()
    if len(capitals) > 1:
        return None

    found = [letter for letter, option in texts.items() if option and _phrase_in(option, normalized)]
    found = [letter for letter in found
             if not any(texts[other] != texts[letter] and _phrase_in(texts[letter], texts[other])
                        for other in found)]
    return found[0] if len(found) == 1 else None


