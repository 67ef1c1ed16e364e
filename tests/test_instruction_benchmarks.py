"""The published instruction streams (TRACE, O-LoRA standard/long sequences, SuperNI by SAPT and the
function-vector paper) read from small fixtures written here in the authors' layouts, and the scorers
they added (hand-computed)."""
import json
import re

import pytest

from cl_bench.config import compose, preset_description
from cl_bench.errors import UserError
from cl_bench.registry import SCENARIOS
from cl_bench.scenarios import _instruction_files
from cl_bench.scenarios.cl_benchmark import GROUPS, INSTRUCTIONS, LONG_ORDERS, SAPT_NAMES, STANDARD_ORDERS
from cl_bench.scenarios.superni import FV_SEQUENCES, SAPT_ORDERS
from cl_bench.scenarios.trace import INSTRUCTIONS as TRACE_INSTRUCTIONS
from cl_bench.scenarios.trace import ORDER as TRACE_ORDER
from cl_bench.scorers import SCORERS, sari_sentence, score


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """The default data folder is an empty tmp dir, whatever the machine holds."""
    monkeypatch.setattr(_instruction_files, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def write(path, data, lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(d, ensure_ascii=False) for d in data) if lines else json.dumps(data, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")


def matches(template: str, prompt: str) -> bool:
    """``prompt`` is ``template`` with its {input} field filled (how coin_ema matches templates)."""
    head, _, tail = template.partition("{input}")
    return re.fullmatch(re.escape(head) + ".*" + re.escape(tail), prompt, re.DOTALL) is not None


# --- TRACE ----------------------------------------------------------------------------------------

TRACE_ANSWERS = {"C-STANCE": "A", "FOMC": "B", "MeetingBank": "a summary", "Py150": "x = <NUM_LIT>",
                 "ScienceQA": "C\nBecause ...", "NumGLUE-cm": "12.5", "NumGLUE-ds": "-3", "20Minuten": "Ein Satz."}


def write_trace(base, sizes=(3, 2)):
    for t, name in enumerate(TRACE_ORDER):
        for split, size in zip(("train", "eval", "test"), (sizes[0], sizes[1], sizes[1])):
            rows = [{"prompt": f"{TRACE_INSTRUCTIONS[name]}{name} {split} {i}", "answer": TRACE_ANSWERS[name]}
                    for i in range(size + t % 2)]
            write(base / name / f"{split}.json", rows, lines=name == "Py150")  # one task in JSON lines
    return base


def test_trace_reads_the_archive_in_the_published_order(tmp_path):
    write_trace(tmp_path / "LLM-CL-Benchmark_5000")
    stream = SCENARIOS.get("trace")(root=str(tmp_path)).stream()
    assert [t.name for t in stream.tasks] == ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA",
                                              "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
    assert [t.scorer for t in stream.tasks] == ["exact_string", "exact_string", "rouge_l", "code_edit_similarity",
                                                "first_character", "exact_string", "exact_string", "sari"]
    assert [t.max_new_tokens for t in stream.tasks] == [8, 8, 256, 64, 16, 32, 32, 256]
    for t, task in enumerate(stream.tasks):
        assert [len(task.train), len(task.test)] == [3 + t % 2, 2 + t % 2]
        assert task.train.prompts[0] == f"{TRACE_INSTRUCTIONS[task.name]}{task.name} train 0"  # used unchanged
        assert task.test.prompts[-1] == f"{TRACE_INSTRUCTIONS[task.name]}{task.name} test {1 + t % 2}"
        assert task.test.answers == [TRACE_ANSWERS[task.name]] * len(task.test)
        assert all(matches(task.instruction, p) for p in task.train.prompts + task.test.prompts)
    assert stream.provenance["task_order"] == list(TRACE_ORDER) and stream.general == ()
    # the folder itself works as root too, and gives the same data
    again = SCENARIOS.get("trace")(root=str(tmp_path / "LLM-CL-Benchmark_5000")).stream()
    assert again.provenance["data_hash"] == stream.provenance["data_hash"]


def test_trace_order_budget_and_caps(tmp_path):
    write_trace(tmp_path)
    trace = SCENARIOS.get("trace")
    stream = trace(root=str(tmp_path), order=["20Minuten", "FOMC"], max_new_tokens=512, max_train_per_task=2)
    tasks = stream.stream().tasks
    assert [t.name for t in tasks] == ["20Minuten", "FOMC"] and [t.index for t in tasks] == [0, 1]
    assert [t.max_new_tokens for t in tasks] == [512, 512] and [len(t.train) for t in tasks] == [2, 2]
    for bad in (2, ["FOMC", "FOMC"], ["Yelp"], []):
        with pytest.raises(UserError, match="scenario.order"):
            trace(root=str(tmp_path), order=bad)
    with pytest.raises(UserError, match="max_new_tokens"):
        trace(root=str(tmp_path), max_new_tokens=0)


def test_trace_missing_and_broken_files(tmp_path, empty_cache):
    trace = SCENARIOS.get("trace")
    with pytest.raises(UserError) as excinfo:
        trace().stream()  # no root: the cache folder, empty here
    message = one_line(excinfo)
    assert "github.com/BeyonderXX/TRACE" in message and "scenario.root" in message and str(empty_cache) in message
    with pytest.raises(UserError, match="github.com/BeyonderXX/TRACE"):
        trace(root=str(tmp_path / "nowhere")).stream()
    base = write_trace(tmp_path / "data")
    (base / "NumGLUE-ds" / "test.json").unlink()
    with pytest.raises(UserError) as excinfo:
        trace(root=str(base)).stream()
    assert "NumGLUE-ds/test.json is missing" in one_line(excinfo)
    (base / "NumGLUE-ds" / "test.json").write_text("[{\"prompt\": ", encoding="utf-8")
    with pytest.raises(UserError, match="neither JSON nor JSON lines"):
        trace(root=str(base)).stream()
    write(base / "NumGLUE-ds" / "test.json", [{"prompt": "p"}])
    with pytest.raises(UserError, match="record 0 lacks"):
        trace(root=str(base)).stream()
    (base / "NumGLUE-ds" / "test.json").write_text("[" * 5000 + "]" * 5000, encoding="utf-8")
    with pytest.raises(UserError, match="nested deeper than 100 levels"):
        trace(root=str(base)).stream()
    (base / "NumGLUE-ds" / "test.json").write_bytes(b"\xff\xfe[1]")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        trace(root=str(base)).stream()


def test_trace_data_in_the_cache_folder(empty_cache):
    write_trace(empty_cache / "TRACE" / "LLM-CL-Benchmark_5000")
    assert len(SCENARIOS.get("trace")().stream()) == 8


def test_hugging_face_repo_is_a_snapshot_of_the_same_layout(tmp_path, monkeypatch):
    import huggingface_hub

    write_trace(tmp_path / "snap" / "LLM-CL-Benchmark_5000")
    calls = []

    def fake_snapshot(**kwargs):
        calls.append(kwargs)
        return str(tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    stream = SCENARIOS.get("trace")(hf_repo="someone/trace", hf_revision="abc").stream()
    assert len(stream) == 8 and "someone/trace@abc" in stream.provenance["source"]
    (call,) = calls
    assert call["repo_id"] == "someone/trace" and call["repo_type"] == "dataset" and call["revision"] == "abc"
    assert "LLM-CL-Benchmark_5000/Py150/*.json" in call["allow_patterns"]

    def offline(**kwargs):
        raise OSError("offline mode is enabled\nsecond line")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as excinfo:
        SCENARIOS.get("trace")(hf_repo="someone/trace").stream()
    assert "someone/trace" in one_line(excinfo) and "scenario.root" in one_line(excinfo)


# --- O-LoRA standard CL benchmark and long sequence ----------------------------------------------

LABELS = {"dbpedia": ["Company", "Educational Institution", "Artist", "Athlete", "Office Holder",
                      "Mean of Transportation", "Building", "Natural Place", "Village", "Animal", "Plant", "Album",
                      "Film", "Written Work"],
          "yahoo": ["Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
                    "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
                    "Family & Relationships", "Politics & Government"],
          "agnews": ["World", "Sports", "Business", "Science or Technology"],
          "amazon": ["very negative", "negative", "neutral", "positive", "very positive"],
          "yelp": ["very negative", "negative", "neutral", "positive", "very positive"],
          "IMDB": ["Good", "Bad"], "SST-2": ["Good", "Bad"], "MNLI": ["neutral", "entailment", "contradiction"],
          "CB": ["entailment", "contradiction", "neutral"], "RTE": ["contradiction", "entailment"],
          "QQP": ["False", "True"], "BoolQA": ["True", "False"], "COPA": ["A", "B"], "MultiRC": ["False", "True"],
          "WiC": ["True", "False"]}


def write_olora(base, train=4, test=3):
    for name, group in GROUPS.items():
        folder = base / group / name
        write(folder / "labels.json", LABELS[name])
        for split, size in (("train", train), ("dev", test), ("test", test)):
            write(folder / f"{split}.json", [{"label": LABELS[name][i % len(LABELS[name])],
                                              "sentence": f"{name} {split} sentence {i} {{braces}}"}
                                             for i in range(size)])
    return base


@pytest.mark.parametrize("order", [1, 2, 3])
def test_standard_cl_orders_and_olora_prompts(tmp_path, order):
    write_olora(tmp_path / "O-LoRA" / "CL_Benchmark")
    stream = SCENARIOS.get("standard_cl")(root=str(tmp_path / "O-LoRA"), order=order).stream()
    expected = {1: ["dbpedia", "amazon", "yahoo", "agnews"], 2: ["dbpedia", "amazon", "agnews", "yahoo"],
                3: ["yahoo", "amazon", "agnews", "dbpedia"]}[order]
    assert [t.name for t in stream.tasks] == expected == list(STANDARD_ORDERS[order])
    assert stream.provenance["order"] == order
    assert all(t.scorer == "exact_match_ni" and t.max_new_tokens == 50 for t in stream.tasks)
    assert all((len(t.train), len(t.test)) == (4, 3) for t in stream.tasks)
    agnews = next(t for t in stream.tasks if t.name == "agnews")
    assert agnews.test.prompts[1] == (
        "Task:TC\nDataset:agnews\nWhat is the topic of the following paragraph? Choose one from the option.\n"
        "Option: World, Sports, Business, Science or Technology \nagnews test sentence 1 {braces}\nAnswer:")
    assert agnews.test.answers == ["World", "Sports", "Business"]
    amazon = next(t for t in stream.tasks if t.name == "amazon")
    assert amazon.train.prompts[0].startswith(
        "Task:SC\nDataset:amazon\nWhat is the sentiment of the following paragraph? Choose one from the option.\n"
        "Option: very negative, negative, neutral, positive, very positive \n")
    assert all(matches(t.instruction, p) for t in stream.tasks for p in t.train.prompts)


@pytest.mark.parametrize("order", [4, 5, 6])
def test_long_sequence_orders(tmp_path, order):
    write_olora(tmp_path)
    stream = SCENARIOS.get("long_sequence")(root=str(tmp_path), order=order).stream()
    names = [t.name for t in stream.tasks]
    assert names == list(LONG_ORDERS[order]) and len(names) == 15 and sorted(names) == sorted(GROUPS)
    assert names[:3] == {4: ["MNLI", "CB", "WiC"], 5: ["MultiRC", "BoolQA", "WiC"], 6: ["yelp", "amazon", "MNLI"]}[order]
    copa = next(t for t in stream.tasks if t.name == "COPA")
    assert copa.test.prompts[0] == "Task:COPA\nDataset:COPA\nCOPA test sentence 0 {braces}\nAnswer:"
    wic = next(t for t in stream.tasks if t.name == "WiC")
    assert wic.train.prompts[0].startswith(f"Task:WiC\nDataset:WiC\n{INSTRUCTIONS['WiC']}Option: True, False \n")


def test_olora_options(tmp_path):
    write_olora(tmp_path)
    custom = tmp_path / "instruction_config.json"
    write(custom, {group: [{"instruction_type": "zero-shot", "instruction": f"Classify ({group}).\n"}]
                   for group in INSTRUCTIONS})
    stream = SCENARIOS.get("standard_cl")(root=str(tmp_path), add_task_name=False, instruction_file=str(custom),
                                           max_new_tokens=8).stream()
    assert stream.tasks[0].train.prompts[0].startswith("Dataset:dbpedia\nClassify (TC).\nOption: Company, ")
    assert stream.tasks[0].max_new_tokens == 8
    write(custom, {"TC": [{"instruction_type": "few-shot", "instruction": "x"}]})
    with pytest.raises(UserError, match="zero-shot"):
        SCENARIOS.get("standard_cl")(root=str(tmp_path), instruction_file=str(custom)).stream()


def test_olora_errors(tmp_path):
    standard, long = SCENARIOS.get("standard_cl"), SCENARIOS.get("long_sequence")
    with pytest.raises(UserError, match="1, 2, 3"):
        standard(order=4)
    with pytest.raises(UserError, match="4, 5, 6"):
        long(order=1)
    with pytest.raises(UserError, match="olora"):
        standard(layout="sapt")
    with pytest.raises(UserError) as excinfo:
        standard(root=str(tmp_path)).stream()
    assert "github.com/cmnfriend/O-LoRA" in one_line(excinfo) and "TC/dbpedia" in one_line(excinfo)
    write_olora(tmp_path)
    (tmp_path / "TC" / "yahoo" / "labels.json").unlink()
    with pytest.raises(UserError) as excinfo:
        standard(root=str(tmp_path)).stream()
    assert "TC/yahoo/labels.json is missing" in one_line(excinfo)


def test_long_sequence_from_sapt_files(tmp_path):
    base = tmp_path / "CL_Benchmark" / "Long_Sequence"
    for name, lower in SAPT_NAMES.items():
        definition = [] if name == "COPA" else [f"Judge the {lower} example.\n"]
        for split in ("train", "dev", "test"):
            write(base / lower / f"{split}.json", {"Definition": definition, "Positive Examples": [],
                                                   "Negative Examples": [],
                                                   "Instances": [{"input": f"{lower} {split} {i}", "output": "yes"}
                                                                 for i in range(2)]})
    stream = SCENARIOS.get("long_sequence")(root=str(tmp_path), order=6, layout="sapt").stream()
    assert [t.name for t in stream.tasks] == list(LONG_ORDERS[6])
    qqp = next(t for t in stream.tasks if t.name == "QQP")
    assert qqp.test.prompts[1] == "Judge the qqp example.\nqqp test 1\nOutput: " and qqp.test.answers == ["yes", "yes"]
    copa = next(t for t in stream.tasks if t.name == "COPA")
    assert copa.train.prompts[0] == "copa train 0\nOutput: "
    assert stream.provenance["layout"] == "sapt" and all(t.scorer == "exact_match_ni" for t in stream.tasks)


# --- SuperNI: SAPT 15-task orders and the function-vector 5-task sequences ------------------------

def ni_file(definition, instances):
    return {"Contributors": ["x"], "Definition": [definition], "Positive Examples": [{"input": "i", "output": "o"}],
            "Negative Examples": [], "Instances": instances}


def write_sapt(base):
    for name in SAPT_ORDERS["1"]:
        for split, size in (("train", 3), ("dev", 2), ("test", 2)):
            instances = [{"id": f"{name}-{i}", "input": f"{name} {split} {i}",
                          "output": [f"out {i}", f"alt {i}"] if name.startswith("task748") else [f"out {i}"]}
                         for i in range(size)]
            write(base / name / f"{split}.json", ni_file(f"Do {name}. ", instances))
    return base


@pytest.mark.parametrize("order", [1, 2, "2"])
def test_superni_sapt_orders(tmp_path, order):
    write_sapt(tmp_path / "SAPT" / "CL_Benchmark" / "SuperNI")
    stream = SCENARIOS.get("superni")(root=str(tmp_path / "SAPT"), order=order).stream()
    names = [t.name for t in stream.tasks]
    assert names == list(SAPT_ORDERS[str(order)]) and len(set(names)) == 15
    assert names[0] == ("task1572_samsum_summary" if str(order) == "1" else "task748_glucose_reverse_cause_event_detection")
    assert all(t.scorer == "rouge_l_ni" and t.max_new_tokens == 50 for t in stream.tasks)
    sst2 = next(t for t in stream.tasks if t.name == "task363_sst2_polarity_classification")
    assert sst2.test.prompts[1] == ("Definition: Do task363_sst2_polarity_classification.\n\nNow complete the "
                                    "following example -\nInput: task363_sst2_polarity_classification test 1\nOutput: ")
    assert (len(sst2.train), len(sst2.test)) == (3, 2) and sst2.test.answers == ["out 0", "out 1"]
    glucose = next(t for t in stream.tasks if t.name.startswith("task748"))
    assert glucose.test.references == (("out 0", "alt 0"), ("out 1", "alt 1"))  # scored against every output
    assert all(a in refs for a, refs in zip(glucose.train.answers, glucose.train.references))


def test_superni_label_seed_picks_among_outputs(tmp_path):
    write_sapt(tmp_path)
    answers = {seed: next(t for t in SCENARIOS.get("superni")(root=str(tmp_path), label_seed=seed).stream().tasks
                          if t.name.startswith("task748")).train.answers for seed in range(6)}
    assert answers[0] == next(t for t in SCENARIOS.get("superni")(root=str(tmp_path)).stream().tasks
                              if t.name.startswith("task748")).train.answers
    assert len({tuple(a) for a in answers.values()}) > 1


FV_NAMES = {618: "amazonreview_summary", 1290: "xsum_summarization", 589: "amazonfood_summary_text_generation",
            511: "reddit_tifu_long_text_summarization", 1357: "xlsum_summary_generation", 195: "sentiment140_classification",
            1343: "amazon_us_reviews_rating", 1310: "amazonreview_rating_classification", 1292: "yelp_review_full_text_categorization",
            363: "sst2_polarity_classification", 360: "spolin_yesand_response_generation", 339: "record_answer_generation",
            1510: "evalution_relation_extraction"}


def write_ni_tasks(folder, size=104):
    for task_id, name in FV_NAMES.items():
        instances = [{"id": f"task{task_id}-{i}", "input": f"  input {i} of {task_id}{'?' if i % 2 else ''} ",
                      "output": [f"label {i}"]} for i in range(size)]
        write(folder / f"task{task_id:03d}_{name}.json", ni_file(f"Answer task {task_id}", instances))
    write(folder / "task3600_decoy.json", ni_file("decoy", []))  # not task360
    return folder


@pytest.mark.parametrize("order, budgets", [("G1", [30, 64, 30, 64, 64]), ("C1", [6] * 5), ("m1", [64, 6, 64, 6, 12])])
def test_superni_function_vector_sequences(tmp_path, order, budgets):
    write_ni_tasks(tmp_path / "natural-instructions" / "tasks")
    stream = SCENARIOS.get("superni")(root=str(tmp_path / "natural-instructions"), order=order).stream()
    ids = FV_SEQUENCES[order.upper()]
    assert [t.name for t in stream.tasks] == [f"task{i:03d}_{FV_NAMES[i]}" for i in ids]
    assert [t.max_new_tokens for t in stream.tasks] == budgets
    for task, task_id in zip(stream.tasks, ids):
        assert (len(task.train), len(task.test)) == (4, 100) and task.scorer == "rouge_l_ni"
        assert task.train.answers == [f"label {i}" for i in range(4)]  # the last 100 instances are the test set
        assert task.test.answers[0] == "label 4"
        assert task.train.prompts[0] == (f"Definition: Answer task {task_id}.\n\nNow complete the following example -\n"
                                         f"Input: input 0 of {task_id}.\nOutput:")
        assert task.train.prompts[1].endswith(f"Input: input 1 of {task_id}?\nOutput:")  # no full stop after '?'
        assert matches(task.instruction, task.test.prompts[0])


def test_superni_caps_and_errors(tmp_path):
    superni = SCENARIOS.get("superni")
    write_ni_tasks(tmp_path, size=112)
    tasks = superni(root=str(tmp_path), order="C1").stream().tasks
    assert [len(t.train) for t in tasks] == [12] * 5
    assert [len(t.train) for t in superni(root=str(tmp_path), order="C1", max_train_per_task=5).stream().tasks] == [5] * 5
    for bad in (3, "G2", "sapt"):
        with pytest.raises(UserError, match="G1, C1, M1"):
            superni(order=bad)
    with pytest.raises(UserError) as excinfo:
        superni(root=str(tmp_path / "none")).stream()
    assert "github.com/circle-hit/SAPT" in one_line(excinfo)
    with pytest.raises(UserError) as excinfo:
        superni(root=str(tmp_path / "none"), order="M1").stream()
    assert "allenai/natural-instructions" in one_line(excinfo) and "task360_*.json" in one_line(excinfo)
    write(tmp_path / "task339_record_answer_generation.json", ni_file("d", [{"input": "x", "output": ["y"]}] * 100))
    with pytest.raises(UserError, match="needs more than 100"):
        superni(root=str(tmp_path), order="M1").stream()
    (tmp_path / "task339_record_answer_generation.json").unlink()
    with pytest.raises(UserError, match="no task339_"):
        superni(root=str(tmp_path), order="M1").stream()
    write(tmp_path / "task339_record_answer_generation.json", {"Definition": ["d"], "Instances": [{"input": "x"}]})
    with pytest.raises(UserError, match="instance 0 needs"):
        superni(root=str(tmp_path), order="M1").stream()


# --- presets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, kind, order", [
    ("trace", "trace", 1), ("standard_cl_order1", "standard_cl", 1), ("standard_cl_order2", "standard_cl", 2),
    ("standard_cl_order3", "standard_cl", 3), ("long_sequence_order4", "long_sequence", 4),
    ("long_sequence_order5", "long_sequence", 5), ("long_sequence_order6", "long_sequence", 6),
    ("superni_order1", "superni", 1), ("superni_order2", "superni", 2), ("superni_g1", "superni", "G1"),
    ("superni_c1", "superni", "C1"), ("superni_m1", "superni", "M1")])
def test_presets_compose(preset, kind, order):
    cfg = compose([f"scenario={preset}"])
    assert cfg.scenario.type == kind and cfg.scenario.order == order
    assert preset_description("scenario", preset)
    assert cfg.model.name == SCENARIOS.get(kind).default_model


# --- scorers added for these benchmarks, hand-computed --------------------------------------------

def test_exact_string_is_trace_accuracy():
    scores = SCORERS["exact_string"](["A", " A\n", "a", "-3", "1.25", "", "A."],
                                     [("A",), ("A",), ("A",), ("3",), ("12.5",), ("A",), ("A",)])
    assert scores.tolist() == [1, 1, 0, 0, 0, 0, 0]
    # the SQuAD-style exact_match would accept the sign and decimal point errors
    assert SCORERS["exact_match"](["-3", "1.25"], [("3",), ("12.5",)]).tolist() == [1, 1]


def test_first_character_is_the_scienceqa_option():
    scores = SCORERS["first_character"](["A\nBecause x", "B", " C because", "", "D"],
                                        [("A\nBecause y",), ("A\nBecause",), ("C",), ("A",), ("",)])
    assert scores.tolist() == [1, 0, 1, 0, 0]


def test_code_edit_similarity_makes_literals_plain():
    score_of = SCORERS["code_edit_similarity"]
    # <STR_LIT:hi> -> hi, <NUM_LIT> -> 0, <STR_LIT> and <CHAR_LIT> removed: identical after that
    assert score_of(['x = "<STR_LIT:hi>" + <NUM_LIT>'], [('x = "hi" + 0',)]).tolist() == [1.0]
    assert score_of(["f(<STR_LIT>, <CHAR_LIT>)"], [("f(, )",)]).tolist() == [1.0]
    # Indel similarity of "abc" and "abd": 1 - 2 edits / 6 characters
    assert score_of(["abc"], [("abd",)])[0] == pytest.approx(2 / 3)
    assert SCORERS["edit_similarity"](['x = "<STR_LIT:hi>"'], [('x = "hi"',)])[0] < 1


def test_exact_match_ni_keeps_articles():
    scores = SCORERS["exact_match_ni"](["A", "The", "science or technology.", "World ", "B"],
                                       [("A",), ("A",), ("Science or Technology",), ("world",), ("A",)])
    assert scores.tolist() == [1, 0, 1, 1, 0]
    assert SCORERS["exact_match"](["The"], [("A",)]).tolist() == [0]  # an all-article reference is compared verbatim


def test_rouge_l_ni_stems():
    # Porter stems: cats -> cat, running -> run, runs -> run, so all three words match
    assert SCORERS["rouge_l_ni"](["the cats running"], [("the cat runs",)])[0] == pytest.approx(1.0)
    # without stemming only "the" matches: P = R = 1/3
    assert SCORERS["rouge_l"](["the cats running"], [("the cat runs",)])[0] == pytest.approx(1 / 3)
    assert SCORERS["rouge_l_ni"](["", "x"], [("x",), ("y", "x")]).tolist() == [0, 1]


def test_sari_by_hand():
    # source "a b c", output "a b d", reference "a d" (r = 1):
    #  1-grams: keep {a, b}, good {a}: P = (1 + 0)/2, R = 1/1 -> F = 2/3; delete {c}, good {c}: P = 1;
    #           add {d}, wanted {d}: F = 1
    #  2-grams: keep {"a b"}, none good: P = 0, nothing to keep: R = 1 -> F = 0; delete {"b c"}: P = 1;
    #           add {"b d"} not wanted, wanted {"a d"}: F = 0
    #  3-grams: nothing kept or to keep: F = 1; delete {"a b c"}: P = 1; add {"a b d"}, nothing wanted: P = 0, R = 1 -> F = 0
    #  4-grams: nothing at all: 1, 1, 1
    #  keep (2/3 + 0 + 1 + 1)/4 = 2/3, delete 1, add (1 + 0 + 0 + 1)/4 = 1/2 -> SARI = (2/3 + 1 + 1/2)/3 = 13/18
    assert sari_sentence("a b c", "a b d", ["a d"]) == pytest.approx(13 / 18)
    assert sari_sentence("A b", "a B", ["a b"]) == pytest.approx(1.0)  # lower-cased; all kept as wanted
    # the worked example of the Hugging Face `sari` metric card (three references), 26.9536...
    assert sari_sentence("About 95 species are currently accepted.", "About 95 you now get in.",
                         ["About 95 species are currently known.", "About 95 species are now accepted.",
                          "95 species are now accepted."]) == pytest.approx(0.26953601953601954)
    scores = score("sari", ["a b d", ""], [("a d",), ("a d",)], ["a b c", "a b c"])
    assert scores.tolist() == pytest.approx([13 / 18, 0.0])  # an empty prediction scores 0
    with pytest.raises(ValueError, match="prompts"):
        SCORERS["sari"](["a"], [("a",)])
