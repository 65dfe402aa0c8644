"""The house rules, read from the source with `ast` (nothing is imported): no import circle, only the CLI knows
argv, evaluation imports no torch and no training or inference code, data knows no stage, stages meet only through
files, and the Python API runs the pipeline end to end."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sqltune"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> every module it imports, at the top or inside a function (lazy imports count too)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        found[name] = targets
    known = set(found)
    return {m: {t for t in ts if t in known and t != m} | {t.split(".")[0] for t in ts if t.split(".")[0] != "sqltune"}
            for m, ts in found.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    """Pins the cli <-> pipeline/trace/models/demo circle of issue #11: no module may reach itself by imports."""
    graph = {m: {t for t in ts if t.startswith("sqltune")} for m, ts in imports().items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_only_the_cli_knows_argv():
    """No module but sqltune.cli (and __main__, which calls it) imports the CLI or reads sys.argv."""
    for module, targets in imports().items():
        if module in ("sqltune.cli", "sqltune.__main__"):
            continue
        assert not any(t == "sqltune.cli" or t.startswith("sqltune.cli.") for t in targets), module
    for path in PACKAGE.rglob("*.py"):
        if path.name != "cli.py":
            assert "sys.argv" not in path.read_text(), path


def test_evaluation_imports_no_torch_nor_stages():
    for module, targets in imports().items():
        if module.startswith("sqltune.eval"):
            bad = {t for t in targets if t in ("torch", "transformers", "peft", "trl")
                   or t.startswith(("sqltune.train", "sqltune.infer", "sqltune.loading", "sqltune.pipeline"))}
            assert not bad, (module, bad)


def test_data_knows_no_stage():
    for module, targets in imports().items():
        if module.startswith("sqltune.data"):
            # prepare --drop_failing_gold runs train gold queries in the sandbox (sqltune.sandbox), not evaluation
            bad = {t for t in targets if t.startswith(("sqltune.train", "sqltune.infer", "sqltune.eval",
                                                       "sqltune.pipeline", "sqltune.stages", "torch"))}
            assert not bad, (module, bad)


def test_stages_meet_through_files():
    """Training never imports inference, and inference never imports training; inference may use EX's rules (to
    group candidates as EX scores them), nothing else of evaluation. One exception in training: the GRPO reward
    (sqltune.train.reward) reads a completion's SQL as predict does (sqltune.infer.extract) and scores it as EX
    does (sqltune.eval.execution), nothing else of either."""
    reward = {"sqltune.infer.extract", "sqltune.eval.execution", "sqltune.infer", "sqltune.eval"}
    for module, targets in imports().items():
        if module.startswith("sqltune.train"):
            allowed = reward if module == "sqltune.train.reward" else set()
            assert not any(t.startswith(("sqltune.infer", "sqltune.eval")) and t not in allowed
                           for t in targets), module
        if module.startswith("sqltune.infer"):
            assert not any(t.startswith("sqltune.train") for t in targets), module
            assert all(t.startswith(("sqltune.eval.answers", "sqltune.eval.execution"))
                       or t == "sqltune.eval" for t in targets if t.startswith("sqltune.eval")), module


def test_the_sandbox_imports_no_stage():
    """sqltune.sandbox is the one executor that data, inference and evaluation import: it imports none of them
    (nor torch), so a worker process starts light and a stage never reaches another through it."""
    for module, targets in imports().items():
        if module.startswith("sqltune.sandbox"):
            bad = {t for t in targets if t.startswith(("sqltune.data", "sqltune.eval", "sqltune.infer",
                                                       "sqltune.train", "sqltune.pipeline", "torch", "transformers"))}
            assert not bad, (module, bad)


def test_all_sql_runs_through_the_sandbox():
    """Only sqltune.sandbox opens a connection for model-written or gold SQL: no other module imports its
    read-only connection or runs queries on its own (the demo data builder writes its own databases)."""
    for module, targets in imports().items():
        if not module.startswith("sqltune.sandbox"):
            assert "sqltune.sandbox.readonly" not in targets, module
