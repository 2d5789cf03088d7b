"""The package version (one place; `gpt2onnx.__version__` and the manifests read it)."""

__version__ = "0.1.0"


def package_versions(names) -> dict[str, str]:
    """gpt2onnx's version and those of the installed packages among `names` (the one version list reader).

    >>> package_versions(["numpy", "no-such-package"])["gpt2onnx"] == __version__
    True
    """
    import importlib.metadata

    out = {"gpt2onnx": __version__}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
