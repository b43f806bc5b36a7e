"""Tests for memscan.cliques.largest_clique: exactness, budget, medoid and ranking statistics."""

from __future__ import annotations

import inspect
import sys

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memscan.cliques import largest_clique
from memscan.errors import InputError

ALPHA = 0.5


def random_graph(rng, n: int, p: float) -> np.ndarray:
    """Distances for G(n, p): 0.1 on edges, 0.9 off them, 0 on the diagonal."""
    upper = np.triu(rng.random((n, n)) < p, 1)
    adj = upper | upper.T
    d = np.where(adj, 0.1, 0.9)
    np.fill_diagonal(d, 0.0)
    return d


def is_clique(d: np.ndarray, members, alpha: float = ALPHA) -> bool:
    m = list(members)
    return all(d[i, j] < alpha for a, i in enumerate(m) for j in m[a + 1 :])


def nx_clique_number(d: np.ndarray, alpha: float = ALPHA) -> int:
    n = d.shape[0]
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from((i, j) for i in range(n) for j in range(i + 1, n) if d[i, j] < alpha)
    _, weight = nx.algorithms.clique.max_weight_clique(g, weight=None)
    return int(weight)


def test_planted_clique_in_sparse_graph():
    rng = np.random.default_rng(0)
    d = random_graph(rng, 200, 0.05)
    planted = np.sort(rng.choice(200, 25, replace=False))
    d[np.ix_(planted, planted)] = rng.uniform(0.01, 0.3, (25, 25))
    d = np.minimum(d, d.T)
    np.fill_diagonal(d, 0.0)
    r = largest_clique(d, ALPHA)
    assert r.method == "exact"
    assert r.members.tolist() == planted.tolist()
    assert r.size == 25 and r.upper_bound == 25
    assert r.alpha == ALPHA and r.n_nodes == 200
    adj = (d < ALPHA) & ~np.eye(200, dtype=bool)
    assert r.n_edges == int(adj.sum()) // 2


def test_complete_graph_500_is_exact_without_search():
    """The memorized extreme (every generation a copy): the greedy bound meets the colouring
    bound, so no branch is expanded (the speed itself is measured in bench/detect.py)."""
    d = np.full((500, 500), 0.01)
    np.fill_diagonal(d, 0.0)
    r = largest_clique(d, ALPHA)
    assert r.size == 500 and r.method == "exact" and r.upper_bound == 500
    assert r.members.tolist() == list(range(500))
    assert r.expansions == 0


def test_dense_random_graph_finishes_within_budget():
    rng = np.random.default_rng(1)
    d = random_graph(rng, 300, 0.9)
    budget = 2_000
    r = largest_clique(d, ALPHA, max_expansions=budget)
    assert r.method in ("bounded", "exact")
    assert r.expansions <= budget
    assert is_clique(d, r.members)
    assert len(set(r.members.tolist())) == r.size >= 20
    assert r.upper_bound >= r.size
    if r.method == "exact":
        assert r.upper_bound == r.size


def test_zero_budget_still_returns_a_true_clique():
    rng = np.random.default_rng(2)
    d = random_graph(rng, 120, 0.7)
    r = largest_clique(d, ALPHA, max_expansions=0)
    assert is_clique(d, r.members)
    assert r.expansions == 0
    assert r.upper_bound >= r.size
    assert r.method in ("bounded", "exact")


def test_deep_search_needs_no_recursion():
    """Complement = 100 disjoint 5-cycles: ω = 200 but the colouring bound is 300.

    The search must go ~200 levels deep; it runs with a recursion limit far below that.
    """
    m = 100
    n = 5 * m
    d = np.full((n, n), 0.1)
    for b in range(m):
        for k in range(5):
            i, j = 5 * b + k, 5 * b + (k + 1) % 5
            d[i, j] = d[j, i] = 0.9
    np.fill_diagonal(d, 0.0)
    perm = np.random.default_rng(3).permutation(n)
    d = d[np.ix_(perm, perm)]
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 100)
    try:
        r = largest_clique(d, ALPHA, max_expansions=400)
    finally:
        sys.setrecursionlimit(old)
    assert is_clique(d, r.members)
    assert r.size == 2 * m  # the greedy start already finds the optimum
    assert r.size <= r.upper_bound <= 3 * m


def test_near_complete_graph_is_reduced():
    """A memorized prompt: almost every pair is close. When the missing edges form a forest,
    the reductions alone solve it (exact, no branching): ω = n − maximum matching of the forest
    (König), checked with networkx."""
    rng = np.random.default_rng(4)
    n = 600
    d = np.full((n, n), 0.05)
    forest = nx.Graph()
    forest.add_nodes_from(range(n))
    perm = rng.permutation(n)
    for k in range(1, n):
        if rng.random() < 0.8:
            u, v = int(perm[k]), int(perm[rng.integers(0, k)])
            d[u, v] = d[v, u] = 0.8
            forest.add_edge(u, v)
    np.fill_diagonal(d, 0.0)
    r = largest_clique(d, ALPHA, max_expansions=0)
    matching = nx.max_weight_matching(forest, maxcardinality=True)
    assert r.method == "exact" and r.expansions == 0
    assert r.size == r.upper_bound == n - len(matching)
    assert is_clique(d, r.members)


def test_near_complete_graph_matching():
    rng = np.random.default_rng(5)
    n = 600
    d = np.full((n, n), 0.05)
    perm = rng.permutation(n)
    for k in range(0, 400, 2):
        d[perm[k], perm[k + 1]] = d[perm[k + 1], perm[k]] = 0.8
    np.fill_diagonal(d, 0.0)
    r = largest_clique(d, ALPHA, max_expansions=10)
    assert r.method == "exact" and r.size == n - 200 and r.upper_bound == r.size
    assert is_clique(d, r.members)


def test_medoid_and_mean_distance_vs_brute_force():
    rng = np.random.default_rng(5)
    n = 60
    d = random_graph(rng, n, 0.05)
    planted = np.sort(rng.choice(n, 12, replace=False))
    inner = rng.uniform(0.0, 0.4, (12, 12))
    inner = (inner + inner.T) / 2
    np.fill_diagonal(inner, 0.0)
    d[np.ix_(planted, planted)] = inner
    r = largest_clique(d, ALPHA)
    assert r.members.tolist() == planted.tolist()
    sub = d[np.ix_(planted, planted)]
    totals = [sum(sub[i, j] for j in range(12)) for i in range(12)]
    assert r.medoid == planted[int(np.argmin(totals))]
    pairs = [sub[i, j] for i in range(12) for j in range(i + 1, 12)]
    assert r.mean_distance == pytest.approx(float(np.mean(pairs)), abs=1e-12)


def test_medoid_ties_and_tiny_graphs():
    empty = largest_clique(np.zeros((0, 0)), ALPHA)
    assert empty.size == 0 and empty.method == "exact" and empty.members.shape == (0,)
    one = largest_clique(np.zeros((1, 1)), ALPHA)
    assert one.size == 1 and one.medoid == 0 and one.mean_distance == 0.0
    none = largest_clique(np.full((4, 4), 0.9) - np.eye(4) * 0.9, ALPHA)
    assert none.size == 1 and none.method == "exact" and none.n_edges == 0
    # all distances equal: every member is a medoid; the lowest index wins
    same = np.full((5, 5), 0.2)
    np.fill_diagonal(same, 0.0)
    r = largest_clique(same, ALPHA)
    assert r.size == 5 and r.medoid == 0 and r.mean_distance == pytest.approx(0.2)


def test_threshold_is_strict_and_asymmetry_tolerated():
    d = np.array([[0.0, 0.5, 0.1], [0.5, 0.0, 0.1], [0.1, 0.1, 0.0]])
    assert largest_clique(d, 0.5).size == 2  # 0.5 is not < 0.5
    assert largest_clique(d, 0.5000001).size == 3
    d2 = d.copy()
    d2[0, 1] = 0.1  # one direction below alpha: an edge needs both
    assert largest_clique(d2, 0.5).size == 2


def test_torch_input():
    d = torch.full((6, 6), 0.1)
    d.fill_diagonal_(0.0)
    d[0, 5] = d[5, 0] = 0.9
    r = largest_clique(d, ALPHA)
    assert r.size == 5 and r.method == "exact"


def test_errors():
    with pytest.raises(InputError, match="square matrix"):
        largest_clique(np.zeros((3, 4)), ALPHA)
    with pytest.raises(InputError, match="alpha must be a positive number"):
        largest_clique(np.zeros((3, 3)), 0.0)
    with pytest.raises(InputError, match="alpha must be a positive number"):
        largest_clique(np.zeros((3, 3)), float("nan"))
    d = np.zeros((3, 3))
    d[0, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        largest_clique(d, ALPHA)


@pytest.mark.parametrize("seed", range(6))
def test_exact_results_match_networkx(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(12):
        n = int(rng.integers(2, 41))
        p = float(rng.choice([0.1, 0.3, 0.5, 0.7, 0.9, 0.97]))
        d = random_graph(rng, n, p)
        r = largest_clique(d, ALPHA)
        assert is_clique(d, r.members)
        assert r.upper_bound >= r.size
        if r.method == "exact":
            assert r.size == nx_clique_number(d)
            assert r.upper_bound == r.size


# --------------------------------------------------------------------------------------------
# properties (hypothesis)
# --------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 24),
    p=st.floats(0.05, 0.98),
    seed=st.integers(0, 2**32 - 1),
)
def test_prop_clique_size_invariant_to_permutation(n, p, seed):
    rng = np.random.default_rng(seed)
    d = random_graph(rng, n, p)
    perm = rng.permutation(n)
    a = largest_clique(d, ALPHA)
    b = largest_clique(d[np.ix_(perm, perm)], ALPHA)
    assert a.method == b.method == "exact"
    assert a.size == b.size
    assert is_clique(d, a.members)
    assert is_clique(d[np.ix_(perm, perm)], b.members)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_prop_colouring_bound_at_most_max_degree_plus_one(n, p, seed):
    """What the search's shortcut rests on: the greedy colouring uses at most Δ + 1 colours,
    so a greedy clique of Δ + 1 members is exact without colouring."""
    from memscan.cliques import _colour_bound

    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < p, 1)
    adj = upper | upper.T
    nbrs = [sum(1 << int(j) for j in np.flatnonzero(adj[i])) for i in range(n)]
    assert _colour_bound(nbrs, (1 << n) - 1) <= int(adj.sum(1).max()) + 1


def test_clique_plus_isolated_vertices_is_exact_without_search():
    """The memorized prompt's graph: a clique of copies and unrelated generations with no edge."""
    rng = np.random.default_rng(5)
    d = np.full((120, 120), 0.9)
    members = np.sort(rng.choice(120, 100, replace=False))
    d[np.ix_(members, members)] = rng.uniform(0.01, 0.3, (100, 100))
    d = np.minimum(d, d.T)
    np.fill_diagonal(d, 0.0)
    r = largest_clique(d, ALPHA)
    assert r.members.tolist() == members.tolist()
    assert (r.method, r.upper_bound, r.expansions) == ("exact", 100, 0)  # the others have no edge
