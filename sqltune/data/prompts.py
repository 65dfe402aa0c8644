"""The one place where supervised records are worded. Training and prediction both read records built here.

A record is `{"db_id", "instruction", "input", "output", "history"}` (the DB-GPT-Hub / LLaMA-Factory layout):
`instruction` holds a fixed SQL-terminal instruction and the schema, `input` the question, `output` the SQL.
"""

from __future__ import annotations

from typing import Callable

INSTRUCTION = (
    "I want you to act as a SQL terminal in front of an example database, you need only to return the sql "
    "command to me. Below is an instruction that describes a task, Write a response that appropriately "
    "completes the request.\n##Instruction:\n"
)
INPUT_FORMAT = "###Input:\n{question}\n\n###Response:"
EVIDENCE_FORMAT = "\n##Evidence:\n{evidence}\n"


def make_input(question: str) -> str:
    return INPUT_FORMAT.format(question=question.strip())


def question_of(record: dict) -> str:
    """The question back out of a record's `input` (for reports)."""
    text = record.get("input", "")
    if text.startswith("###Input:\n") and text.endswith("\n\n###Response:"):
        return text[len("###Input:\n"):-len("\n\n###Response:")]
    return text


def make_instruction(schema_blocks: list[str], evidence: str = "") -> str:
    text = INSTRUCTION + "\n".join(schema_blocks) + "\n"
    if evidence:
        text += EVIDENCE_FORMAT.format(evidence=evidence.strip())
    return text


def fit_schema(blocks: list[str], budget: int, count: Callable[[str], int]) -> tuple[list[str], bool]:
    """Drop schema blocks from the end (keys, then later tables) until the instruction fits `budget` tokens.

    Returns the kept blocks and whether anything was cut. The first block is cut word by word if it alone is
    too long, so the result always fits.
    """
    if budget <= 0 or count(make_instruction(blocks)) <= budget:
        return blocks, False
    kept = list(blocks)
    while len(kept) > 1 and count(make_instruction(kept)) > budget:
        kept.pop()
    if count(make_instruction(kept)) > budget:
        words = kept[0].split(" ")
        while len(words) > 1 and count(make_instruction([" ".join(words)])) > budget:
            words = words[: max(1, len(words) * 9 // 10)]
        kept = [" ".join(words)]
    return kept, True


def make_record(db_id: str, schema_blocks: list[str], question: str, sql: str,
                history: list[tuple[str, str]] | None = None, evidence: str = "") -> dict:
    return {
        "db_id": db_id,
        "instruction": make_instruction(schema_blocks, evidence),
        "input": make_input(question),
        "output": sql,
        "history": [[make_input(q), a] for q, a in (history or [])],
    }
