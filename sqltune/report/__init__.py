"""The run's page and the report plots: `report.html` in a run folder (one self-contained page: the stages with their
time and memory, the training curves, EX/EM per level for every arm, the failure kinds, links to the run's files),
written by `sqltune run` and by `sqltune trace show RUN --html FILE`; the plots are also drawn into evaluate's
`--report` folder.

    page.py      what the page shows, read from a run folder's files (trace, config, training log, evaluations)
    plots.py     the plots, with matplotlib, as PNG
    render.py    the page from its template (page.html.j2, shipped as package data), written atomically
"""
