"""Getting one line of SQL out of what a model wrote, without taking prose for SQL (which would lower the base
model's figure and so inflate the fine-tuning gain).

Rules, in order:
1. The text is cut at the template's end marker text when one is given, and at chat end markers left in it
   (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...). The prompt's turn markers split the rest into turns (a
   turn ends at `###Response:`, and at a line starting `###Input:` or `##Instruction:`); the first turn holding a
   query is read. So an echoed prompt is skipped, and a model that answers and then makes up a next question and
   its answer is scored on its own answer, not on the made-up one.
2. Where the query starts: in the first fenced code block (with or without a language, the language on its own
   line or before the query: ```` ```sql SELECT ... ````) that holds one, else in the whole text. A query starts
   with SELECT, or WITH followed by `name AS (`, written in upper or lower case (not capitalised like a sentence's
   first word), at the start of a line (or of the fenced block, or right after `###Response:`); or in upper case
   right after a colon or an inline-code backtick (`use this query: SELECT ...`). So `select` inside a sentence
   never starts a query.
3. Where it ends, read with sqlparse's SQL lexer, whose string literals and quoted names are single tokens (a `;`
   or a line break inside a literal never cuts): at the first `;` outside literals and parentheses, at the end of
   the fenced block or inline code, at backticks that are no quoted name (a cut or unclosed fence: `` `` `` or a
   lone `` ` ``), or at the first line that does not continue the query. A line continues it when parentheses are
   open, when the line before ended with a comma, an operator or a keyword that needs more (FROM, AND, BY, UNION,
   ...), or when it starts with a clause keyword (FROM, WHERE, AND, JOIN, ORDER BY, UNION, ...; upper or lower
   case), a closing parenthesis, a comma or an operator. A line starting with a title-case clause keyword (`From`,
   `Where`, `Group By`, `Order By`, `Having`, `Limit`, `... Join`, `On`, `And`, `Or`, `Union`, ...) continues it too,
   unless it ends like a sentence (`.`, `!`, `?` or `:`): `From the result, we get the names.` is prose. A blank
   line does not end a query by itself.
4. One line: comments are dropped and whitespace outside literals folds to single spaces; inside a string literal
   everything is kept except line breaks, each of which becomes one space (the prediction file holds one query per
   line, so this is the only change a literal can undergo).
Text with no query in it gives the empty answer, never the text itself (a code fence or prose is no SQL, and
executing it as SQL only hides that nothing was found); predict writes an empty answer as `SELECT`, so every record
keeps its line.
"""

from __future__ import annotations

import re

from sqlparse import lexer
from sqlparse import tokens as T

from sqltune.data.prompts import INPUT_FORMAT, INSTRUCTION
from sqltune.sqltext import fold

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<start_of_turn>", "<|eot_id|>", "<|end_of_text|>",
               "<|end|>", "<|EOT|>", "</s>", "<eos>")
# a fence's language on its own line, or before the query on the fence's line (```sql SELECT ...)
_FENCE = re.compile(r"```(?:[ \t]*[\w+#.-]*[ \t]*\n|[ \t]*(?i:sql|sqlite)[ \t]+)?(.*?)(?:```|\Z)", re.DOTALL)
_WITH = r"(?:WITH|with)\b(?=(?i:\s+(?:recursive\s+)?[\w\"`\[\]]+\s*(?:\([^)]*\)\s*)?as\s*\())"
_START = re.compile(rf"^[ \t]*(?P<line>(?:SELECT|select)\b|{_WITH})"
                    rf"|(?P<lead>[:`])\**[ \t]*(?P<upper>SELECT\b|{_WITH.replace('|with', '')})", re.MULTILINE)
# a line starting with one of these words (upper or lower case) continues the query
_CLAUSE = {"FROM", "WHERE", "AND", "OR", "NOT", "ON", "JOIN", "INNER", "LEFT", "RIGHT", "FULL", "CROSS", "NATURAL",
           "OUTER", "GROUP", "ORDER", "HAVING", "LIMIT", "OFFSET", "UNION", "INTERSECT", "EXCEPT", "AS", "IN", "LIKE",
           "GLOB", "BETWEEN", "IS", "WHEN", "THEN", "ELSE", "END", "ASC", "DESC", "USING", "EXISTS", "BY", "COLLATE"}
# a line starting with one of these in title case (`Group By`) continues the query, unless it ends like a sentence
_TITLE_CLAUSE = {"FROM", "WHERE", "GROUP BY", "ORDER BY", "HAVING", "LIMIT", "OFFSET", "UNION", "UNION ALL",
                 "INTERSECT", "EXCEPT", "ON", "AND", "OR"}  # and every `... Join`
# a line ending with one of these words needs the next one
_OPEN = {"SELECT", "DISTINCT", "FROM", "WHERE", "AND", "OR", "NOT", "ON", "BY", "JOIN", "AS", "IN", "LIKE", "GLOB",
         "BETWEEN", "UNION", "INTERSECT", "EXCEPT", "ALL", "CASE", "WHEN", "THEN", "ELSE", "HAVING", "IS", "EXISTS",
         "WITH", "USING", "LIMIT", "OFFSET", "INNER", "LEFT", "RIGHT", "OUTER", "CROSS", "NATURAL", "FULL"}
_BREAK = re.compile(r"\r\n|\r|\n")
RESPONSE = INPUT_FORMAT.rsplit("\n", 1)[1]  # "###Response:", where the prompt hands over to the answer
# "###Input:" and "##Instruction:", the prompt's own markers: where a made-up next turn starts
_TURN_END = re.compile(r"^[ \t]*(?:%s|%s)" % (re.escape(INPUT_FORMAT.split("\n", 1)[0]),
                                              re.escape(INSTRUCTION.rstrip("\n").rsplit("\n", 1)[1])), re.MULTILINE)


def extract_sql(text: str, end: str | None = None) -> str:
    """One line of SQL from a generation (see the module's rules); `end` is the template's end marker text."""
    for marker in ((end,) if end else ()) + END_MARKERS:
        text = text.split(marker, 1)[0]
    text = _answer_turn(text)
    for block in _FENCE.finditer(text):
        sql = _statement(block.group(1))
        if sql:
            return sql
    return _statement(text) or ""


def _answer_turn(text: str) -> str:
    """The part of the text that answers: the first turn holding a query, each turn ending where the model starts a
    new one (`###Input:` or `##Instruction:`) or, in an echoed prompt, where the answer starts (`###Response:`).
    A model that answers and then makes up a next question and its answer is scored on its answer."""
    turns = [_TURN_END.split(part, 1)[0] for part in text.split(RESPONSE)]
    return next((turn for turn in turns if _START.search(turn)), turns[-1])


def _statement(text: str) -> str | None:
    start = _START.search(text)
    if start is None:
        return None
    kw = "line" if start.group("line") else "upper"
    rest = text[start.start(kw):]
    if start.group("lead") == "`" and kw == "upper":  # inline code ends at its closing backtick
        rest = rest.split("`", 1)[0]
    return _one_line(rest.split("```", 1)[0]) or None


def _word(value: str, last: bool = False) -> str:
    words = value.split()
    return (words[-1] if last else words[0]).upper() if words else ""


def _title_clause(value: str, line: str) -> bool:
    """A line starting with a title-case clause keyword (`Group By name`), not a sentence (`From this, ...`)."""
    phrase = " ".join(value.upper().split())
    return value.istitle() and (phrase in _TITLE_CLAUSE or phrase.endswith("JOIN")) and \
        not line.rstrip().endswith((".", "!", "?", ":"))


def _continues(last: tuple, ttype, value: str, line: str) -> bool:
    """Whether a line starting with token (ttype, value) continues a query whose last token was `last`; `line` is
    that line from the token on."""
    last_type, last_value = last
    if last_value in (",", "(", ".") or last_type in T.Operator or \
            (last_type in T.Keyword and _word(last_value, last=True) in _OPEN):
        return True
    if value in (")", ",", ".") or (ttype in T.Operator and value.upper() not in ("LIKE", "GLOB")):
        return True
    return ttype not in T.String and ((value.isupper() or value.islower()) and _word(value) in _CLAUSE or
                                      _title_clause(value, line))


def _one_line(sql: str) -> str:
    """The first statement of `sql` (which starts with its keyword), as one line."""
    out: list[str] = []
    last, depth, space, newline, cte, pos = None, 0, False, False, False, 0
    for ttype, value in lexer.tokenize(sql):
        at, pos = pos, pos + len(value)
        if ttype in T.Comment or ttype in T.Whitespace:
            newline = newline or ttype in T.Comment.Single or bool(_BREAK.search(value))
            space = True
            continue
        if newline and depth == 0 and last is not None and \
                not _continues(last, ttype, value, _BREAK.split(sql[at:], 1)[0]) and \
                not (cte and _word(value) == "SELECT"):
            break
        if value.strip("`") == "" and (ttype in T.Name or ttype in T.Error):
            break  # `` or a lone ` (a cut or unclosed fence), not a quoted name
        if value == ";" and depth == 0:
            break
        if depth == 0 and space and last and last[1].endswith(".") and value[:1].isupper() and value[1:].islower():
            out[-1] = out[-1][:-1]  # "... WHERE a = 1. It counts": a sentence ended, with its full stop
            break
        if depth == 0:  # a statement opened by WITH goes on to its main SELECT
            cte = _word(value) == "WITH" if last is None else cte and _word(value) != "SELECT"
        depth += (value == "(") - (value == ")" and depth > 0)
        quoted = ttype in T.String or value[:1] in ("`", "[")  # a literal or a quoted name: kept as written
        value = _BREAK.sub(" ", value) if quoted else fold(value)
        out.append((" " if space and out else "") + value)
        last, space, newline = (ttype, value), False, False
    if out and out[-1].strip() == ".":
        out.pop()  # "... FROM singer." ends a sentence: the full stop is not SQL
    return "".join(out).strip()
