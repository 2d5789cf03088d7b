"""Helpers the tests share, imported by name: ``from helpers.models import save_tiny_gpt2``.

`paths` (the repository, the shared folder, test data), `models` (tiny random GPT-2s and
their tokenizer), `threads`, `azureml` (a real azmlinfsrv), and the tables several surfaces
run through: `bad_requests`, `damaged_folders`, `random_inputs`; `row_probe` (the whole-graph
batch-invariance probe, also a script). Fixtures stay in tests/conftest.py. pytest puts
tests/ and export/ (the export recipes, e.g. ``outliers``) on sys.path (pyproject.toml).
"""
