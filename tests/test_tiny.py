"""The tiny model, its tokenizer and the synthetic task."""

import json

from raydpo.fixtures.synthetic import make_pairs, write_task


def test_tiny_model_loads_with_auto_classes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    ids = tok("Count on from apple: tiger")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "Count on from apple: tiger"
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>\nhi\n<|assistant|>\n"
    assert model(**tok(["hello"], return_tensors="pt")).logits.shape[-1] == len(tok)


def test_cli_sizes(tmp_path):
    from raydpo.cli import main
    from transformers import AutoConfig

    assert main(["tiny-model", str(tmp_path / "m"), "--hidden-size", "64", "--num-layers", "3", "--num-heads", "2"]) == 0
    cfg = AutoConfig.from_pretrained(tmp_path / "m")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 3, 128)


def test_synthetic_task_is_deterministic_and_follows_rule():
    from raydpo.fixtures.synthetic import WORDS

    assert make_pairs(50, seed=3) == make_pairs(50, seed=3) != make_pairs(50, seed=4)
    for row in make_pairs(200, seed=0):
        start = row["prompt"].removeprefix("Count on from ").removesuffix(":")
        good = row["chosen"].split()
        expected = [WORDS[(WORDS.index(start) + 1 + i) % len(WORDS)] for i in range(len(good))]
        assert good == expected
        bad = row["rejected"].split()
        assert len(bad) == len(good) and bad != good


def test_eval_pairs_are_not_in_train(tmp_path):
    train, evals = write_task(tmp_path, n_train=500, n_eval=100, seed=1)
    t = {l for l in open(train)}
    e = [l for l in open(evals)]
    assert len(e) == 100 and not t & set(e)
    assert all(set(json.loads(l)) == {"prompt", "chosen", "rejected"} for l in e)
