"""unipruning inside other tools' pipelines: `llmcompressor.UniPruningModifier` (the `llmcompressor` extra).
Nothing here is imported by `import unipruning`."""


def not_importable(module: str, dist: str, tested: str, extra: str, exc: ImportError) -> str:
    """One line for an integration `module` whose package does not import: absent (install the extra), or installed but
    broken, e.g. beside a transformers it does not support (the cause, and the version the extra pins)."""
    import importlib.metadata

    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return f"{module} needs {tested}, which is not installed: pip install 'unipruning[{extra}]'"
    return (f"{dist} {version} is installed but does not import ({exc}); {module} is tested with {tested} "
            f"and the versions it pins: pip install 'unipruning[{extra}]'")
