"""The one place where supervised records are worded. Training and prediction both read records built here.

A record is `{"db_id", "instruction", "input", "output", "history"}` (the DB-GPT-Hub / LLaMA-Factory layout):
`instruction` holds the reference's SQL-terminal instruction and the schema, `input` the question, `output` the SQL.
The wording is DB-GPT-Hub's (INSTRUCTION_PROMPT and INPUT_PROMPT in its configs/config.py), character for
character, including `me.Below` and the lone `"` line, so its released adapters see the prompts they were trained on.
Multi-turn records also carry `interaction`, `turn` and the bare `question` (see make_turn_record).
"""

from __future__ import annotations

from collections.abc import Callable

INSTRUCTION = (
    "I want you to act as a SQL terminal in front of an example database, you need only to return the sql "
    "command to me.Below is an instruction that describes a task, Write a response that appropriately "
    "completes the request.\n\"\n##Instruction:\n"
)
INPUT_FORMAT = "###Input:\n{question}\n\n###Response:"
EVIDENCE_FORMAT = "\n##Evidence:\n{evidence}\n"
HISTORY_MODES = ("questions", "gold")


def make_input(question: str) -> str:
    """The question as the reference frames it; the text is kept as given (the reference does not strip it)."""
    return INPUT_FORMAT.format(question=question)


def question_of(record: dict) -> str:
    """The question back out of a record (for reports): its `question` field, else parsed from `input`."""
    if isinstance(record.get("question"), str):
        return record["question"]
    text = record.get("input", "")
    if text.startswith("###Input:\n") and text.endswith("\n\n###Response:"):
        return text[len("###Input:\n"):-len("\n\n###Response:")]
    return text


def make_instruction(schema_blocks: list[str], evidence: str = "") -> str:
    """The reference's INSTRUCTION_PROMPT.format(schema): each block carries its own separator."""
    text = INSTRUCTION + "".join(schema_blocks) + "\n"
    if evidence:
        text += EVIDENCE_FORMAT.format(evidence=evidence.strip())
    return text


def fit_schema(blocks: list[str], budget: int, count: Callable[[str], int], evidence: str = ""
               ) -> tuple[list[str], bool]:
    """Drop schema blocks from the end (keys, then later tables) until the instruction, evidence included, fits
    `budget` tokens.

    Returns the kept blocks and whether anything was cut. The first block is cut word by word if it alone is too
    long; the result fits unless the text around the schema (the fixed instruction and the evidence) alone is
    longer than the budget, which the caller checks with `fits`.
    """
    if budget <= 0 or fits(blocks, budget, count, evidence):
        return blocks, False
    kept = list(blocks)
    while len(kept) > 1 and not fits(kept, budget, count, evidence):
        kept.pop()
    if not fits(kept, budget, count, evidence):
        words = kept[0].split(" ")
        while len(words) > 1 and not fits([" ".join(words)], budget, count, evidence):
            words = words[: max(1, len(words) * 9 // 10)]
        kept = [" ".join(words)]
    return kept, True


def fits(blocks: list[str], budget: int, count: Callable[[str], int], evidence: str = "") -> bool:
    """Whether the instruction built from these blocks (and evidence) is at most `budget` tokens."""
    return count(make_instruction(blocks, evidence)) <= budget


def make_record(db_id: str, schema_blocks: list[str], question: str, sql: str,
                history: list[tuple[str, str]] | None = None, evidence: str = "") -> dict:
    """One record in the reference's layout; `output` is the source SQL exactly as given."""
    return {
        "db_id": db_id,
        "instruction": make_instruction(schema_blocks, evidence),
        "input": make_input(question),
        "output": sql,
        "history": [[make_input(q), a] for q, a in (history or [])],
    }


def make_turn_record(db_id: str, schema_blocks: list[str], question: str, sql: str, history: list[tuple[str, str]],
                     interaction: int, turn: int, mode: str) -> dict:
    """A SParC/CoSQL turn. `gold`: the earlier turns as [input, gold SQL] pairs (the reference's way, teacher
    forcing; training uses it). `questions`: no history, and the earlier questions then the current one go into
    `input`, one per line, so no gold SQL of an earlier turn is ever in the prompt."""
    if mode == "gold":
        record = make_record(db_id, schema_blocks, question, sql, history)
    elif mode == "questions":
        record = make_record(db_id, schema_blocks, "\n".join([q for q, _ in history] + [question]), sql)
    else:
        raise ValueError(f"unknown history mode {mode!r}")
    record.update(interaction=interaction, turn=turn, question=question)
    return record
