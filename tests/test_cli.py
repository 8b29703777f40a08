import json
from pathlib import Path

import pytest

from llmpq_serve.cli import main
from llmpq_serve.planner import Plan

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = str(ROOT / "deployments" / "clusters" / "t4x3-v100.yaml")
PAPER = str(ROOT.parent / "shared" / "paper_clusters.yaml")


def test_plan_json_is_a_plan(capsys, tmp_path):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", "opt-30b", "--cluster", CLUSTER, "--batch", "16", "--quality", "awq4", "--json",
               "--out", str(out)])
    assert rc == 0
    printed = Plan.from_json(capsys.readouterr().out)
    assert printed == Plan.load(out)
    assert printed.workload.batch_size == 16 and printed.predicted.quality <= 0.25 + 1e-9


def test_plan_table_and_methods(capsys):
    assert main(["plan", "--model", "opt-30b", "--cluster", CLUSTER, "--method", "pipeedge"]) == 0
    out = capsys.readouterr().out
    assert "pipeedge" in out and "T4" in out and "tokens/s" in out


def test_a_plan_laid_out_when_time_ran_out_says_so(capsys):
    assert main(["plan", "--model", "opt-30b", "--cluster", CLUSTER, "--time-limit", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "llmpq feasible" in out and "note: time limit reached before the first plan" in out


def test_plan_errors_are_messages_not_tracebacks(capsys, tmp_path):
    assert main(["plan", "--model", "bloom-176b", "--cluster", CLUSTER]) == 2
    assert "GiB missing" in capsys.readouterr().err
    assert main(["plan", "--model", "nope", "--cluster", CLUSTER]) == 2
    assert "unknown model" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [{type: K80, count: 2}]\n")
    assert main(["plan", "--model", "opt-30b", "--cluster", str(bad)]) == 2
    assert f"cluster file {bad}: devices.0.type: unknown GPU type 'K80'" in capsys.readouterr().err  # the file's key


@pytest.mark.parametrize("args, says", [
    (["--batch", "0"], "argument --batch: must be > 0, not 0"),
    (["--prompt-len", "2.5"], "argument --prompt-len: '2.5' is not an integer"),
    (["--time-limit", "0"], "argument --time-limit: must be > 0, not 0"),
    (["--theta", "nan"], "argument --theta: must be >= 0, not nan"),
    (["--gap", "-1"], "argument --gap: must be >= 0, not -1"),
])
def test_plan_numbers_out_of_range_are_refused_by_name(capsys, args, says):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--model", "opt-30b", "--cluster", CLUSTER, *args])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_plan_file_mistakes_name_the_file_in_one_line(capsys, tmp_path):
    """Each wrong input is one line saying what and where, without pydantic's type tags and documentation links."""
    listed = tmp_path / "listed.yaml"
    listed.write_text("- {type: T4, count: 2}\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("devices: [{type: T4, count: 2}]\nfoo: 1\n")
    no_int8 = tmp_path / "omega.json"
    no_int8.write_text(json.dumps({"omega": [{"16": 0, "4": 1}]}))
    not_json = tmp_path / "omega.txt"
    not_json.write_text("16: 0")
    cases = [
        (["--cluster", str(listed)], f"cluster file {listed} holds a list, not a mapping"),
        (["--cluster", str(extra)], f"cluster file {extra}: foo: Extra inputs are not permitted"),
        (["--cluster", CLUSTER, "--indicator", str(no_int8)],
         f"indicator file {no_int8}: the indicator must give ω at 3"),
        (["--cluster", CLUSTER, "--indicator", str(not_json)], f"indicator file {not_json} is not valid JSON"),
        (["--cluster", CLUSTER, "--model", str(tmp_path)], f"{tmp_path} holds no config.json"),
        (["--cluster", CLUSTER, "--profiles", str(tmp_path / "none")], "no such folder"),
    ]
    for args, says in cases:
        assert main(["plan", "--model", "opt-30b", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
        assert "errors.pydantic.dev" not in err and "type=" not in err


def test_profile_and_file_mistakes_are_messages_not_tracebacks(capsys, tmp_path):
    """A device this machine lacks, a cluster file that is not YAML or not a file, a profile file of another device
    type: each an error message and exit code 2, before any measuring."""
    for device, says in [("gpu", "give cpu, cuda or cuda:N"), ("cuda:99", "CUDA device"), ("meta", "cpu or cuda")]:
        assert main(["profile", "--model", "opt-13b", "--device", device, "--profiles", str(tmp_path)]) == 2
        assert says in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("devices: [{type: T4\n")
    for cluster in (broken, tmp_path):
        assert main(["plan", "--model", "opt-30b", "--cluster", str(cluster)]) == 2
        assert capsys.readouterr().err.startswith("error: ")
    from llmpq_serve.profile_table import Profile

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--model", "opt-30b", "--cluster", CLUSTER, "--budget", "0.3", "--quality", "awq4"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    Profile(device_type="H100", device_name="x", torch="2.13", measured_at="2026-11-27", tables=[]).save(
        tmp_path / "H.json")
    assert main(["profile", "--model", "opt-13b", "--device", "cpu", "--out", str(tmp_path / "H.json")]) == 2
    assert "holds a H100 profile, not CPU" in capsys.readouterr().err
    Profile(device_type="CPU", device_name="CPU (64 threads)", torch="2.13", measured_at="2026-11-27",
            tables=[]).save(tmp_path / "C.json")
    assert main(["profile", "--model", "opt-13b", "--device", "cpu", "--out", str(tmp_path / "C.json")]) == 2
    assert "holds tables measured on CPU (64 threads), not on this CPU (" in capsys.readouterr().err


def test_bench_plan_json_shape(capsys, tmp_path):
    rc = main(["bench", "plan", "--clusters", PAPER, "--only", "1", "9", "--no-large", "--json",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in doc["clusters"]] == ["1", "9"]
    for c in doc["clusters"]:
        for m in ("uniform", "pipeedge", "llmpq_no_adabits", "llmpq_no_phase", "llmpq_matched", "llmpq_awq4"):
            e = c["methods"][m]
            assert {"feasible", "tokens_per_s", "quality", "solve_s"} <= set(e)
        base = max(c["methods"][m]["tokens_per_s"] for m in ("uniform", "pipeedge"))
        assert c["methods"]["llmpq_matched"]["tokens_per_s"] >= base
    assert (tmp_path / "plan_clusters.md").read_text().startswith("Predicted by the cost model")


def test_bench_plan_with_an_unknown_cluster_id_stops_before_writing(capsys, tmp_path):
    assert main(["bench", "plan", "--clusters", PAPER, "--only", "1", "99", "--no-large",
                 "--out-dir", str(tmp_path)]) == 2
    assert "no cluster 99 in" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_the_plan_benchmarks_means_say_which_clusters_they_leave_out():
    """A cluster where a method is infeasible has no speed-up: its geomean and min must say they are over fewer
    clusters, not read as if over all (they would be biased up)."""
    from llmpq_serve.bench.planning import markdown, summarise

    def cluster(i: int, awq4_fits: bool) -> dict:
        fits = {"feasible": True, "tokens_per_s": 100.0, "quality": 0.1, "solve_s": 0.1}
        methods = {m: dict(fits) for m in ("uniform", "pipeedge", "llmpq_matched", "llmpq_awq4", "llmpq_no_adabits",
                                            "llmpq_no_phase", "llmpq_fast")}
        methods["llmpq_awq4"]["tokens_per_s"] = 200.0
        methods["llmpq_awq4"]["feasible"] = awq4_fits
        return {"id": i, "model": "m", "devices": "d", "fastest_baseline": "uniform", "methods": methods}

    clusters = [cluster(1, True), cluster(2, False)]
    summary = summarise(clusters)
    assert summary["llmpq_awq4"] == {"speedup_vs_fastest_baseline": [2.0, None], "geomean": 2.0, "min": 2.0,
                                     "clusters_counted": 1}
    assert summary["llmpq_matched"]["clusters_counted"] == 2
    table = markdown({"clusters": clusters, "summary": summary})
    assert "| llmpq_awq4 | 2.00, - | 2.0 (1 of 2 clusters) | 2.0 (1 of 2 clusters) |" in table
    assert "| llmpq_matched | 1.00, 1.00 | 1.0 | 1.0 |" in table
