"""Hostile input: fuzzed CLI overrides, suite files and damaged results files give exit 0 or a one-line
error with exit 2, never a traceback, and never damage another run; files from elsewhere are data,
never code (a malicious pickle as checkpoint, Python tags in YAML)."""
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cl_bench.cli import main, one_line
from cl_bench.config import parse_overrides
from cl_bench.errors import UserError

EXAMPLES = int(os.environ.get("CL_BENCH_FUZZ_EXAMPLES", "40"))  # benchmarks/fuzz_inputs.py raises it
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
KEYS = ["strategy", "scenario", "model", "seed", "eval_mode", "eval_unseen", "eval_batch_size", "device", "resume",
        "progress", "plugins", "keep_checkpoints", "strategy.lr", "strategy.epochs", "strategy.batch_size",
        "strategy.buffer_size", "strategy.optimizer", "scenario.num_classes", "scenario.per_class", "scenario.noise",
        "scenario.increment", "model.hidden", "nosuch", "strategy.nosuch", "model..x", "", ".", "seed.x"]
WORDS = ["", "nan", "inf", "-1", "0", "1", "2", "1e999", "-1e999", "0.5", "[1, 2", "[1, 2]", "{a: 1}", "null", "true",
         "finetune", "er", "joint", "simplecil", "toy", "mlp", "til", "cil", "cpu", "cuda:7", "auto", "sgd", "adam",
         "<script>alert(1)</script>", "é", "a=b", "..", "/", "~", "'", '"', "\\", "\x00", "!!python/object/apply:os.system ['touch pwned']",
         "&anchor x", "*alias", "%YAML 1.2", "- a", ":", "#"]
DEEP = st.one_of(st.integers(1, 10_000).map(lambda n: "[" * n + "]" * n),
                 st.integers(1, 10_000).map(lambda n: "{a: " * n + "1" + "}" * n))
VALUES = st.one_of(st.sampled_from(WORDS), st.text(max_size=12), st.integers(-10**9, 10**9).map(str),
                   st.floats().map(str), DEEP, st.sampled_from(["9" * 400, "1e308", "-0.0", ".nan", "-.inf", "0x7f"]))
OVERRIDE = st.one_of(st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=15))
# keys whose large values would make a fuzzed run slow rather than wrong
SIZE_KEYS = ("strategy.epochs", "strategy.buffer_size", "scenario.num_classes", "scenario.per_class", "model.hidden",
             "eval_batch_size", "strategy.batch_size", "scenario.increment", "keep_checkpoints")
EXCLUDED_HEADING = "## Excluded runs"
CHEAP = ["scenario=toy", "model=mlp", "progress=false", "device=cpu"]


def cheap(overrides: list[str]) -> list[str]:
    """Drop overrides that would only make a run expensive (huge sizes, another scenario or model)."""
    kept = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in ("scenario", "model", "device", "plugins") or "\x00" in item:
            continue
        try:
            [(_, value)] = parse_overrides([item])
        except UserError:  # kept as it is, for cl-bench to refuse
            value = None
        if key in SIZE_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > 8:
            continue
        kept.append(item)
    return kept


def tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def check_outcome(code: int, err: str, counts: dict, family: str, names=()) -> None:
    """Exit 0, or exit 2 whose last line is the only error line and names one of ``names`` (the keys or files
    the input touched, as the one-line message writes them); counts by exit code and message shape."""
    counts[family] = counts.get(family, 0) + 1
    counts[f"{family}: exit {code}"] = counts.get(f"{family}: exit {code}", 0) + 1
    assert "Traceback" not in err and "internal error" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, err
        named = any(f"'{one_line(name)}'" in lines[-1] or (name and one_line(name) in lines[-1]) for name in names)
        # valid settings whose training diverged (e.g. scenario.noise=41178): not an input error; the line names
        # the run whose partial results stay on disk, and the learning rate
        named = named or bool(re.match(r"error: run \S+ failed: loss became (nan|inf) .*strategy\.lr", lines[-1]))
        shape = f"{family}: error names {'the key or file' if named else 'neither key nor file'}"
        counts[shape] = counts.get(shape, 0) + 1
        assert named, (lines[-1], names)


COUNTS: dict[str, int] = {}
FAMILIES = ("overrides", "suites", "results files", "checkpoints", "plugin names")


@pytest.fixture(scope="module", autouse=True)
def fuzz_counts_reported():
    """After this file's tests, whatever their order: every family that ran was exercised at least
    min(EXAMPLES, 10) times and, but for plugin names, some of its inputs were valid. The counts line is
    what benchmarks/fuzz_inputs.py prints."""
    yield
    ran = [family for family in FAMILIES if family in COUNTS]
    assert all(COUNTS[family] >= min(EXAMPLES, 10) for family in ran), COUNTS
    assert all(COUNTS.get(f"{family}: exit 0") for family in ran if family != "plugin names"), COUNTS
    print(f"\nfuzzed inputs tried: {COUNTS}, tracebacks: 0")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A results directory with two finished toy runs."""
    results = tmp_path_factory.mktemp("template")
    for seed in (0, 1):
        assert main(["run", "strategy=finetune", f"seed={seed}", *CHEAP, f"results_dir={results}",
                     f"cache_dir={results}/cache"]) == 0
    return results


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


@FUZZ
@given(overrides=st.lists(OVERRIDE, max_size=5))
def test_fuzzed_overrides(template, capfd, overrides):
    with tempfile.TemporaryDirectory() as scratch:
        results = Path(scratch) / "results"
        shutil.copytree(template, results)
        other = tree(results / "runs")
        capfd.readouterr()
        argv = cheap(overrides)
        code = main(["run", *argv, *CHEAP, f"results_dir={results}", f"cache_dir={scratch}/cache"])
        keys = [item.partition("=")[0].strip() for item in argv]
        check_outcome(code, capfd.readouterr().err, COUNTS, "overrides", [*keys, *argv])
        assert not Path("pwned").exists()
        after = tree(results / "runs")
        assert {k: v for k, v in after.items() if k in other} == other  # a rerun may only add


def suites():
    line = st.lists(OVERRIDE, max_size=3).map(lambda items: " ".join(cheap(items) + ["strategy=finetune"]))
    structured = st.fixed_dictionaries({"runs": st.one_of(st.lists(line, max_size=2), VALUES)},
                                       optional={"seeds": st.one_of(st.lists(st.integers(-3, 3), max_size=2), VALUES),
                                                 "extra": VALUES})
    return st.one_of(structured.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=60),
                     st.sampled_from(["runs: [a", "!!python/object/apply:os.system ['touch pwned']\n",
                                      "runs:\n  - !!python/object/apply:os.system ['touch pwned']\n", "---\n---\n",
                                      "runs: *a\n", "\ufeffruns: []\n", "runs:\n- strategy=finetune\nseeds: []\n", "",
                                      "seeds: " + "[" * 10_000 + "]" * 10_000 + "\nruns: [strategy=finetune]\n"]),
                     st.binary(max_size=40))


@FUZZ
@given(content=suites())
@example(content="runs:\n  - strategy=finetune\nseeds: [0, 1]\n")  # a valid suite (its runs are done)
def test_fuzzed_suite_files(template, capfd, content):
    with tempfile.TemporaryDirectory() as scratch:
        suite = Path(scratch) / "suite.yaml"
        suite.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        results = Path(scratch) / "results"
        shutil.copytree(template, results)
        other = tree(results / "runs")
        capfd.readouterr()
        code = main(["bench", str(suite), *CHEAP, f"results_dir={results}", f"cache_dir={scratch}/cache"])
        check_outcome(code, capfd.readouterr().err, COUNTS, "suites", [str(suite), "runs", "seeds", "strategy"])
        assert not Path("pwned").exists()
        after = tree(results / "runs")
        assert {k: v for k, v in after.items() if k in other} == other


def damage(data: bytes, how: str, position: float, junk: str) -> bytes | None:
    cut = int(len(data) * position)
    if how == "truncate":
        return data[:cut]
    if how == "flip":
        return data[:cut] + bytes([data[cut] ^ 0x5A]) + data[cut + 1:] if data else b"x"
    if how == "replace":
        return junk.encode("utf-8", "surrogatepass")
    if how == "json_field":
        try:
            summary = json.loads(data)
            key = sorted(summary)[cut % len(summary)]
            summary[key] = yaml.safe_load(junk) if junk and "!!" not in junk else junk
            return json.dumps(summary).encode()
        except Exception:
            return junk.encode("utf-8", "surrogatepass")
    return None  # delete


@FUZZ
@given(which=st.sampled_from(["summary.json", "scores.csv", "config.yaml", "checkpoints/task-003.pt"]),
       how=st.sampled_from(["truncate", "flip", "replace", "json_field", "delete"]),
       position=st.floats(0, 0.999), junk=VALUES, command=st.sampled_from(["leaderboard", "show", "run"]))
def test_damaged_results_files(template, capfd, which, how, position, junk, command):
    with tempfile.TemporaryDirectory() as scratch:
        results = Path(scratch) / "results"
        shutil.copytree(template, results)
        victim, bystander = sorted((results / "runs").iterdir())
        path = victim / which
        damaged = damage(path.read_bytes(), how, position, junk)
        if damaged is None:
            path.unlink()
        else:
            path.write_bytes(damaged)
        before = tree(bystander)
        capfd.readouterr()
        if command == "leaderboard":
            code = main(["leaderboard", str(results)])
        elif command == "show":
            code = main(["show", str(victim)])
        else:
            code = main(["run", "strategy=finetune", "seed=0", *CHEAP, f"results_dir={results}",
                         f"cache_dir={scratch}/cache"])
        check_outcome(code, capfd.readouterr().err, COUNTS, "results files", [str(path), victim.name, which])
        assert tree(bystander) == before  # never a damaged results directory
        if command == "leaderboard" and code == 0:  # the intact run still counts
            board = (results / "LEADERBOARD.md").read_text()
            assert bystander.name not in board.split(EXCLUDED_HEADING)[-1] or EXCLUDED_HEADING not in board


def test_a_malicious_pickle_as_checkpoint_is_refused(tmp_path, capsys):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    import torch

    args = ["strategy=finetune", *CHEAP, f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"]
    assert main(["run", *args]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted"  # so the same command resumes from the checkpoint
    (run / "summary.json").write_text(json.dumps(summary))
    (checkpoint,) = (run / "checkpoints").iterdir()
    torch.save({"tasks_completed": 2, "strategy": Exploit()}, checkpoint)
    capsys.readouterr()
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "holds Python objects" in err and "never unpickled" in err and "error:" in err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [{"a": 1}, [], None, {"tasks_completed": 1, "strategy": [1]}])
def test_a_checkpoint_of_the_wrong_shape_is_one_line_and_leaves_the_run_intact(tmp_path, capsys, content):
    import torch

    args = ["strategy=finetune", *CHEAP, f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"]
    assert main(["run", *args]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted"
    (run / "summary.json").write_text(json.dumps(summary))
    (checkpoint,) = (run / "checkpoints").iterdir()
    torch.save(content, checkpoint)
    before = tree(run)
    capsys.readouterr()
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint} is unusable" in err and "resume=false" in err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1 and "Traceback" not in err
    assert tree(run) == before


@pytest.mark.parametrize("argv", [["seed=" + "[" * 5000 + "]" * 5000], ["plugins=[1]"], ["plugins=[null]"],
                                  ["plugins=..relative"]])
def test_deep_or_mistyped_overrides_are_user_errors(tmp_path, capsys, argv):
    assert main(["run", *argv, f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error") and len(err.splitlines()) == 1
    assert ("seed=" if argv[0].startswith("seed") else "plugin") in err


def test_deep_files_are_refused_by_depth_not_by_the_recursion_limit(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("seeds: " + "[" * 3000 + "0" + "]" * 3000 + "\nruns:\n  - strategy=finetune\n")
    assert main(["bench", str(suite), f"results_dir={tmp_path}"]) == 2
    assert f"suite {suite} is refused: nested deeper than 100 levels" in capsys.readouterr().err
    args = ["strategy=finetune", *CHEAP, f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"]
    assert main(["run", *args]) == 0
    assert main(["run", *args, "seed=1"]) == 0
    deep, intact = sorted((tmp_path / "runs").iterdir())
    (deep / "summary.json").write_text('{"a": ' * 3000 + "1" + "}" * 3000)
    capsys.readouterr()
    for command in (["leaderboard", str(tmp_path)], ["show", str(deep)]):
        code = main(command)
        out, err = capsys.readouterr()
        assert "RecursionError" not in out + err and "internal error" not in err
    assert main(["leaderboard", str(tmp_path)]) == 0
    board = (tmp_path / "LEADERBOARD.md").read_text()
    assert f"`{deep.name}`: corrupt: {deep / 'summary.json'} is refused: nested deeper than 100 levels" in board
    assert code == 2  # show on the damaged run alone: one line


def test_yaml_with_a_python_tag_is_refused_everywhere(tmp_path, capsys):
    payload = f"!!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']"
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"runs:\n  - {payload}\n")
    assert main(["bench", str(suite), f"results_dir={tmp_path}"]) == 2
    assert f"suite {suite} is refused: it uses a Python tag" in capsys.readouterr().err
    assert main(["run", f"strategy.lr={payload}", f"results_dir={tmp_path}"]) == 2
    assert "strategy.lr= is refused: it uses a Python tag" in capsys.readouterr().err
    from cl_bench.config import safe_yaml
    from cl_bench.errors import UserError

    with pytest.raises(UserError, match="preset p.yaml is refused: it uses a Python tag"):
        safe_yaml(payload, "preset p.yaml")
    assert not (tmp_path / "pwned").exists()


def junk_content():
    """What a damaged or hostile checkpoint file may hold: plain data of any shape, tensors among it."""
    import torch

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=8),
                     st.integers(0, 4).map(lambda n: torch.zeros(n, 2)))
    return st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=10), inner, max_size=3)),
                        max_leaves=8)


@FUZZ
@given(field=st.sampled_from([None, "tasks_completed", "strategy", "unchanged", "generator", "rng", "sums",
                              "counts", "general_sums", "trainable_names"]), junk=junk_content())
@example(field="trainable_names", junk=[])  # still a valid checkpoint: the run resumes and finishes
def test_fuzzed_checkpoints(template, capfd, field, junk):
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        results = Path(scratch) / "results"
        shutil.copytree(template, results)
        victim, bystander = sorted((results / "runs").iterdir())
        summary = json.loads((victim / "summary.json").read_text())
        summary["status"] = "interrupted"  # so the run resumes from its checkpoint
        (victim / "summary.json").write_text(json.dumps(summary))
        (checkpoint,) = (victim / "checkpoints").iterdir()
        state = torch.load(checkpoint, weights_only=True)
        if field is None:
            state = junk
        else:
            state[field] = junk
        torch.save(state, checkpoint)
        before = tree(bystander)
        capfd.readouterr()
        code = main(["run", "strategy=finetune", "seed=0", *CHEAP, f"results_dir={results}",
                     f"cache_dir={scratch}/cache"])
        check_outcome(code, capfd.readouterr().err, COUNTS, "checkpoints", [str(checkpoint)])
        assert tree(bystander) == before


MISSING_PLUGINS = ["..x", "x..y", ".", "", "a b", "cl_bench.nosuch", "nosuch_module", "é", "[[[[", "os.path.nosuch"]
PLUGIN_NAMES = st.one_of(st.text(max_size=12), st.integers(), st.none(), st.lists(st.text(max_size=4), max_size=2),
                         st.sampled_from(MISSING_PLUGINS))


@FUZZ
@given(names=st.lists(PLUGIN_NAMES, max_size=3))
def test_fuzzed_plugin_names(tmp_path_factory, capfd, names):
    # never a name that could import a real module (``antigravity`` opens a browser): a string whose first
    # component is an identifier must be one of the known missing ones
    names = [n for n in names if n in MISSING_PLUGINS or not (isinstance(n, str) and n.strip().split(".")[0].isidentifier())]
    names = names or ["nosuch_module"]
    results = tmp_path_factory.mktemp("plugins")
    capfd.readouterr()
    code = main(["run", f"plugins={json.dumps(names)}", *CHEAP, f"results_dir={results}",
                 f"cache_dir={results}/cache"])
    check_outcome(code, capfd.readouterr().err, COUNTS, "plugin names", ["plugin"])
    assert code == 2
