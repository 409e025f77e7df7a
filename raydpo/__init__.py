"""raydpo: Direct Preference Optimization at cluster scale on Ray."""

from raydpo.config import Config, ConfigError, load as load_config

__version__ = "0.1.0"


def run(config):
    """Run the whole pipeline; ``config`` is a :class:`Config` or a path to a YAML file."""
    from raydpo.pipeline import run as _run

    return _run(load_config(config) if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__") else config)


from raydpo.pipeline.datasets import score_pairs, tokenize_pairs, train_on_pairs  # noqa: E402  (the stages on Datasets)



def run_online(config, prompts=None, eval_prompts=None, force: bool = False, on_round=None):
    """Online / iterative DPO rounds (``raydpo online``); ``config`` a :class:`Config` or a YAML path,
    ``prompts`` / ``eval_prompts`` optional ``ray.data.Dataset`` s of prompt rows. See
    :func:`raydpo.online.run.run_online`."""
    from raydpo.online.run import run_online as _run_online

    cfg = load_config(config) if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__") else config
    return _run_online(cfg, prompts, eval_prompts, force, on_round)


def __getattr__(name: str):
    # DPO / DPOOutput import torch: loaded on first use so `import raydpo` (and the CLI) stays light.
    if name in ("DPO", "DPOOutput"):
        from raydpo.objectives import module

        return getattr(module, name)
    raise AttributeError(f"module 'raydpo' has no attribute {name!r}")


__all__ = ["DPO", "DPOOutput", "Config", "ConfigError", "load_config", "run", "run_online", "score_pairs", "tokenize_pairs", "train_on_pairs", "__version__"]
