"""The generator actors: K completions per prompt from the current policy, and weight updates.

Backends: vLLM (``online.generator.backend`` ``vllm``, or ``auto`` where vLLM is installed) or
transformers ``generate``. Completions are returned as the token ids the policy sampled (cut after the
first EOS, which is kept) and as decoded text for the judge: training then scores exactly the tokens
that were generated, as TRL's OnlineDPOTrainer does, not a re-tokenization of the text.
"""

from __future__ import annotations

import importlib.util
import os
import time


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``vllm`` where the package is importable, else ``hf``."""
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return backend


def cut_completion(ids: list[int], eos_id: int | None, pad_id: int | None, limit: int) -> list[int]:
    """A generated continuation up to and including its first EOS, padding dropped, at most ``limit`` tokens."""
    out = []
    for t in ids[:limit]:
        if t == eos_id:
            out.append(t)
            break
        if t == pad_id:  # padding after a finished sequence (pad != eos)
            break
        out.append(t)
    return out


class HfEngine:
    """transformers ``generate`` on the actor's device; prompts left-padded into one batch."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, threads: int):
        import torch

        from raydpo.models import load_causal_lm

        self.torch = torch
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_path, dtype, trust_remote_code, frozen=True, device=self.device)

    def generate(self, prompts: list[list[int]], n: int, params: dict, seed: int, pad_id: int) -> list[list[list[int]]]:
        """[P prompts] -> [P][n] raw continuations (token ids, possibly padded)."""
        torch = self.torch
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        greedy = params["greedy"]
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=params["max_new_tokens"],
                do_sample=not greedy, num_return_sequences=n, pad_token_id=pad_id,
                **({} if greedy else {"temperature": params["temperature"], "top_p": params["top_p"], "top_k": params["top_k"] or None}),
            )
        new = out[:, width:].tolist()
        return [new[i * n:(i + 1) * n] for i in range(len(prompts))]

    def load_weights(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=True)

    def weights(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


class VllmEngine:
    """vLLM's offline engine; new weights go in through its workers' ``reload_weights`` (in place,
    from tensors), so no file is written and the engine is not rebuilt."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, max_model_len: int, gpu_memory_utilization: float):
        # The engine in this actor's process: weight updates then reach the model directly, with no
        # engine-core subprocess to serialize them to.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from raydpo.models import resolve_local

        self.llm = LLM(model=resolve_local(model_path), dtype=dtype, trust_remote_code=trust_remote_code, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False)

    def generate(self, prompts: list[list[int]], n: int, params: dict, seed: int, pad_id: int) -> list[list[list[int]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = params["greedy"]
        sampling = SamplingParams(n=n, max_tokens=params["max_new_tokens"], seed=seed, temperature=0.0 if greedy else params["temperature"],
                                  top_p=1.0 if greedy else params["top_p"], top_k=(params["top_k"] or -1) if not greedy else -1)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]

    def _apply(self, fn):
        if hasattr(self.llm, "apply_model"):
            return self.llm.apply_model(fn)
        return [fn(self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model)]

    def load_weights(self, state: dict) -> None:
        # vLLM's in-place reload (its RL weight-update path): checkpoint-format names and tensors,
        # re-processed into the kernels' layout (a plain model.load_weights fails once the CPU or
        # quantized kernels have repacked the weights).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items()), "is_checkpoint_format": True})

    def weights(self) -> dict:
        return self._apply(lambda model: {k: v.detach().cpu() for k, v in model.state_dict().items()})[0]


class Generator:
    """A Ray actor holding one copy of the policy for sampling.

    ``params`` of :meth:`generate`: ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
    ``greedy``. ``max_length``: prompt + completion tokens are capped at it (``data.max_length``).
    """

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, backend: str, max_length: int,
                 threads: int = 1, gpu_memory_utilization: float = 0.3, workers_dir: str | None = None):
        from raydpo.models import load_tokenizer

        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.max_length = max_length
        self.backend = resolve_backend(backend)
        if self.backend == "vllm":
            self.engine = VllmEngine(model_path, dtype, trust_remote_code, max_length, gpu_memory_utilization)
        else:
            self.engine = HfEngine(model_path, dtype, trust_remote_code, threads)
        if workers_dir:
            from raydpo.observability.workers import record

            record(workers_dir, f"generator-{os.getpid()}", backend=self.backend)

    def generate(self, prompts: list[list[int]], n: int, params: dict, seed: int) -> dict:
        """``n`` completions per prompt -> {"ids": [P][n] token lists, "texts": [P][n] decoded strings,
        "tokens": completion tokens generated, "seconds": generation wall time in this actor}."""
        tok = self.tokenizer
        start = time.perf_counter()
        raw = self.engine.generate(prompts, n, params, seed, tok.pad_token_id)
        ids = [[cut_completion(c, tok.eos_token_id, tok.pad_token_id, self.max_length - len(p)) for c in cs]
               for p, cs in zip(prompts, raw)]
        texts = [[tok.decode(c, skip_special_tokens=True) for c in cs] for cs in ids]
        return {"ids": ids, "texts": texts, "tokens": sum(len(c) for cs in ids for c in cs), "seconds": time.perf_counter() - start}

    def load_weights(self, state: dict) -> int:
        """Replace the policy's weights (a full state dict of the Hugging Face model); returns os.getpid()."""
        self.engine.load_weights(state)
        return os.getpid()

    def weights(self) -> dict:
        """The current weights (CPU tensors), for checks."""
        return self.engine.weights()

    def pid(self) -> int:
        return os.getpid()
