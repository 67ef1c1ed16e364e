"""cl-bench streams as Avalanche benchmarks: same class order, same splits, same samples."""
import pytest

import cl_bench
from cl_bench.avalanche_interop import check_same_data
from cl_bench.errors import UserError
from cl_bench.registry import SCENARIOS


@pytest.mark.parametrize("name, settings", [("toy", {}), ("digits", {"init": 4, "increment": 3}),
                                            ("chatterbot", {})])
def test_to_avalanche_keeps_classes_splits_and_samples(name, settings):
    stream = SCENARIOS.get(name)(**settings).stream()
    benchmark = cl_bench.to_avalanche(stream)
    summary = check_same_data(stream, benchmark)  # raises on any difference
    assert summary.startswith("train " + "/".join(str(len(t.train)) for t in stream.tasks))
    assert [sorted(e.classes_in_this_experience) for e in benchmark.train_stream] == \
        [list(t.classes) for t in stream.tasks]


def test_check_same_data_notices_a_changed_sample():
    stream = SCENARIOS.get("toy")().stream()
    benchmark = cl_bench.to_avalanche(stream)
    other = SCENARIOS.get("toy")(data_seed=1).stream()
    with pytest.raises(AssertionError, match="samples differ"):
        check_same_data(other, benchmark)


def test_instruction_streams_are_refused():
    stream = SCENARIOS.get("instruct_toy")().stream()
    with pytest.raises(UserError, match="class-incremental"):
        cl_bench.to_avalanche(stream)
