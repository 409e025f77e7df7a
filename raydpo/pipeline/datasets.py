"""The stages as functions on ``ray.data.Dataset``, for pipelines that make their own pairs.

    pairs  = tokenize_pairs(rows, cfg)        # preference rows -> kept pairs with token ids
    scored = score_pairs(pairs, cfg)          # + ref_chosen_logps / ref_rejected_logps (cached)
    result = train_on_pairs(scored, cfg)      # Ray Train + DeepSpeed -> RunResult (model path, metrics)

``raydpo.run(config)`` chains the same stages from files. Rows are dicts with ``prompt``, ``chosen``
and ``rejected`` in any format the data stage reads; quarantined rows go to ``output.dir``'s
``quarantine.jsonl`` as in a file run. Nothing is written between the stages but the reference
cache and the run directory.
"""

from __future__ import annotations

from raydpo.config import Config


def tokenize_pairs(rows, cfg: Config):
    """Validate, normalize and tokenize preference rows (a ``ray.data.Dataset``); returns the kept
    pairs (materialized, input order). ``data.max_bad_fraction`` applies as for files."""
    from raydpo.pipeline.offline import prepare_data
    from raydpo.pipeline.rundir import start

    start(cfg)
    return prepare_data(cfg, train=rows).train


def score_pairs(pairs, cfg: Config):
    """Add the reference log-probs to tokenized pairs on the reference actor pool, through the cache
    (a repeated call on the same pairs loads no model); returns the scored, input-ordered dataset."""
    from raydpo.data.stage import tokenize_settings
    from raydpo.models import load_tokenizer
    from raydpo.reference.stage import run_reference

    pad_id = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code).pad_token_id
    return run_reference(pairs, cfg, pad_id, tokenize_settings(cfg).__dict__).dataset


def train_on_pairs(pairs, cfg: Config, eval_pairs=None):
    """Train the policy on scored pairs (tokenized ones for reference-free losses); returns a
    :class:`raydpo.pipeline.RunResult` whose ``model_path`` is the exported policy.

    Always a fresh training: whatever an earlier run left in ``output.dir`` (checkpoints, metrics,
    model) is replaced, since these pairs need not be the ones those checkpoints were made on."""
    from raydpo.pipeline.offline import RunResult
    from raydpo.pipeline.plan import plan_run
    from raydpo.pipeline.rundir import save_tokenizer, start
    from raydpo.train.preflight import check_storage, preflight
    from raydpo.train.resume import prepare_run_dir
    from raydpo.train.stage import guard_config, run_training

    check_storage(cfg)
    plan = plan_run(cfg)
    prepare_run_dir(plan.paths, {}, plan.run_storage, force=True)
    paths = start(cfg)
    preflight(cfg, plan.model_dir)
    n_train, n_eval = pairs.count(), eval_pairs.count() if eval_pairs is not None else 0
    outcome, steps = run_training(plan, pairs, eval_pairs, n_train, n_eval, guard_config(plan, None))
    save_tokenizer(plan.tokenizer, paths["model"])
    trained, metrics = outcome["result"], outcome["rows"]
    summary = {"steps": trained["steps"], "steps_per_epoch": steps.steps_per_epoch, "pairs": n_train,
               "final_metrics": trained["final"], "final_eval_metrics": trained["final_eval"]}
    return RunResult(paths["dir"], paths["model"], summary, metrics)
