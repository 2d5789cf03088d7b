"""Optional integrations with serving and data platforms: `azureml` (+ `azureml_kit`),
`azureml_batch`, `azureml_bench_kit`, `mlflow` (+ `mlflow_pyfunc`), `ray`.

Each module imports its platform only when used, so importing one never fails for lack of its
extra, and the CLI registers their commands without paying for the import. The batch
integrations (Azure ML batch, Ray) run their rows in memory through the core of ``gpt2onnx
batch``, `gpt2onnx.batch.iter_results`, so a row is parsed, validated, batched and reported
exactly as in a CLI job, without its files::

    from gpt2onnx.batch import iter_results
    list(iter_results(gen, [{"id": "a", "prompt": "Hello"}], params={"max_new_tokens": 5}))
    # -> [{'id': 'a', 'line': 1, 'index': 0, 'text': 'Hello, ...', ...}]
"""


def deployment_log():
    """The logger of the Azure ML entry scripts, writing to stdout (what the deployment's logs show).

    The entry script is the application there, so it, not the library, attaches the handler:
    once, to the ``gpt2onnx.deployment`` logger only.
    """
    import logging
    import sys

    log = logging.getLogger("gpt2onnx.deployment")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log

