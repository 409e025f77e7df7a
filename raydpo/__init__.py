"""raydpo: Direct Preference Optimization at cluster scale on Ray."""

from raydpo.config import Config, ConfigError, load as load_config

__version__ = "0.1.0"


def run(config):
    """Run the whole pipeline; ``config`` is a :class:`Config` or a path to a YAML file."""
    from raydpo.pipeline import run as _run

    return _run(load_config(config) if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__") else config)


from raydpo.api import score_pairs, tokenize_pairs, train_on_pairs  # noqa: E402  (the stages on Datasets)



def __getattr__(name: str):
    # DPO / DPOOutput import torch: loaded on first use so `import raydpo` (and the CLI) stays light.
    if name in ("DPO", "DPOOutput"):
        from raydpo import dpo

        return getattr(dpo, name)
    raise AttributeError(f"module 'raydpo' has no attribute {name!r}")


__all__ = ["DPO", "DPOOutput", "Config", "ConfigError", "load_config", "run", "score_pairs", "tokenize_pairs", "train_on_pairs", "__version__"]
