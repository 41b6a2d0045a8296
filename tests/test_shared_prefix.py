"""engine/shared_prefix.plan: which decode rows read a shared prefix of KV blocks together (numpy only)."""

from __future__ import annotations

import numpy as np

from moeserve.engine import shared_prefix


def tables_of(rows, width=8, junk=99):
    t = np.full((len(rows), width), junk, dtype=np.int32)
    for b, r in enumerate(rows):
        t[b, :len(r)] = r
    return t


def test_groups_by_first_block_and_stops_where_members_diverge():
    # rows 0, 2, 4 share blocks 5, 6 and then diverge; rows 1, 3 share block 7 only; row 5 is alone
    tables = tables_of([[5, 6, 10, 11], [7, 20, 21], [5, 6, 12], [7, 22], [5, 6, 13, 14], [8, 30]])
    positions = np.array([60, 40, 40, 20, 55, 30])  # page 16: whole blocks before the newest token 3, 2, 2, 1, 3, 1
    plan = shared_prefix.plan(tables, positions, 16, max_groups=4, min_saved=0.0, min_rows=1)
    assert plan.num_groups == 2
    groups = {int(plan.plen[g]): plan.rows[plan.start[g]:plan.start[g + 1]].tolist() for g in range(2)}
    assert groups == {32: [0, 2, 4], 16: [1, 3]}
    assert plan.row_prefix.tolist() == [32, 16, 32, 16, 32, 0]
    assert plan.start.tolist()[2:] == [5, 5, 5] and plan.plen.tolist()[2:] == [0, 0]  # empty groups past the real


def test_prefix_ends_before_every_members_newest_token():
    """A member whose newest token lies inside the shared block cannot take that block as prefix (its own key is
    the newest: the decode kernel must read it), so the group's prefix is cut to whole blocks before it."""
    tables = tables_of([[5, 6, 7], [5, 6, 8], [5, 6]])
    plan = shared_prefix.plan(tables, np.array([40, 40, 20]), 16, min_saved=0.0, min_rows=1)
    assert plan.plen[0] == 16 and plan.row_prefix.tolist() == [16, 16, 16]
    assert shared_prefix.plan(tables, np.array([40, 40, 15]), 16, min_saved=0.0, min_rows=1) is None


def test_worth_it_only_above_the_saving_and_the_batch_size():
    tables = tables_of([[5, 6, 10 + b] for b in range(8)] + [[50 + b, 60 + b] for b in range(8)])
    positions = np.full(16, 40)  # 16 rows x 41 keys; the group of 8 spares 7 x 32 of them (34%)
    assert shared_prefix.plan(tables, positions, 16, min_saved=0.30) is not None
    assert shared_prefix.plan(tables, positions, 16, min_saved=0.40) is None
    assert shared_prefix.plan(tables[:6], positions[:6], 16, min_saved=0.0) is None  # below MIN_ROWS


def test_keeps_the_groups_that_spare_most():
    rows = [[1, 2, 100 + b] for b in range(3)] + [[3, 100 + b] for b in range(5)] + [[4, 100 + b] for b in range(2)]
    plan = shared_prefix.plan(tables_of(rows), np.full(10, 40), 16, max_groups=2, min_saved=0.0, min_rows=1)
    # sparing: 2 x 32 (first group), 4 x 16 (second), 1 x 16 (third): the third is left out
    assert plan.num_groups == 2 and sorted(plan.plen.tolist()) == [16, 32]
    assert plan.row_prefix[8:].tolist() == [0, 0]
