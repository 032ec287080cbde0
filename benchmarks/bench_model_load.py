"""Time loading a model from starshard's cache, each run in a fresh Python process (CPU).

python benchmarks/bench_model_load.py [--model default] [--runs 5] [--out FILE]

Each run starts a new interpreter and times, in order: importing torch and transformers'
model classes (paid once per process by any program that uses a Hugging Face model), reading
the model (``AutoModelForCausalLM.from_pretrained`` on the cached safetensors directory, which
``resolve_model_path`` returns without converting once the cache exists) and the tokenizer.
The first run converts the GGUF if the cache is empty; its times are reported apart. Prints the
medians and writes them to ``benchmarks/results/bench_model_load.json`` (or --out).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import RESULTS, env_info, write_json  # noqa: E402

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
from starshard import models
path = models.resolve_model_path(sys.argv[1])
t2 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
t3 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
t4 = time.perf_counter()
assert model.config.vocab_size >= len(tok) > 0
print(json.dumps(dict(imports_s=t1 - t0, resolve_s=t2 - t1, model_s=t3 - t2, tokenizer_s=t4 - t3)))
"""

KEYS = ("imports_s", "resolve_s", "model_s", "tokenizer_s")


def run_once(model, env):
    res = subprocess.run([sys.executable, "-c", _CHILD, model], capture_output=True, text=True,
                         env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"load run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default' or a local model path")
    ap.add_argument("--runs", type=int, default=5, help="timed runs after the first (default 5)")
    ap.add_argument("--out", default=str(RESULTS / "bench_model_load.json"))
    a = ap.parse_args(argv)
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), "..", "src"), os.environ.get("PYTHONPATH", "")]))
    first = run_once(a.model, env)
    runs = [run_once(a.model, env) for _ in range(a.runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in KEYS}
    med["load_s"] = med["resolve_s"] + med["model_s"] + med["tokenizer_s"]
    print(f"first run (converts when the cache is empty): "
          + ", ".join(f"{k} {first[k]:.2f}" for k in KEYS))
    print(f"median of {a.runs} runs: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    write_json(a.out, dict(benchmark="bench_model_load", **env_info(), model=a.model,
                           cpus=os.cpu_count(), first_run=first, runs=runs, median=med))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
