"""The tuning strategies: the registry of what each one trains and adds (registry.py), how they change a model
(build.py), the model as training sees it (model.py), and what a run saves (export.py)."""
