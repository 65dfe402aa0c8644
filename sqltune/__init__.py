"""sqltune: turn an open causal LLM into a Text-to-SQL model.

Stages (each one function taking one typed config): prepare -> train -> merge -> predict -> evaluate,
and `run`, which chains them from one YAML file.
"""

__version__ = "0.1.0"
