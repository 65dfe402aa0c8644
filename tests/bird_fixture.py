"""A tiny BIRD-layout dataset made by our own code: `train/` and `dev/` folders, each with `<split>.json`
(question, evidence, SQL; difficulty on dev), `<split>_tables.json` and `<split>_databases/<db>/<db>.sqlite`.

Train and dev use different databases (as in BIRD), so a test can see which folder a prompt was read from.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

# db_id -> (split, {table: (columns [(name, type)], primary key or None, rows)}, foreign keys [(t, c, rt, rc)])
DATABASES = {
    "works_cycles": ("train", {
        "vendor": ([("vendor_id", "INTEGER"), ("vendor_name", "TEXT"), ("credit_rating", "INTEGER")], "vendor_id",
                   [(1, "Trey Research", 1), (2, "Contoso Bikes", 3), (3, "Fabrikam Parts", 2)]),
        "purchase": ([("purchase_id", "INTEGER"), ("vendor_id", "INTEGER"), ("total_due", "REAL")], "purchase_id",
                     [(10, 1, 250.5), (11, 2, 99.0), (12, 1, 1200.0)]),
    }, [("purchase", "vendor_id", "vendor", "vendor_id")]),
    "superhero": ("dev", {
        "hero": ([("id", "INTEGER"), ("superhero_name", "TEXT"), ("height_cm", "INTEGER")], "id",
                 [(1, "Nightcrawler", 175), (2, "Storm", 180), (3, "Rogue", 173)]),
        "hero_attribute": ([("hero_id", "INTEGER"), ("attribute_value", "INTEGER")], None,
                           [(1, 80), (2, 95), (3, 60)]),
    }, [("hero_attribute", "hero_id", "hero", "id")]),
}

QUESTIONS = {
    "train": [
        {"question_id": 0, "db_id": "works_cycles", "question": "Which vendor has the best credit rating?",
         "evidence": "best credit rating refers to credit_rating = 1",
         "SQL": "SELECT vendor_name FROM vendor WHERE credit_rating = 1"},
        {"question_id": 1, "db_id": "works_cycles", "question": "How many purchases did Trey Research make?",
         "evidence": "", "SQL": "SELECT COUNT(*)\nFROM purchase AS T1\nINNER JOIN vendor AS T2 ON T1.vendor_id = "
                                "T2.vendor_id WHERE T2.vendor_name = 'Trey Research'"},
    ],
    "dev": [
        {"question_id": 0, "db_id": "superhero", "question": "What is the height of Storm?",
         "evidence": "height refers to height_cm", "SQL": "SELECT height_cm FROM hero WHERE superhero_name = 'Storm'",
         "difficulty": "simple"},
        {"question_id": 1, "db_id": "superhero", "question": "Which hero has the highest attribute value?",
         "evidence": "highest attribute value refers to MAX(attribute_value)",
         "SQL": "SELECT T1.superhero_name FROM hero AS T1 INNER JOIN hero_attribute AS T2 ON T1.id = T2.hero_id "
                "ORDER BY T2.attribute_value DESC LIMIT 1", "difficulty": "moderate"},
        {"question_id": 2, "db_id": "superhero", "question": "List heroes taller than 174 cm with attribute over 70.",
         "evidence": "taller than 174 cm refers to height_cm > 174",
         "SQL": "SELECT T1.superhero_name FROM hero AS T1 JOIN hero_attribute AS T2 ON T1.id = T2.hero_id "
                "WHERE T1.height_cm > 174 AND T2.attribute_value > 70", "difficulty": "challenging"},
    ],
}


def tables_entry(db_id: str, tables: dict, fks: list) -> dict:
    names = list(tables)
    cols, types = [[-1, "*"]], ["text"]
    for i, (columns, _, _) in enumerate(tables.values()):
        for name, ctype in columns:
            cols.append([i, name])
            types.append("integer" if ctype == "INTEGER" else "real" if ctype == "REAL" else "text")
    index = {(names[t], c): k for k, (t, c) in enumerate(cols) if t >= 0}
    pks = [index[(t, pk)] for t, (_, pk, _) in tables.items() if pk]
    return {"db_id": db_id, "table_names_original": names, "table_names": names, "column_names_original": cols,
            "column_names": cols, "column_types": types, "primary_keys": pks,
            "foreign_keys": [[index[(t, c)], index[(rt, rc)]] for t, c, rt, rc in fks]}


def write_database(path: Path, tables: dict, fks: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        for table, (columns, pk, rows) in tables.items():
            defs = [f"{name} {ctype}" for name, ctype in columns]
            if pk:
                defs.append(f"PRIMARY KEY ({pk})")
            defs += [f"FOREIGN KEY ({c}) REFERENCES {rt}({rc})" for t, c, rt, rc in fks if t == table]
            conn.execute(f"CREATE TABLE {table} ({', '.join(defs)})")
            conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})", rows)
        conn.commit()
    finally:
        conn.close()


def build_bird(root: Path, splits: tuple[str, ...] = ("train", "dev"), flat: bool = False) -> Path:
    """Write the BIRD-layout folder under `root` (only the given splits; each in `<root>/<split>/` as BIRD ships
    them, or all directly in `root` when `flat`); return `root`."""
    for split in splits:
        folder = root if flat else root / split
        entries = []
        for db_id, (db_split, tables, fks) in DATABASES.items():
            if db_split == split:
                write_database(folder / f"{split}_databases" / db_id / f"{db_id}.sqlite", tables, fks)
                entries.append(tables_entry(db_id, tables, fks))
        (folder / f"{split}_tables.json").write_text(json.dumps(entries, indent=1))
        (folder / f"{split}.json").write_text(json.dumps(QUESTIONS[split], indent=1))
    return root
