"""`kiln serve` refuses bad plans, names and flags in one line with exit status 2, before Ray starts."""
from __future__ import annotations

import os
import sys

import pytest


def _serve(capsys, *args: str) -> str:
    from kiln.cli.main import main
    ray_before = "ray" in sys.modules
    code = main(["serve", *args])
    out = capsys.readouterr()
    assert code == 2, (code, out.out, out.err)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), out.err
    assert "Traceback" not in out.err and out.out == ""
    assert ray_before or "ray" not in sys.modules  # refused before Ray was even imported
    return lines[0]


def test_bad_plan_file_fails_before_ray(capsys, tmp_path):
    junk = tmp_path / "junk.kiln"
    junk.write_bytes(os.urandom(256))
    assert "junk.kiln" in _serve(capsys, str(junk), "--port", "1")
    assert "plan file not found" in _serve(capsys, str(tmp_path / "missing.kiln"))


@pytest.mark.parametrize("extra, words", [
    ([], "two plans are served as 'small'"),
    (["--name", "a"], "--name given 1 times for 2 plans"),
    (["--name", "a", "--name", "b/c"], "model name 'b/c'"),
    (["--name", "a", "--name", "b", "--max-batch", "4", "--max-batch", "2", "--max-batch", "1"],
     "--max-batch given 3 times for 2 plans"),
    (["--name", "a", "--name", "b", "--num-gpus", "0.5"], "--num-gpus: every plan targets the CPU"),
    (["--name", "a", "--name", "b", "--max-batch", "0"], "--max-batch must be an integer >= 1, got 0"),
    (["--name", "a", "--name", "b", "--port", "0"], "--port must be in [1, 65535], got 0"),
])
def test_bad_flags_are_one_line(capsys, small_plan, extra, words):
    path = small_plan[0]
    assert words in _serve(capsys, path, path, *extra)


def test_imports_stay_light():
    import subprocess
    code = ("import sys, kiln, kiln.serve, kiln.serve.protocol, kiln.serve.batching, kiln.ray, kiln.cli.main; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"  # neither Ray nor torch until something runs


def test_without_ray_installed_is_one_line(capsys, small_plan, monkeypatch):
    """A machine without the serve extra: the plan is checked, then one line says what to install."""
    for mod in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    line = _serve(capsys, small_plan[0], "--port", "18123")
    assert "needs Ray Serve" in line and "kiln[serve]" in line
