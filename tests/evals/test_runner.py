"""`starshard eval` end to end on a tiny random model: files, agreement, resume, errors."""
import json
import re

import pytest

from starshard.cli import main
from starshard.evals import runner
from starshard.evals.runner import (Variant, length_label, load_records, make_variants, parse_length,
                                    parse_lengths)
from starshard.star.testing import save_tiny_model

TASKS = "passkey,niah_single"
LENGTHS = "80,112"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model-eval"), seed=0))


def eval_args(tiny_dir, out, *extra, samples=2, methods="dense,star,ring"):
    return ["eval", "--model", tiny_dir, "--methods", methods, "--tasks", TASKS, "--lengths", LENGTHS,
            "--samples", str(samples), "--out", str(out), "--no-progress", "--bootstrap", "200", *extra]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---- pieces ---------------------------------------------------------------------------------------

def test_lengths():
    assert parse_length("2k") == 2048 and parse_length("1.5K") == 1536 and parse_length("300") == 300
    assert parse_lengths("2k, 4k") == [2048, 4096]
    assert length_label(4096) == "4k" and length_label(300) == "300"
    for bad in ("2x", "0", "-1k", "1.3", ""):
        with pytest.raises(ValueError, match="length"):
            parse_lengths(bad) if bad == "" else parse_length(bad)
    with pytest.raises(ValueError, match="repeat"):
        parse_lengths("2k,2048")


def test_variants_and_sizes():
    assert [v.label for v in make_variants(["dense", "star", "ring"])] == ["dense", "star", "ring"]
    vs = make_variants(["star"], blocks=[2, 4], anchors=["none", "quarter", "full"])
    assert [v.label for v in vs] == ["star[b2,a=none]", "star[b2,a=quarter]", "star[b2,a=full]",
                                     "star[b4,a=none]", "star[b4,a=quarter]", "star[b4,a=full]"]
    assert vs[0].sizes(101, 1) == (51, 0)
    assert vs[4].sizes(101, 1) == (26, 6)
    assert vs[5].sizes(101, 1) == (26, 26)
    assert make_variants(["star"], block_size=32, anchor_size=8)[0].sizes(500, 1) == (32, 8)
    assert Variant("star", "star").sizes(400, 10 ** 6) == (100, 100)      # the engine's 4 blocks
    assert Variant("dense", "dense").sizes(400, 1) == (None, None)
    with pytest.raises(ValueError, match="not both"):
        make_variants(["star"], blocks=[2], block_size=8)
    with pytest.raises(ValueError, match="exceed"):
        make_variants(["star"], block_size=8, anchor_size=9)
    with pytest.raises(ValueError, match="method"):
        make_variants(["sparse"])


# ---- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def first_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    assert main(eval_args(tiny_dir, out)) == 0
    return out


def test_files_exist_and_agree(first_run):
    out = first_run
    recs = lines(out / "results.jsonl")
    assert len(recs) == 2 * 2 * 2 * 3                       # tasks x lengths x samples x methods
    for r in recs:
        for k in ("task", "length", "method", "prompt_sha256", "expected", "answer", "correct",
                  "score", "timings"):
            assert k in r
        assert r["context_tokens"] + r["query_tokens"] <= r["length"]
        assert r["correct"] == (r["score"] >= 1.0)
    # the same prompt (token ids) for every method of a sample
    by_sample = {}
    for r in recs:
        by_sample.setdefault((r["task"], r["length"], r["sample"]), set()).add(r["prompt_sha256"])
    assert all(len(h) == 1 for h in by_sample.values()) and len(by_sample) == 8
    # ring is exact: the same greedy tokens as dense
    toks = {(r["task"], r["length"], r["sample"], r["method"]): r["tokens"] for r in recs}
    for (t, n, i, m), tk in toks.items():
        if m == "ring":
            assert tk == toks[(t, n, i, "dense")]
    star = [r for r in recs if r["method"] == "star"]
    assert all(r["block_size"] == -(-r["context_tokens"] // 4) and r["anchor_size"] == r["block_size"]
               and len(r["timings"]["phase1_s"]) == 4 for r in star)
    # the table's accuracies are the JSONL's
    md = (out / "report.md").read_text()
    for task in TASKS.split(","):
        for n in (80, 112):
            for m in ("dense", "star", "ring"):
                cell = [r["score"] for r in recs if (r["task"], r["length"], r["method"]) == (task, n, m)]
                row = re.search(rf"\| {task} \| {n} \| {re.escape(m)} \| 2 \| ([0-9.]+) \[", md)
                assert row, (task, n, m)
                assert float(row.group(1)) == pytest.approx(sum(cell) / len(cell), abs=0.005)
    for png in ("accuracy.png", "time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_answers(first_run, tiny_dir, tmp_path, monkeypatch, cli):
    out = tmp_path / "resume"
    out.mkdir()
    (out / "results.jsonl").write_text((first_run / "results.jsonl").read_text())
    before = (out / "results.jsonl").read_text()

    def boom(*a, **k):
        raise AssertionError("a finished answer was run again")
    monkeypatch.setattr(runner, "_run_one", boom)
    code, stdout, _ = cli(eval_args(tiny_dir, out))
    assert code == 0 and (out / "results.jsonl").read_text() == before
    assert "(24 answers)" in stdout
    monkeypatch.undo()

    # an interrupted write: the torn last line is dropped, that one answer runs again
    text = before.splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(text[:-1]) + text[-1][:40])
    calls = []
    real = runner._run_one
    monkeypatch.setattr(runner, "_run_one", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, _, _ = cli(eval_args(tiny_dir, out))
    assert code == 0 and len(calls) == 1
    recs = lines(out / "results.jsonl")
    assert len(recs) == 24 and recs[-1]["tokens"] == json.loads(text[-1])["tokens"]

    # one more sample: only its answers run
    calls.clear()
    code, stdout, _ = cli(eval_args(tiny_dir, out, samples=3))
    assert code == 0 and len(calls) == 2 * 2 * 3 and "(36 answers)" in stdout
    assert len(load_records(out / "results.jsonl")) == 36


def test_report_covers_the_whole_folder(first_run, tiny_dir, tmp_path, monkeypatch, cli):
    """A later round of one method (its answers already there) still reports every method and
    every sample in the folder."""
    out = tmp_path / "rounds"
    out.mkdir()
    (out / "results.jsonl").write_text((first_run / "results.jsonl").read_text())
    monkeypatch.setattr(runner, "_run_one", lambda *a, **k: pytest.fail("nothing should run"))
    code, stdout, _ = cli(eval_args(tiny_dir, out, methods="ring", samples=1))
    assert code == 0 and "(4 answers)" in stdout          # the plan: 2 tasks x 2 lengths x 1
    md = (out / "report.md").read_text()
    assert "covers all 24 answers" in md and "4 of them in this run's plan" in md
    for m in ("dense", "star", "ring"):
        assert re.search(rf"\| passkey \| 80 \| {m} \| 2 \| ", md), m
        assert re.search(rf"\| {m} \| 8 \| ", md), m     # overall rows


def test_ablation_labels(tiny_dir, tmp_path, cli):
    code, stdout, err = cli(["eval", "--model", tiny_dir, "--methods", "dense,star", "--tasks", "passkey",
                             "--lengths", "96", "--samples", "1", "--blocks", "2,4", "--anchor",
                             "none,quarter,full", "--out", str(tmp_path), "--no-progress",
                             "--bootstrap", "100"])
    assert code == 0, err
    recs = lines(tmp_path / "results.jsonl")
    got = {r["method"]: (r["blocks"], r["block_size"], r["anchor_size"]) for r in recs}
    n = recs[0]["context_tokens"]
    b2, b4 = -(-n // 2), -(-n // 4)
    assert got == {"dense": (None, None, None),
                   "star[b2,a=none]": (2, b2, 0), "star[b2,a=quarter]": (2, b2, b2 // 4),
                   "star[b2,a=full]": (2, b2, b2), "star[b4,a=none]": (4, b4, 0),
                   "star[b4,a=quarter]": (4, b4, b4 // 4), "star[b4,a=full]": (4, b4, b4)}
    assert "| passkey | 96 | star[b4,a=quarter] | 1 |" in stdout


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--methods", "dense,sparse"], "expected methods among dense,star,ring"),
    (["--tasks", "passkey,nope"], "unknown task(s) nope"),
    (["--lengths", "2x"], "--lengths"),
    (["--samples", "0"], "--samples: expected a positive int"),
    (["--hosts", "0"], "--hosts: expected a positive int"),
    (["--blocks", "2,4", "--block-size", "64"], "--blocks and --block-size exclude each other"),
    (["--anchor", "half"], "anchors among none,quarter,full"),
    (["--block-size", "16", "--anchor-size", "17"], "must not exceed --block-size"),
    (["--methods", "dense,ring", "--blocks", "2"], "need star in --methods"),
])
def test_bad_arguments(tiny_dir, tmp_path, cli, extra, message):
    argv = ["eval", "--model", tiny_dir, "--out", str(tmp_path / "o"), "--no-progress", *extra]
    code, _, err = cli(argv)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_missing_out_and_file_out(tiny_dir, tmp_path, cli):
    code, _, err = cli(["eval", "--model", tiny_dir])
    assert code == 2 and "--out is required" in err
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = cli(["eval", "--model", tiny_dir, "--out", str(f)])
    assert code == 2 and "is not a folder" in err


def test_runtime_errors_are_one_line(tiny_dir, tmp_path, cli):
    code, _, err = cli(["eval", "--model", tiny_dir, "--lengths", "20", "--out", str(tmp_path),
                        "--no-progress"])
    assert code == 1 and "starshard eval: error: task passkey at length 20: too short" in err
    assert "Traceback" not in err
    code, _, err = cli(["eval", "--model", str(tmp_path / "missing"), "--out", str(tmp_path),
                        "--no-progress"])
    assert code == 1 and "does not exist" in err


def test_answer_text_keeps_lists_across_lines():
    from starshard.evals.runner import _answer_text
    assert _answer_text(" 12345.\nThe pass key is 999", multi=False) == "12345."
    # a list answer may put one item per line; it ends at the first blank line
    assert _answer_text(" 1. apple\n2. pear\n3. plum\n\nOther text", multi=True) == \
        "1. apple\n2. pear\n3. plum"
    # a colon and a blank line after the pre-filled words open the list, they do not end it
    assert _answer_text(":\n\n1. 8607732\n2. 7259238\n\nOther", multi=True) == "1. 8607732\n2. 7259238"
    assert _answer_text(":\n- 42\nmore", multi=False) == "42"


def test_generation_stops_after_the_answer_not_before():
    from starshard.evals.runner import _stop_at_line

    class Tok:
        def decode(self, tokens, skip_special_tokens=True):
            return "".join(tokens)
    multi, single = _stop_at_line(Tok(), True), _stop_at_line(Tok(), False)
    assert not multi([":", "\n\n"]) and not multi([":", "\n\n", "1. 86"])
    assert multi([":", "\n\n", "1. 86", "\n2. 72", "\n\n"])
    assert not single([" ", "\n"]) and single([" 12345", ".\n"])


def test_device_reaches_the_model_loader(monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    def fake_load(path, **kw):
        seen.update(kw)
        raise Stop

    import starshard.models
    monkeypatch.setattr(starshard.models, "load_model", fake_load)
    cfg = runner.EvalConfig(model="default", tasks=["passkey"], lengths=[512], samples=1,
                            variants=make_variants(["dense"]), out=str(tmp_path), device="cuda:1",
                            progress=False)
    with pytest.raises(Stop):
        runner.run_eval(cfg)
    assert seen["device"] == "cuda:1"


def test_prompts_are_sized_under_the_position_cap():
    """A prompt cut to fit the model's positions fits, though the generators size in sentences."""
    from starshard.evals import TASKS
    from starshard.star.testing import tiny_tokenizer
    tok = tiny_tokenizer()
    for task in sorted(TASKS):
        for seed in range(4):
            for length, cap in ((400, 10_000), (400, 390), (700, 640)):
                p = runner._prepare(task, length, seed, tok, cap, None)
                total = len(p.context_ids) + len(p.query_ids)
                assert total <= min(length, cap - p.max_new_tokens), (task, seed, length, cap, total)
                assert total >= min(length, cap - p.max_new_tokens) * 0.75, (task, seed, total)
