"""The R1-VL reasoning format: the prompt instruction and the parsing of a response.

A response is written in sections, in this order::

    ### Image Description:
    ...
    ### Rationales:
    ...
    ### Let's think step by step.
    ### Step 1:
    ...
    ### Step n:
    ...
    ### The final answer is: X

Everything here is a pure function of strings (no heavy imports): the rewards
(`r1vl.rewards`) and the data code share it, so the trainer, the evaluator and
the rewards all read a response the same way.
"""
from __future__ import annotations

import re

IMAGE_DESCRIPTION = "### Image Description:"
RATIONALES = "### Rationales:"
STEP_BY_STEP = "### Let's think step by step."
FINAL_ANSWER = "### The final answer is:"
# Qwen2-VL's grounding markers: special tokens, so the engines' decoding (skip_special_tokens, as
# TRL's and the authors') drops them from every completion; the rewards drop them from the
# reference's text too, which a completion reproducing it token for token must match
GROUNDING_MARKERS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                     "<|quad_start|>", "<|quad_end|>")


def without_markers(text: str) -> str:
    """`text` as the engines decode it: without Qwen2-VL's grounding markers."""
    if "<|" not in text:
        return text
    for m in GROUNDING_MARKERS:
        text = text.replace(m, "")
    return text

# The evaluation instruction of the R1-VL authors (their VLMEvalKit Qwen2-VL
# wrapper), kept character for character -- including the unclosed quote after
# "xxx" -- because the released R1-VL checkpoints were evaluated with exactly
# this text; "{question}" is replaced by "Question: <the question>".
REASONING_INSTRUCTION = (
    "Generate an image description based on the question.\n"
    "Then, provide a rationale to analyze the question.\n"
    "Next, generate a step-by-step reasoning process to solve the problem. "
    "Ensure the steps are logical and concise.\n"
    "Finally, provide a concise summary of the final answer in the following format: "
    "'The final answer is: xxx.\n"
    "\n"
    "Format your response with the following sections, separated by ###:\n"
    "### Image Description:\n"
    "### Rationales:\n"
    "### Let's think step by step.\n"
    "### Step 1:\n"
    "### Step 2:\n"
    "...\n"
    "### The final answer is: \n"
    "\n"
    "{question}"
)
_INSTRUCTION_MARKER = "Format your response with the following sections, separated by ###:"

# A Step section: its header, then its text up to the next "\n###" or the end.
# Leading whitespace after the header is not part of the text.
_STEP_SECTION = re.compile(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", re.DOTALL)
_STEP_HEADER = re.compile(r"### Step (\d+):")


def format_prompt(question: str) -> str:
    """The user text for one question: the authors' evaluation instruction, then the question.

    As in the authors' evaluation code, the question is prefixed with
    "Question: " unless it already contains that string. A question that
    already carries the instruction (some exported data sets store the full
    prompt in `problem`) is returned unchanged, so the instruction never
    appears twice.
    """
    question = str(question)
    if _INSTRUCTION_MARKER in question:
        return question
    if "Question: " not in question:
        question = "Question: " + question
    return REASONING_INSTRUCTION.replace("{question}", question)


def extract_final_answer(text: str) -> str | None:
    """The answer written after the first `### The final answer is:` header.

    That is the first non-blank text after the header, up to the end of its
    line, stripped: "### The final answer is: 42" and "### The final answer
    is:\\n42" both give "42". None when the header is absent or nothing but
    whitespace follows it. (Same reading as the authors' regex
    `### The final answer is:\\s*\\n?(.*)`.)
    """
    if not isinstance(text, str):
        return None
    i = text.find(FINAL_ANSWER)
    if i < 0:
        return None
    rest = text[i + len(FINAL_ANSWER):].lstrip()
    end = rest.find("\n")
    line = (rest if end < 0 else rest[:end]).strip()
    return line or None


def answer_line(text: str) -> str | None:
    """The completion's (or reference's) final answer: `extract_final_answer`'s line, or, when
    that line only opens display maths (`$$`, `\\[`), the whole display up to its closing
    delimiter on a later line (None if it never closes before the next `###` header)."""
    line = extract_final_answer(text)
    if line is None:
        return None
    for opening, closing in (("$$", "$$"), ("\\[", "\\]")):
        if line.startswith(opening) and closing not in line[len(opening):]:
            rest = text[text.find(FINAL_ANSWER) + len(FINAL_ANSWER):]
            start = rest.find(opening)
            end = rest.find(closing, start + len(opening))
            section_end = rest.find("\n###")
            if end < 0 or 0 <= section_end < end:
                return line
            return " ".join(rest[start:end + len(closing)].split())
    return line


def step_sections(text: str) -> list[str]:
    """The text of each `### Step N:` section, in order (header and leading whitespace excluded).

    A section runs from after its header to the next "\\n###" or the end of
    the text, so Image Description, Rationales and the final answer are not
    part of any Step section when they start on their own line.
    """
    return _STEP_SECTION.findall(text)


def step_numbers(text: str) -> list[str]:
    """The N of every `### Step N:` header, in order of appearance, as written (digit strings)."""
    return _STEP_HEADER.findall(text)
