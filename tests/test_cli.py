"""The `starshard` command: version, usage errors, and `check` on a small case."""
import json
import subprocess
import sys

import pytest

import starshard
from starshard.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"starshard {starshard.__version__}"


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "check" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["check", "--n", "0"], ["check", "--n", "100000"], ["check", "--bogus"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_check_json_passes(capsys):
    assert main(["check", "--n", "203", "--repeat", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["n"] == 203
    assert len(report["cases"]) >= 5
    for case in report["cases"]:
        assert case["error"] is None and case["ok"], case
        assert case["out_err"] <= 1e-4 and case["lse_err"] <= 1e-4
        assert 0 < case["density"] <= 1


def test_check_fails_over_tolerance(capsys):
    assert main(["check", "--n", "150", "--repeat", "0", "--tol", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "N=150" in out


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "starshard", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"starshard {starshard.__version__}"
