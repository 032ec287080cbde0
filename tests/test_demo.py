"""`starshard demo` on a tiny random model (the full demo runs the embedded SmolLM2 for minutes),
its S2 section, and its argument errors."""
import pytest

from starshard.demo import format_s2, s2_cpu_speed
from starshard.star.testing import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model-demo"), seed=0))


def test_s2_section():
    r = s2_cpu_speed(n=300, heads=2, head_dim=16, block=16, local=2, stride=4, repeat=1, check_rows=32)
    assert r["n"] == 300 and 0 < r["density"] < 1
    assert r["max_err"] < 1e-4
    assert r["sparse_s"] > 0 and r["sdpa_s"] > 0 and r["speedup"] == pytest.approx(r["sdpa_s"] / r["sparse_s"])
    assert r["check_rows"] == 96
    text = format_s2(r)
    assert "N=300" in text and "speed-up" in text and "local_stride(heads=2, block=16" in text


def test_demo_end_to_end(tiny_dir, tmp_path, cli):
    code, out, err = cli(["demo", "--model", tiny_dir, "--lengths", "80,112", "--samples", "1",
                          "--s2-n", "256", "--s2-repeat", "1", "--out", str(tmp_path), "--no-progress"])
    assert code == 0, err
    assert "| passkey | 112 | star | 1 |" in out and "| ring | 2 |" in out
    assert f"plots:  {tmp_path / 'accuracy.png'}, {tmp_path / 'time.png'}" in out
    assert "Example answers (passkey, 112, sample 0" in out
    for m in ("dense", "star", "ring"):
        assert f"\n  {m} " in out
    assert "S2 attention" in out and "N=256" in out and "speed-up" in out
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "report.md").exists()


@pytest.mark.parametrize("extra, message", [
    (["--task", "nope"], "unknown task(s) nope"),
    (["--task", "passkey,niah_single"], "the demo runs one task"),
    (["--samples", "0"], "--samples: expected a positive int"),
    (["--lengths", "4q"], "--lengths"),
    (["--s2-n", "-5"], "--s2-n: expected a positive int"),
])
def test_demo_bad_arguments(extra, message, cli):
    code, _, err = cli(["demo", *extra])
    assert code == 2 and message in err, err
