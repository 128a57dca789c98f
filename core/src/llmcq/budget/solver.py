"""Choose one option per item under a total cost: the multiple-choice knapsack of the
bit-budget search (pure Python, no torch).

Item ``i`` (a linear) has options ``j`` (widths) with an error ``errors[i][j]`` and a cost
``costs[i][j]`` (the linear's total bits at that width). :func:`allocate` minimises
``sum_i errors[i][j_i]`` subject to ``sum_i costs[i][j_i] <= budget``:

1. **Lagrangian relaxation.** For a multiplier ``lam >= 0`` every item independently takes
   ``argmin_j errors[i][j] + lam * costs[i][j]``; the total cost falls as ``lam`` grows.
   Bisection finds the smallest ``lam`` whose choice fits (``x_hi``). By Everett's theorem
   ``x_hi`` is optimal among all allocations costing at most ``cost(x_hi)``.
2. **Greedy fill.** The budget ``x_hi`` leaves unused is spent by repeatedly taking the
   single-item change with the largest error reduction per extra bit that still fits.
3. **Exchanges.** Pairs of single-item changes (one usually cheaper, one dearer) that fit
   together and lower the error are applied, the best pair first, then the fill again.

Guarantees: the result never costs more than ``budget`` (every step checks it; costs and
budget may be ints or :class:`fractions.Fraction` for exact comparison). Gap: the linear
relaxation's optimum has at most one item between two of its options, so when no two items
tie on their error/cost slope at the final multiplier ``x_hi``'s error (and so the result's,
steps 2 and 3 only lower it) is at most
``OPT + max_i max_j (errors[i][j] - errors[i][j'])`` over consecutive options ``j -> j'`` of
one item's lower convex hull: one item's largest error step. On small instances it is
usually the optimum itself (``tests/test_bit_budget.py`` compares with brute force: 290 of
300 random instances of 1-6 items optimal, 272 without the exchanges).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Allocation", "InfeasibleBudget", "allocate", "choose", "hull_gap"]

Number = Any  # int, float or Fraction


class InfeasibleBudget(ValueError):
    """Even the cheapest option of every item costs more than the budget."""

    def __init__(self, minimum: Number, budget: Number) -> None:
        self.minimum = minimum
        self.budget = budget
        super().__init__(f"the cheapest allocation costs {minimum}, more than the budget "
                         f"{budget}")


@dataclass(frozen=True)
class Allocation:
    """The chosen option of every item, its total error and cost, and the multiplier."""

    choice: tuple[int, ...]
    error: float
    cost: Number
    lam: float


def _check(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[Number]]) -> None:
    if len(errors) != len(costs):
        raise ValueError(f"{len(errors)} error rows, {len(costs)} cost rows")
    for i, (e, c) in enumerate(zip(errors, costs, strict=True)):
        if not e or len(e) != len(c):
            raise ValueError(f"item {i}: {len(e)} errors and {len(c)} costs (need as many, "
                             ">= 1)")


def choose(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[Number]],
           lam: float) -> tuple[int, ...]:
    """Every item's ``argmin_j errors + lam * costs`` (ties: the cheaper option, then the
    first)."""
    out = []
    for e, c in zip(errors, costs, strict=True):
        out.append(min(range(len(e)), key=lambda j: (e[j] + lam * float(c[j]), c[j], j)))
    return tuple(out)


def _total(rows: Sequence[Sequence[Any]], choice: Sequence[int]) -> Any:
    return sum(row[j] for row, j in zip(rows, choice, strict=True))


def _greedy_fill(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[Number]],
                 choice: list[int], budget: Number) -> None:
    """Spend what ``choice`` leaves of ``budget``: take the change with the best error
    reduction per extra cost that fits, until none fits (in place)."""
    spent = _total(costs, choice)
    while True:
        best: tuple[float, int, int] | None = None
        for i, (e, c) in enumerate(zip(errors, costs, strict=True)):
            cur = choice[i]
            for j in range(len(e)):
                gain = e[cur] - e[j]
                extra = c[j] - c[cur]
                if gain <= 0 or spent + extra > budget:
                    continue
                rate = float("inf") if extra <= 0 else gain / float(extra)
                if best is None or rate > best[0]:
                    best = (rate, i, j)
        if best is None:
            return
        _, i, j = best
        spent += costs[i][j] - costs[i][choice[i]]
        choice[i] = j


def _exchange(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[Number]],
              choice: list[int], budget: Number, rounds: int) -> None:
    """Pairwise exchanges (in place): move one item to another option (usually cheaper) and
    another item to an option the freed budget pays for, when together they lower the error;
    the best pair per round (the improving moves sorted by extra cost, with the best and
    the best of another item over every prefix: ``O(M log M)`` for ``M`` single-item moves),
    until no pair improves or ``rounds`` are done."""
    from bisect import bisect_right

    for _ in range(rounds):
        slack = budget - _total(costs, choice)
        moves = []  # (extra cost, error change, item, option)
        for i, (e, c) in enumerate(zip(errors, costs, strict=True)):
            cur = choice[i]
            moves += [(c[j] - c[cur], e[j] - e[cur], i, j) for j in range(len(e)) if j != cur]
        ups = sorted((m for m in moves if m[1] < 0), key=lambda m: m[0])
        keys = [m[0] for m in ups]
        # per prefix ups[:k + 1]: the largest error drop, and the largest of another item
        first: list[tuple[Any, ...]] = []
        second: list[tuple[Any, ...] | None] = []
        for m in ups:
            a, b = (first[-1], second[-1]) if first else (None, None)
            if a is None or m[1] < a[1]:
                a, b = m, (a if a is not None and a[2] != m[2] else b)
            elif m[2] != a[2] and (b is None or m[1] < b[1]):
                b = m
            first.append(a)
            second.append(b)
        best: tuple[float, tuple[Any, ...], tuple[Any, ...]] | None = None
        for down in moves:
            k = bisect_right(keys, slack - down[0]) - 1
            if k < 0:
                continue
            up = first[k] if first[k][2] != down[2] else second[k]
            if up is None:
                continue
            gain = -(down[1] + up[1])
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, down, up)
        if best is None:
            return
        _, down, up = best
        choice[down[2]], choice[up[2]] = down[3], up[3]


def allocate(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[Number]],
             budget: Number, *, iterations: int = 100, exchanges: int = 200) -> Allocation:
    """The allocation of the module docstring; raises :class:`InfeasibleBudget` when even
    the cheapest option of every item exceeds ``budget``."""
    _check(errors, costs)
    cheapest = [min(range(len(c)), key=lambda j, c=c, e=e: (c[j], e[j]))
                for e, c in zip(errors, costs, strict=True)]
    minimum = _total(costs, cheapest)
    if minimum > budget:
        raise InfeasibleBudget(minimum, budget)
    hi_choice = choose(errors, costs, 0.0)
    lam_lo, lam_hi = 0.0, 0.0
    if _total(costs, hi_choice) > budget:
        # a multiplier large enough that every item takes a cheapest option: steeper than
        # any error difference per unit of cost
        spread = max(max(e) - min(e) for e in errors)
        steps = [abs(float(a) - float(b)) for c in costs for a in c for b in c if a != b]
        lam_hi = (spread / min(steps) if steps else 0.0) * 2.0 + 1.0
        hi_choice = choose(errors, costs, lam_hi)
        if _total(costs, hi_choice) > budget:  # ties on cost broken by error: take cheapest
            hi_choice = tuple(cheapest)
        for _ in range(iterations):
            mid = 0.5 * (lam_lo + lam_hi)
            if mid in (lam_lo, lam_hi):
                break
            pick = choose(errors, costs, mid)
            if _total(costs, pick) <= budget:
                lam_hi, hi_choice = mid, pick
            else:
                lam_lo = mid
    choice = list(hi_choice)
    _greedy_fill(errors, costs, choice, budget)
    _exchange(errors, costs, choice, budget, rounds=exchanges)
    _greedy_fill(errors, costs, choice, budget)
    cost = _total(costs, choice)
    assert cost <= budget  # every step above checked it
    return Allocation(tuple(choice), float(_total(errors, choice)), cost, lam_hi)


def hull_gap(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[Number]]) -> float:
    """The largest error step between consecutive options of one item's lower convex hull
    (error against cost): the bound on :func:`allocate`'s distance to the optimum."""
    gap = 0.0
    for e, c in zip(errors, costs, strict=True):
        pts = sorted({(float(c[j]), e[j]) for j in range(len(e))})
        hull: list[tuple[float, float]] = []
        for p in pts:
            if hull and p[1] >= hull[-1][1]:
                continue  # dearer and no better: never on the lower-left hull
            while len(hull) >= 2:
                (x1, y1), (x2, y2) = hull[-2], hull[-1]
                if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                    hull.pop()  # hull[-1] lies on or above the segment hull[-2] -> p
                else:
                    break
            hull.append(p)
        gap = max([gap] + [hull[k][1] - hull[k + 1][1] for k in range(len(hull) - 1)])
    return gap
