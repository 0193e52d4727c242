"""raygrad: how strongly each dimension of each layer affects a causal LM's loss."""

from .analysis.results import Results, load_results, open_results  # noqa: E402
from .config import RunConfig  # noqa: E402
from .constants import VERSION as __version__  # noqa: E402
from .store import stats  # noqa: E402  (statistics derived from a store's sums)


def run(config: RunConfig | None = None, **options):
    """Run raygrad from Python: `raygrad.run(model="smollm2-135m", num_samples=8)`.

    Returns the run's output directory."""
    from .engine import run as run_engine

    return run_engine(config or RunConfig(**options), progress=False)


def top_examples(run_dir, layer: int, feature: int, by: str = "gradients", k: int | None = None, context: int = 8):
    """A run's top tokens for one feature (--top-examples), best first, each with its row, position, score,
    token, the token it predicts and the text around it (re-read from the dataset and checked):
    `raygrad.top_examples(run_dir, layer=3, feature=117)`. Raises RaygradError (one line) as the CLI says it;
    warns (UserWarning) when the run is not complete, as its tables then hold its finished shards' only."""
    import warnings

    from .analysis.examples import RunExamples

    examples = RunExamples(run_dir)
    unfinished = examples.unfinished()
    if unfinished:
        warnings.warn(unfinished, stacklevel=2)
    return examples.examples(layer, feature, by, k, context)


__all__ = ["RunConfig", "Results", "load_results", "open_results", "run", "stats", "top_examples", "__version__"]
