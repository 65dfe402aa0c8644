"""Spider evaluation: parsing, hardness, exact set match, safe execution, value plugging, scores and reports.

Nothing in this package imports torch: `sqltune evaluate` starts in well under a second and runs anywhere.
"""
