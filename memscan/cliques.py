"""Largest clique of the generation graph (Carlini et al. 2023, §4.1).

For one prompt's N generations, an edge joins i and j when ``tiled_l2(x_i, x_j) < alpha``. A
prompt whose graph has a clique of at least ``k`` members (paper: k = 10 of N = 500) is flagged;
the clique's medoid is the candidate training-data copy, and candidates are ranked by the mean
pairwise distance inside the clique.

Maximum clique is NP-hard, and both extremes occur in practice: a strongly memorized prompt gives
a nearly complete graph (easy for the method below), and adversarial or very dense random graphs
exist (hard). The method:

0. Exact reductions in the complement graph: a vertex joined to every other vertex is in a
   maximum clique; a vertex missing exactly one edge, to ``w``, can replace ``w`` in any
   maximum clique, so ``w`` is dropped. Repeated until nothing changes, this often solves the
   near-complete graph of a memorized prompt outright.
1. Order vertices by degree and take a greedy clique as the first lower bound.
2. Branch and bound with a greedy-colouring upper bound (Tomita & Seki's MCQ), vertices as
   bitsets. When the search finishes, the clique is exact (``method="exact"``).
3. The search stops after ``max_expansions`` branch steps. The best clique found so far is
   returned with ``method="bounded"`` and ``upper_bound`` the largest colouring bound over the
   branches not yet explored (never above the root's), so the result is always a true clique
   and its gap to the optimum is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from memscan.errors import InputError

#: Default branch-step budget. A step costs O(candidates) big-integer operations: ~20 µs on a
#: dense random graph of 300 nodes (100k steps ≈ 2–3 s on one core), but up to ~0.2 ms on hard
#: near-complete graphs of 500 nodes (100k steps ≈ 20 s); lower it where that matters.
DEFAULT_MAX_EXPANSIONS = 100_000


@dataclass(frozen=True)
class CliqueResult:
    """The largest clique found in one generation graph.

    Attributes
    ----------
    members : sorted indices of the clique's generations
    size : number of members
    medoid : index of the member with the least total distance to the other members
    mean_distance : mean pairwise distance inside the clique (0 for fewer than 2 members)
    method : ``"exact"`` (proven maximum) or ``"bounded"`` (search budget reached)
    upper_bound : an upper bound on the maximum clique size (equals ``size`` when exact)
    expansions : branch steps used
    alpha : the edge threshold used
    """

    members: np.ndarray
    size: int
    medoid: int
    mean_distance: float
    method: str
    upper_bound: int
    expansions: int
    alpha: float
    n_nodes: int = field(default=0)
    n_edges: int = field(default=0)


def largest_clique(distances, alpha: float, *, max_expansions: int = DEFAULT_MAX_EXPANSIONS) -> CliqueResult:
    """Largest clique of the graph ``{(i, j): distances[i, j] < alpha, i != j}``.

    Parameters
    ----------
    distances : N×N symmetric array (numpy or torch)
    alpha : float
        Edge threshold (strict ``<``).
    max_expansions : int
        Branch-and-bound step budget; beyond it the best clique found is returned as
        ``method="bounded"``.

    Examples
    --------
    >>> import numpy as np
    >>> d = np.ones((5, 5)); d[np.ix_([0, 2, 4], [0, 2, 4])] = 0.01; np.fill_diagonal(d, 0)
    >>> r = largest_clique(d, alpha=0.1)
    >>> r.members.tolist(), r.method
    ([0, 2, 4], 'exact')
    """
    if hasattr(distances, "detach"):  # torch tensor, on any device
        distances = distances.detach().cpu().numpy()
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise InputError(f"distances must be a square matrix, got shape {d.shape}")
    if np.isnan(d).any():
        raise InputError("distances contain NaN", "check the images that produced them (NaN pixels?)")
    if not np.isfinite(alpha) or alpha <= 0:
        raise InputError(f"alpha must be a positive number, got {alpha!r}")
    n = d.shape[0]
    if n == 0:
        return CliqueResult(np.zeros(0, np.int64), 0, -1, 0.0, "exact", 0, 0, float(alpha))
    adj = (d < alpha) & (d.T < alpha)  # symmetric even if the input is slightly not
    np.fill_diagonal(adj, False)
    n_edges = int(np.count_nonzero(adj)) // 2

    members, method, upper, steps = _max_clique(adj, max_expansions)
    members = np.sort(np.asarray(members, dtype=np.int64))
    sub = _submatrix(d, members)
    k = len(members)
    mean = float(sub[upper_mask(k)].mean()) if k > 1 else 0.0  # row-major, as triu_indices
    medoid = int(members[int(np.argmin(sub.sum(1)))])
    return CliqueResult(members, k, medoid, mean, method, upper, steps, float(alpha), n, n_edges)


def _submatrix(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[np.ix_(idx, idx)]``, as two takes (4× faster at N = 500)."""
    return a.take(idx, axis=0).take(idx, axis=1)


@lru_cache(maxsize=4)
def upper_mask(n: int) -> np.ndarray:
    """Read-only N×N mask of the strict upper triangle: ``a[upper_mask(n)]`` holds the same
    values in the same order as ``a[np.triu_indices(n, 1)]``, built faster."""
    mask = np.arange(n)[:, None] < np.arange(n)
    mask.flags.writeable = False
    return mask


def _max_clique(adj: np.ndarray, budget: int) -> tuple[list[int], str, int, int]:
    # 0. Exact reductions (useful on the near-complete graphs of memorized prompts).
    forced, rest = _reduce(adj)
    if rest.size == 0:
        return forced, "exact", len(forced), 0
    members, method, upper, steps = _search(adj if rest.size == adj.shape[0] else _submatrix(adj, rest), budget)
    members = forced + rest[np.asarray(members, dtype=np.int64)].tolist()
    return members, method, len(forced) + upper, steps


def _reduce(adj: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Shrink the graph without changing its maximum clique size.

    In the complement ("non-edges"), a vertex with no non-neighbour left belongs to a maximum
    clique (take it); a vertex ``u`` with exactly one non-neighbour ``w`` can replace ``w`` in
    any maximum clique (drop ``w``). Returns the vertices taken and the vertices left to search.
    """
    n = adj.shape[0]
    non = ~adj
    np.fill_diagonal(non, False)
    alive = np.ones(n, dtype=bool)
    ndeg = non.sum(1)
    forced: list[int] = []
    todo = list(np.flatnonzero(ndeg <= 1)[::-1])
    while todo:
        u = int(todo.pop())
        if not alive[u] or ndeg[u] > 1:
            continue
        if ndeg[u] == 1:
            w = int(np.flatnonzero(non[u] & alive)[0])
            alive[w] = False
            hit = np.flatnonzero(non[w] & alive)
            ndeg[hit] -= 1
            todo.extend(int(x) for x in hit if ndeg[x] <= 1)
        # u is now adjacent to every vertex left: it is in a maximum clique of what is left
        alive[u] = False
        forced.append(u)
    return forced, np.flatnonzero(alive)


def _search(adj: np.ndarray, budget: int) -> tuple[list[int], str, int, int]:
    n = adj.shape[0]
    # 1. Order by degree, highest first; vertex positions in the bitsets follow this order.
    degree = adj.sum(1)
    order = np.argsort(-degree, kind="stable")
    pos_adj = _submatrix(adj, order)

    # 2. Greedy lower bound: repeatedly take the candidate with most neighbours among candidates.
    #    The colouring below never uses more than max degree + 1 colours (a vertex left out of
    #    a colour class has a neighbour in it), so a greedy clique of that size is the maximum,
    #    with the same result as the check after the colouring (a clique's graph, plus
    #    isolated vertices: the memorized prompt's).
    best = _greedy(pos_adj)
    if len(best) >= int(degree.max()) + 1:
        return order[np.asarray(best, dtype=np.int64)].tolist(), "exact", len(best), 0
    packed = np.packbits(pos_adj, axis=1, bitorder="little")
    nbrs = [int.from_bytes(packed[i].tobytes(), "little") for i in range(n)]
    full = (1 << n) - 1
    root_bound = max(_colour_bound(nbrs, full), len(best))
    if len(best) >= root_bound:
        return order[np.asarray(best, dtype=np.int64)].tolist(), "exact", len(best), 0

    # 3. Branch and bound (MCQ) with an explicit stack (no recursion limit on clique size).
    #    A frame is [candidates left, vertices in colour order, their colours, next index];
    #    the frame at depth k extends the first k members of ``clique``.
    clique: list[int] = []
    verts, bounds = _colour_sort(nbrs, full)
    stack = [[full, verts, bounds, len(verts) - 1]]
    steps = 0
    stopped = False
    while stack:
        frame = stack[-1]
        cand, verts, bounds, idx = frame
        if idx < 0 or len(clique) + bounds[idx] <= len(best):
            stack.pop()  # nothing left here can beat the best clique
            if clique:
                clique.pop()
            continue
        if steps >= budget:
            stopped = True
            break
        steps += 1
        v = verts[idx]
        frame[3] = idx - 1
        frame[0] = cand & ~(1 << v)
        new_cand = cand & nbrs[v]
        clique.append(v)
        if new_cand:
            nv, nb = _colour_sort(nbrs, new_cand)
            stack.append([new_cand, nv, nb, len(nv) - 1])
        else:
            if len(clique) > len(best):
                best = list(clique)
            clique.pop()
    members = [int(order[v]) for v in best]
    if stopped:
        # Every unexplored branch lies in some open frame: at depth k, at most k + (colour of
        # its next vertex) members. That bound is never above the root's colouring bound.
        upper = len(best)
        for k, (_, _, fb, fi) in enumerate(stack):
            if fi >= 0:
                upper = max(upper, k + fb[fi])
        upper = min(upper, root_bound)
        if upper > len(best):
            return members, "bounded", upper, steps
    return members, "exact", len(members), steps


def _iter_bits(x: int):
    while x:
        low = x & -x
        yield low.bit_length() - 1
        x ^= low


def _greedy(adj: np.ndarray) -> list[int]:
    """Greedy clique: repeatedly take the candidate with the most neighbours among the
    candidates (the lowest position on ties). Those counts are updated as candidates leave, in
    numpy: O(n²) in all (a near-complete graph of 460 used to cost 0.1 M Python steps); a run
    of candidates joined to all the others is taken in one step (460 steps → a few)."""
    cand = np.ones(adj.shape[0], dtype=bool)
    deg = adj.sum(1, dtype=np.int64)  # neighbours among the candidates
    n_cand = adj.shape[0]
    clique: list[int] = []
    while n_cand:
        v = int(np.argmax(np.where(cand, deg, -1)))
        if deg[v] == n_cand - 1:
            # 1. v is joined to every other candidate. So is every candidate u with the same
            #    count, and taking one of them leaves the others so (each count drops by one):
            #    the one-by-one greedy would take all of them next, in ascending position (its
            #    tie rule). Take them at once (a near-complete graph: a few steps, not ~N).
            universal = np.flatnonzero(cand & (deg == n_cand - 1))
            clique.extend(universal.tolist())
            leaving = np.zeros_like(cand)
            leaving[universal] = True
        else:
            # 2. Otherwise v alone; the candidates not joined to it leave.
            clique.append(v)
            leaving = cand & ~adj[v]  # v itself included (no self-loops)
        cand &= ~leaving
        n_cand -= int(leaving.sum())
        deg -= adj[:, leaving].sum(1, dtype=np.int64)
    return clique


def _colour_sort(nbrs: list[int], cand: int) -> tuple[list[int], list[int]]:
    """Greedy sequential colouring; vertices in colour order with their colour numbers."""
    verts: list[int] = []
    bounds: list[int] = []
    uncoloured = cand
    colour = 0
    while uncoloured:
        colour += 1
        q = uncoloured
        while q:
            low = q & -q
            v = low.bit_length() - 1
            q &= ~nbrs[v] & ~low
            uncoloured &= ~low
            verts.append(v)
            bounds.append(colour)
    return verts, bounds


def _colour_bound(nbrs: list[int], cand: int) -> int:
    _, bounds = _colour_sort(nbrs, cand)
    return bounds[-1] if bounds else 0
