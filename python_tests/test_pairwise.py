"""python_tests/pairwise.py, the covering-array generator the parametrised tests use: every valid pair of values is
covered, every case is valid, the result is deterministic and far smaller than the cross product."""
import itertools

import pytest

from pairwise import pairwise


def covered_pairs(cases, names):
    return {(a, c[a], b, c[b]) for c in cases for a, b in itertools.combinations(names, 2)}


def required_pairs(params, valid):
    names = list(params)
    out = set()
    for combo in itertools.product(*params.values()):
        case = dict(zip(names, combo, strict=False))
        if valid is None or valid(case):
            out |= covered_pairs([case], names)
    return out


GRIDS = [
    ({"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 1, 2], "d": [0, 1, 2]}, None),
    ({"x": list(range(8)), "y": [True, False], "z": ["p", "q"], "w": [0.0, 1e-8], "v": [1, 2, 3]}, None),
    # a constraint: "big" shapes only on backend "cpu" (the interpreter's restriction in sinkhorn_harness.py)
    ({"backend": ["cpu", "triton"], "shape": ["s1", "s2", "big1", "big2"], "dtype": ["f32", "f64"],
      "log": [False, True]}, lambda c: c["backend"] == "cpu" or not c["shape"].startswith("big")),
]


@pytest.mark.parametrize("params,valid", GRIDS)
def test_every_valid_pair_is_covered_by_valid_cases(params, valid):
    cases = pairwise(params, valid)
    names = list(params)
    assert all(set(c) == set(names) for c in cases)
    assert all(valid is None or valid(c) for c in cases)
    assert covered_pairs(cases, names) >= required_pairs(params, valid)
    assert len({tuple(c.values()) for c in cases}) == len(cases)  # no repeated case
    assert pairwise(params, valid) == cases  # deterministic


def test_much_smaller_than_the_cross_product():
    cases = pairwise({"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 1, 2], "d": [0, 1, 2]})
    assert 9 <= len(cases) <= 12  # 3^4 = 81; 9 is the optimum (an orthogonal array)
    cases = pairwise({"x": list(range(8)), "y": [0, 1], "z": [0, 1], "w": [0, 1], "v": [0, 1]})
    assert 16 <= len(cases) <= 20  # 128 combinations; 8 x 2 = 16 is a lower bound


def test_constraint_removes_impossible_pairs_only():
    params, valid = GRIDS[2]
    cases = pairwise(params, valid)
    assert not any(c["backend"] == "triton" and c["shape"].startswith("big") for c in cases)
    for shape in ("big1", "big2"):  # the pairs a big shape can have are still all there (on the CPU)
        assert {c["dtype"] for c in cases if c["shape"] == shape} == {"f32", "f64"}
        assert {c["log"] for c in cases if c["shape"] == shape} == {False, True}


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="at least one value"):
        pairwise({"a": []})
    with pytest.raises(ValueError, match="no valid combination"):
        pairwise({"a": [1, 2], "b": [3]}, lambda c: False)
    with pytest.raises(ValueError, match="split the grid"):
        pairwise({k: list(range(20)) for k in "abcde"})
    assert pairwise({"a": [1, 2]}) == [{"a": 1}, {"a": 2}]
