"""fedkd: federated, privacy-preserving knowledge distillation on Flower and Ray.

Quick start::

    import fedkd
    result = fedkd.run()  # the quick-start experiment (MNIST-1D, 10 clients)
    print(result.summary.final)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "Config",
    "ConfigError",
    "RunError",
    "RunResult",
    "SeedsResult",
    "load_config",
    "resume",
    "run",
    "run_many",
]

if TYPE_CHECKING:
    from fedkd.config import Config, ConfigError, load_config
    from fedkd.runner import RunError, RunResult, SeedsResult, resume, run
    from fedkd.sweep import run_many


def __getattr__(name: str) -> Any:
    # Lazy: `import fedkd` stays cheap (Ray workers import only what they use).
    if name in ("Config", "ConfigError", "load_config"):
        from fedkd import config

        return getattr(config, name)
    if name == "run_many":
        from fedkd.sweep import run_many

        return run_many
    if name in ("run", "resume", "RunResult", "RunError", "SeedsResult"):
        from fedkd import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'fedkd' has no attribute {name!r}")
