"""raygrad: how strongly each dimension of each layer affects a causal LM's loss."""

__version__ = "0.1.0"

from . import stats  # noqa: E402  (statistics derived from a store's sums)
from .config import RunConfig  # noqa: E402
from .results import Results, load_results, open_results  # noqa: E402


def run(config: RunConfig | None = None, **options):
    """Run raygrad from Python: `raygrad.run(model="smollm2-135m", num_samples=8)`.

    Returns the run's output directory."""
    from .engine import run as run_engine

    return run_engine(config or RunConfig(**options), progress=False)


__all__ = ["RunConfig", "Results", "load_results", "open_results", "run", "stats", "__version__"]
