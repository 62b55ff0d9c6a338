"""The completion format the model is taught: analysis (the chain of thought), then the answer.

    Analysis: ...cites sections such as IB-2... Decision: refuse
    ### Final answer
    I'm sorry, but I can't help with that.

Everything before the first ANSWER_DELIMITER line is the CoT; everything after it is what the user
sees. RL strips the CoT before the judge sees a completion; SFT trains on both.
"""
from __future__ import annotations

import dataclasses
import re

COT_PREFIX = "Analysis:"
ANSWER_DELIMITER = "### Final answer"
_SECTION_ID = re.compile(r"\b([A-Z]{2,4})-(\d{1,3})\b")
_DECISION = re.compile(r"decision\s*[:\-]?\s*\**\s*(comply|refuse|safe[ _-]?complet\w*)", re.IGNORECASE)

DISTILL_INSTRUCTIONS = f"""# How to respond
Before answering, reason privately about the request in an analysis:
1. Say briefly what the user is asking for.
2. Find the sections of the specification above that apply and cite them by ID, for example
   "IB-2 says that ...".
3. Decide whether to comply, refuse, or give a safe completion, on a line "Decision: comply",
   "Decision: refuse" or "Decision: safe_complete".
4. Say which style guideline the answer must follow.
Start the analysis with "{COT_PREFIX}". Then write a line containing only "{ANSWER_DELIMITER}", and
after it the final answer for the user, following the style guideline. The user never sees the
analysis, so the final answer must stand on its own."""


@dataclasses.dataclass(frozen=True)
class ParsedCompletion:
    cot: str
    answer: str
    status: str  # ok | no_delimiter | empty_cot | empty_answer | truncated
    decision: str | None  # comply | refuse | safe_complete, as stated in the CoT
    cited_sections: tuple[str, ...]


def _decision(cot: str) -> str | None:
    m = _DECISION.search(cot)
    if not m:
        return None
    word = m.group(1).lower()
    return "safe_complete" if word.startswith("safe") else word


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def sentence_ends(text: str) -> list[int]:
    """Offsets just after each sentence end in `text`; a list marker such as "2." is not one."""
    ends = []
    for m in _SENTENCE_END.finditer(text):
        line = text[:m.start()].rsplit("\n", 1)[-1].strip()
        if line and not line.isdigit():
            ends.append(m.end())
    return ends


def end_on_decision(cot: str, mode: str, max_sentences: int = 0, conclusion: str = "") -> str:
    """The analysis cut before any "Decision:" the model wrote (and after `max_sentences` sentences,
    0: no limit), then `conclusion` on a line of its own, ending on `mode` instead (a hinted teacher)."""
    head = re.split(r"\**\bdecision\b\**\s*[:\-]", cot, maxsplit=1, flags=re.IGNORECASE)[0]
    ends = sentence_ends(head)
    if max_sentences and len(ends) >= max_sentences:
        head = head[:ends[max_sentences - 1]]
    head = head.rstrip(" *:-\n")
    if head == COT_PREFIX.rstrip(":"):  # the model wrote no analysis: the prefix keeps its colon
        head = COT_PREFIX
    if conclusion:
        head += (" " if head == COT_PREFIX else "\n") + conclusion
    return f"{head}\nDecision: {mode}"


def trim_answer(answer: str, finished: bool, max_sentences: int = 0, trim_truncated: bool = False) -> tuple[str, bool]:
    """(answer, finished) cut to at most `max_sentences` sentences (0: no limit), and with
    `trim_truncated` an answer the length limit cut kept up to its last full sentence. Either cut makes
    a finished answer; one the limit cut before any full sentence is returned as it was."""
    ends = sentence_ends(answer)
    if max_sentences and len(ends) >= max_sentences:
        end = ends[max_sentences - 1]
        if answer[end:].strip() or not finished:
            return answer[:end], True
    if not finished and trim_truncated and ends:
        return answer[:ends[-1]], True
    return answer, finished


def parse_completion(text: str, finished: bool = True) -> ParsedCompletion:
    """Split a completion into CoT and answer; `finished` is False when the length limit cut it."""
    head, sep, tail = text.partition(ANSWER_DELIMITER)
    cot, answer = head.strip(), tail.strip()
    if not sep:
        status = "truncated" if not finished else "no_delimiter"
    elif not cot or cot == COT_PREFIX:
        status = "empty_cot"
    elif not answer:
        status = "truncated" if not finished else "empty_answer"
    elif not finished:
        status = "truncated"
    else:
        status = "ok"
    sections = tuple(dict.fromkeys(f"{a}-{b}" for a, b in _SECTION_ID.findall(cot)))
    return ParsedCompletion(cot, answer if sep else "", status, _decision(cot), sections)


def format_completion(cot: str, answer: str) -> str:
    """The assistant turn SFT trains on."""
    return f"{cot.strip()}\n{ANSWER_DELIMITER}\n{answer.strip()}"
