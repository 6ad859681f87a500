"""``ringcompile plan`` prints every strategy best first; ``calibrate`` is registered."""

from __future__ import annotations

from ringcompile.cli import build_parser, main


def test_plan_table(capsys):
    rc = main(["plan", "--seq", "1048576", "--world-size", "8", "--heads", "32", "--kv-heads", "8",
               "--head-dim", "128", "--profile", "h100-nvlink"])
    assert rc == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if len(line.split()) > 1
             and line.split()[1] in ("contiguous", "zigzag")]
    rows = [parts[0] for parts in table]
    assert sorted(rows) == ["allgather", "local", "ring", "ulysses", "zigzag"]
    times = []
    for parts in table:
        value, unit = parts[-4], parts[-3]
        times.append(float(value) * {"s": 1, "ms": 1e-3, "us": 1e-6}[unit])
    assert times == sorted(times)
    assert "bubble" in out and "crossovers" in out and "overlap threshold" in out


def test_plan_explain_and_infeasible(capsys):
    rc = main(["plan", "--seq", "65536", "--world-size", "8", "--heads", "12", "--kv-heads", "4",
               "--head-dim", "64", "--profile", "a100-infiniband", "--causal", "--backward", "--explain"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ulysses    infeasible" in out and "time = " in out


def test_plan_bad_profile_is_an_error_not_a_traceback(capsys):
    rc = main(["plan", "--seq", "4096", "--world-size", "2", "--heads", "4", "--head-dim", "64",
               "--profile", "nope"])
    assert rc == 2 and "unknown profile" in capsys.readouterr().err


def test_calibrate_registered():
    parser = build_parser()
    args = parser.parse_args(["calibrate", "--output", "/tmp/x.toml", "--quick"])
    assert args.func.__name__ == "run_calibrate"
