"""The ground floor: settings, errors, file helpers, the data model, its validation rules and the raw store.

Every other package may import it; it imports none of them, and no orchestration, tracking or web framework
(Prefect, MLflow, FastAPI), so a command can check its arguments before anything heavy loads.
"""
