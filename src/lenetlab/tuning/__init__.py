"""`lenetlab tune`: a search of recipe fields with Optuna, on lenetlab's engines, chosen on validation.

    study.py     the Optuna study: its journal in the run folder, the seeded sampler, the pruner
    referee.py   each epoch's validation accuracy told to the study, and the pruner's answer
    search.py    the search: trials asked while the budget lasts, run on the pool or Ray, told back
    run.py       start and resume: the search, best.toml, the confirmation on the test set, the report
    summary.py   tune.json: every trial, the best, the fields' importance
    report.py    report.md and report.html of a search
    results.py   open_run's view of a search: the confirmation table and the trials
    tracking.py  the search in MLflow: a parent run and a nested run per trial

Optuna is the tune extra (pip install 'lenetlab[tune]'); nothing here is imported by the other
commands, and the spec's checks (tunespec.py) need neither Optuna nor torch.
"""
