"""A small deterministic pairwise (strength-2 covering array) generator for the tests' parameter grids.

`pairwise(params, valid)` returns cases (dicts) such that every pair of values of two different parameters that
occurs together in at least one valid combination occurs together in at least one returned case, and every
returned case is valid. Instead of the full cross product (the product of the sizes) the number of cases grows
like the product of the two largest sizes.

The construction is the greedy one of AETG (Cohen et al., IEEE TSE 1997), made deterministic: among the valid
combinations of the full product (enumerated in itertools.product order, so keep grids small: at most
MAX_PRODUCT combinations), repeatedly take the first one that covers the most pairs still uncovered. Same input,
same cases, in the same order.
"""
import itertools

MAX_PRODUCT = 200_000


def _pairs(combo):
    """The (i, value_i, j, value_j) pairs, i < j, of one combination (a tuple of value indices)."""
    return {(i, combo[i], j, combo[j]) for i, j in itertools.combinations(range(len(combo)), 2)}


def pairwise(params, valid=None):
    """Cases covering every valid pair of values of `params` ({name: [values]}; at least one parameter, no empty
    value list). `valid(case) -> bool` rules out combinations (its impossible pairs are then not required).
    Returns a list of {name: value} dicts in a deterministic order."""
    names = list(params)
    values = [list(params[k]) for k in names]
    if not names or any(len(v) == 0 for v in values):
        raise ValueError("pairwise: every parameter needs at least one value")
    total = 1
    for v in values:
        total *= len(v)
    if total > MAX_PRODUCT:
        raise ValueError(f"pairwise: {total} combinations, more than {MAX_PRODUCT}: split the grid")

    def case(combo):
        return {k: values[i][c] for i, (k, c) in enumerate(zip(names, combo, strict=False))}

    combos = [c for c in itertools.product(*(range(len(v)) for v in values)) if valid is None or valid(case(c))]
    if not combos:
        raise ValueError("pairwise: no valid combination")
    if len(names) == 1:
        return [case(c) for c in combos]
    pairs_of = [_pairs(c) for c in combos]
    uncovered = set().union(*pairs_of)
    chosen = []
    while uncovered:
        best, best_gain = None, 0
        for k, p in enumerate(pairs_of):
            gain = len(p & uncovered)
            if gain > best_gain:
                best, best_gain = k, gain
        chosen.append(combos[best])
        uncovered -= pairs_of[best]
    return [case(c) for c in chosen]


def as_params(cases, names, ids=None):
    """The cases as a list of pytest.param tuples in the order of `names` (for @pytest.mark.parametrize), with
    ids from `ids(case)` when given."""
    import pytest

    return [pytest.param(*(c[k] for k in names), id=ids(c) if ids else None) for c in cases]
