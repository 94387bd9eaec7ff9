"""Built-in studies and their registry, the standard pipeline (train → analyze → report) and sweeps.

Names are imported from their submodules on first use, so the command line starts without torch."""

import importlib

_EXPORTS = {
    **dict.fromkeys(["prepare_run_dir", "run_lock", "run_pipeline", "run_study", "run_sweep", "sweep_configs"],
                    "pipeline"),
    **dict.fromkeys(["STUDIES", "Study", "get_study", "register_study", "study_names"], "registry"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
