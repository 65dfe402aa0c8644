"""SQL extraction on realistic generations: what a base or tuned model writes, and the one line that is scored."""

from __future__ import annotations

import pytest

from sqltune.infer.extract import extract_sql

GENERATIONS = [
    # prose, then the query
    ("To select the names, use this query:\nSELECT name FROM singer", "SELECT name FROM singer"),
    ("Sure! Here is the SQL query that answers the question:\n\nSELECT count(*) FROM head WHERE age > 56",
     "SELECT count(*) FROM head WHERE age > 56"),
    ("First we select the rows, then count them:\nselect count(*) from singer where age > 30",
     "select count(*) from singer where age > 30"),
    ("With this in mind, the query is:\nSELECT count(*) FROM singer", "SELECT count(*) FROM singer"),
    ("with the singer table we can count them:\nSELECT count(*) FROM singer", "SELECT count(*) FROM singer"),
    ("SQL: SELECT name FROM stadium WHERE capacity > 5000", "SELECT name FROM stadium WHERE capacity > 5000"),
    ("The answer is `SELECT count(*) FROM singer`, which counts the rows.", "SELECT count(*) FROM singer"),
    # fences, with and without a language
    ("```sql\nSELECT name, country\nFROM singer\nWHERE age > 30;\n```\n\nThis query returns the names.",
     "SELECT name, country FROM singer WHERE age > 30"),
    ("```\nSELECT count(*) FROM concert\n```", "SELECT count(*) FROM concert"),
    ("We need to select the stadiums first.\n```SQL\nSELECT name FROM stadium\n```", "SELECT name FROM stadium"),
    ("```SELECT max(capacity) FROM stadium```", "SELECT max(capacity) FROM stadium"),
    ("```sql\nSELECT name\n\nFROM singer\n\nORDER BY age\n```", "SELECT name FROM singer ORDER BY age"),
    # the prompt echoed
    (("###Input:\nHow many heads of the departments are older than 56 ?\n\n###Response:SELECT count(*) FROM head "
      "WHERE age  >  56"), "SELECT count(*) FROM head WHERE age > 56"),
    (("department_management contains tables such as department, head.\n###Input:\nList the names.\n\n"
      "###Response:\nSELECT name FROM head ORDER BY age"), "SELECT name FROM head ORDER BY age"),
    # the answer, then a made-up next turn (a base model on the `default` template stops only at eos): the answer
    # is scored, not the made-up one (pinned: the made-up query was scored, or nothing when it had no answer)
    ("SELECT a FROM t\n\n###Input:\nHow many b?\n\n###Response:\nSELECT count(*) FROM u", "SELECT a FROM t"),
    ("SELECT a FROM t\n###Input:\nHow many b?\n\n###Response:\n", "SELECT a FROM t"),
    ("SELECT name FROM singer\nWHERE age > 30\n##Instruction:\nsinger contains tables such as singer.",
     "SELECT name FROM singer WHERE age > 30"),
    ("Sure.\n###Response:\nSELECT b FROM u\n###Input:\nAnd c?\n###Response: SELECT c FROM v", "SELECT b FROM u"),
    # two statements
    ("SELECT name FROM singer; SELECT count(*) FROM singer;", "SELECT name FROM singer"),
    ("SELECT name FROM singer\nSELECT age FROM singer", "SELECT name FROM singer"),
    # literals holding ; and line breaks (a line break in a literal becomes one space; a tab is kept)
    ("SELECT * FROM t WHERE name = 'a;b'", "SELECT * FROM t WHERE name = 'a;b'"),
    ("SELECT id FROM t WHERE note = 'It''s; fine' ORDER BY id",
     "SELECT id FROM t WHERE note = 'It''s; fine' ORDER BY id"),
    ("SELECT id FROM t WHERE note = 'line1\nline2'\nAND id > 3",
     "SELECT id FROM t WHERE note = 'line1 line2' AND id > 3"),
    ('SELECT name FROM singer WHERE country = "France; Paris"',
     'SELECT name FROM singer WHERE country = "France; Paris"'),
    ("SELECT * FROM t WHERE name = 'Australia\t'", "SELECT * FROM t WHERE name = 'Australia\t'"),
    # lowercase select in prose, and prose only: no query, so the empty answer (predict writes it as SELECT)
    ("You can select the singers whose age is above 30 from the singer table.", ""),
    ("I'm sorry, I cannot answer this question\nwithout more information.", ""),
    ("", ""),
    # trailing explanation
    ("SELECT name FROM singer WHERE age > 30. This returns the names.", "SELECT name FROM singer WHERE age > 30"),
    (("SELECT T1.name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id = T2.singer_id\n"
      "Explanation: we join the tables."),
     "SELECT T1.name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id = T2.singer_id"),
    ("SELECT name,\n       age\nFROM singer\nORDER BY age DESC\nLIMIT 1\nIn this query, we sort by age.",
     "SELECT name, age FROM singer ORDER BY age DESC LIMIT 1"),
    ("SELECT name FROM singer.", "SELECT name FROM singer"),
    # blank lines inside a query
    ("SELECT name\nFROM singer\n\nWHERE age > 30\n\nThis lists the names.", "SELECT name FROM singer WHERE age > 30"),
    ("SELECT name FROM singer WHERE age > (\n\n  SELECT avg(age) FROM singer\n)",
     "SELECT name FROM singer WHERE age > ( SELECT avg(age) FROM singer )"),
    ("SELECT name FROM singer WHERE age < 20\nUNION\n\nSELECT name FROM singer WHERE age > 60",
     "SELECT name FROM singer WHERE age < 20 UNION SELECT name FROM singer WHERE age > 60"),
    # chat markers left in the text, or a generation that did not stop (special tokens skipped in decoding)
    ("SELECT count(*) FROM singer<|im_end|>\n<|im_start|>user\nHow many concerts?", "SELECT count(*) FROM singer"),
    ("SELECT count(*) FROM singer<end_of_turn>\n<start_of_turn>user\nAnd stadiums?", "SELECT count(*) FROM singer"),
    ("SELECT count(*) FROM singer\nuser\nHow many concerts are there?", "SELECT count(*) FROM singer"),
    ("SELECT count(*) FROM singer<|eot_id|><|start_header_id|>user", "SELECT count(*) FROM singer"),
    # CTEs and comments
    ("WITH older AS (SELECT * FROM singer WHERE age > 30)\nSELECT count(*) FROM older;",
     "WITH older AS (SELECT * FROM singer WHERE age > 30) SELECT count(*) FROM older"),
    ("-- count singers\nSELECT count(*) -- all rows\nFROM singer", "SELECT count(*) FROM singer"),
]


@pytest.mark.parametrize("raw, sql", GENERATIONS)
def test_realistic_generations(raw, sql):
    """Pins: `select` inside prose started the query (`To select the names, use this query: SELECT ...` gave
    `select the names, use this query: SELECT name FROM singer`), a `;` inside a string literal cut the query, a
    blank line inside a query ended it, and chat markers were left in: each error lowered the base model's figure and
    so inflated the fine-tuning gain."""
    assert extract_sql(raw) == sql


def test_enough_cases():
    assert len(GENERATIONS) >= 30


def test_end_marker_text_cuts_first():
    """The template's end marker (when predict passes it) cuts the text before anything else is read."""
    raw = "SELECT a FROM t WHERE b = 1 [[END]] SELECT c FROM u"
    assert extract_sql(raw, "[[END]]") == "SELECT a FROM t WHERE b = 1"
    assert extract_sql("I cannot tell.[[END]]\nSELECT 1", "[[END]]") == ""


def test_output_is_always_one_line():
    for raw, _ in GENERATIONS:
        assert "\n" not in extract_sql(raw) and "\r" not in extract_sql(raw + "\r\nmore\r")


@pytest.mark.parametrize("raw, sql", [
    ("SELECT name, count(*) FROM singer\nGroup By name", "SELECT name, count(*) FROM singer Group By name"),
    ("SELECT name\nFrom singer\nWhere age > 30\nOrder By age Desc\nLimit 1",
     "SELECT name From singer Where age > 30 Order By age Desc Limit 1"),
    ("SELECT T1.name FROM singer AS T1\nInner Join concert AS T2\nOn T1.id = T2.singer_id\nAnd T2.year = 2014",
     "SELECT T1.name FROM singer AS T1 Inner Join concert AS T2 On T1.id = T2.singer_id And T2.year = 2014"),
    ("SELECT name FROM singer WHERE age < 20\nUnion\nSELECT name FROM singer WHERE age > 60",
     "SELECT name FROM singer WHERE age < 20 Union SELECT name FROM singer WHERE age > 60"),
    # a title-case line that reads as a sentence is prose, as before
    ("SELECT name FROM singer\nFrom the result, we get the names.", "SELECT name FROM singer"),
    ("SELECT name FROM singer ORDER BY age\nOrder matters here!", "SELECT name FROM singer ORDER BY age"),
    ("SELECT name FROM singer\nIn this query, we list names", "SELECT name FROM singer"),
])
def test_title_case_clause_continues(raw, sql):
    """Pins: a line starting with a title-case clause keyword (`Group By`, `Order By`, `From`, `Where`, ...) cut the
    query (`SELECT name\\nFrom singer` was scored as `SELECT name`); a title-case line ending like a sentence is
    still prose."""
    assert extract_sql(raw) == sql


@pytest.mark.parametrize("raw, sql", [
    ("```sql SELECT name FROM singer", "SELECT name FROM singer"),
    ("Here:\n```sql SELECT name FROM singer\n```", "SELECT name FROM singer"),
    ("```sql\nSELECT name FROM singer\n``", "SELECT name FROM singer"),
    ("SELECT name FROM singer ``", "SELECT name FROM singer"),
    ("SELECT name FROM singer``", "SELECT name FROM singer"),
    ("SELECT name FROM singer `", "SELECT name FROM singer"),
    ("SELECT `name` FROM singer", "SELECT `name` FROM singer"),  # a quoted name is SQL
    ("```sql\nI cannot answer this without the schema.", ""),
    ("```", ""),
    ("Sure, here it is", ""),
])
def test_no_fence_or_prose_is_sql(raw, sql):
    """Pins: backticks of an unclosed or cut fence reached the SQL (`SELECT name FROM singer ``), a fence whose
    language stood on the query's line was kept whole as text (```` ```sql SELECT ... ````), and text with no query
    was written as the "SQL" (a fence and prose): with no query the answer is empty."""
    assert extract_sql(raw) == sql


def test_no_query_is_written_as_the_empty_answer():
    """An empty extract reaches the prediction file as predict's empty answer (SELECT), one line per record."""
    from sqltune.infer.outputs import NO_SQL, sql_text

    rows = [{"sql": extract_sql(raw)} for raw in ("I cannot tell.", "SELECT a FROM t", "```")]
    assert sql_text(rows) == f"{NO_SQL}\nSELECT a FROM t\n{NO_SQL}\n"
