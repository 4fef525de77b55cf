"""PHAST search on a small UNet."""
from __future__ import annotations

import pytest
import torch

import attnreuse
from attnreuse.phast import greedy_search, neighbours
from tests.helpers import make_unet, sample


def test_neighbours_keep_reuse_count_and_first_step():
    base = attnreuse.hurry(6, 2)
    ns = neighbours(base)
    assert len(ns) == 2 * 3  # 2 reuse steps x 3 computing steps after the first
    assert all(n[0] == 1 and n.count(0) == 2 and n != base for n in ns)
    assert len(set(ns)) == len(ns)


def test_phast_improves_or_keeps_hurry():
    unet = make_unet("sd15")
    def generate():
        return torch.cat([sample(unet, steps=6, seed=s) for s in (0, 1)])

    res = attnreuse.phast(unet, generate, steps=6, reuse=2, epsilon=0.0, max_rounds=2,
                          data_range=8.0)
    assert res.schedule[0] == 1 and res.schedule.count(0) == 2 and len(res.schedule) == 6
    assert res.utility >= res.start_utility
    assert res.samplings == 2 + sum(t.evaluated for t in res.trace)  # reference + HURRY + neighbours
    assert 1 <= len(res.trace) <= 2
    if res.trace[0].accepted:
        assert res.utility > res.start_utility and res.schedule != attnreuse.hurry(6, 2)
    utilities = [t.utility for t in res.trace]
    assert utilities == sorted(utilities)
    assert not hasattr(unet, "_attnreuse_handle")  # every candidate was unpatched


def test_phast_rejects_bad_start():
    with pytest.raises(ValueError, match="must have 6 steps with 2 reuse steps"):
        attnreuse.phast(make_unet("sd15"), lambda: torch.zeros(1), 6, 2, start="111000")


def test_psnr():
    ref = torch.zeros(2, 1, 4, 4)
    img = ref.clone()
    img[0] += 0.1
    db = attnreuse.psnr(img, ref)
    assert db[0].item() == pytest.approx(20.0) and db[1].item() == 100.0



def test_greedy_search_scores_each_round_in_one_call_and_breaks_ties_by_order():
    """A synthetic utility with ties: the start, then each round's unseen neighbours in one call, in order;
    the first of equally good candidates wins."""
    def score(s):
        return float(sum(i * b for i, b in enumerate(s)) // 3)

    calls = []

    def evaluate(schedules):
        calls.append(list(schedules))
        return [score(s) for s in schedules]

    rounds = []
    res = greedy_search(evaluate, 6, 2, epsilon=0.0, on_round=rounds.append)
    assert calls[0] == [attnreuse.hurry(6, 2)] and calls[1] == neighbours(attnreuse.hurry(6, 2))
    assert rounds == res.trace and res.samplings == 1 + sum(len(c) for c in calls)
    first = calls[1]
    top = max(score(s) for s in first)
    if res.trace[0].accepted:
        assert res.trace[0].schedule == attnreuse.schedule.to_string(next(s for s in first if score(s) == top))
    assert all(not set(a) & set(b) for a, b in zip(calls, calls[1:]))  # nothing scored twice
