"""RankGrid against a brute-force enumeration, for every layout of every world up to 64 ranks."""

from __future__ import annotations

import itertools

import pytest

from megalith.errors import ConfigError
from megalith.parallel.grid import RankCoords, RankGrid

DIMS = ("tp", "cp", "dp", "pp")
VARIED = {
    "tp": {"tp"}, "cp": {"cp"}, "dp": {"dp"}, "pp": {"pp"},
    "mp": {"tp", "pp"}, "dp_cp": {"dp", "cp"}, "tp_cp": {"tp", "cp"},
}


def factorizations(n: int, parts: int = 4) -> list[tuple[int, ...]]:
    """All ordered tuples of `parts` positive ints whose product is n."""
    if parts == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, parts - 1)]


def brute_force(tp: int, cp: int, dp: int, pp: int) -> tuple[dict[int, dict], dict[str, list[list[int]]]]:
    """Coordinates of each rank and every group, by counting ranks in pp>dp>cp>tp nesting order."""
    coords = {}
    for rank, (p, d, c, t) in enumerate(itertools.product(range(pp), range(dp), range(cp), range(tp))):
        coords[rank] = {"tp": t, "cp": c, "dp": d, "pp": p}
    groups = {}
    for kind, varied in VARIED.items():
        buckets: dict[tuple, list[int]] = {}
        for rank, c in coords.items():
            buckets.setdefault(tuple(c[x] for x in DIMS if x not in varied), []).append(rank)
        groups[kind] = sorted(sorted(g) for g in buckets.values())
    embedding = []
    for g in groups["pp"]:
        by_stage = {coords[r]["pp"]: r for r in g}
        embedding.append([by_stage[0], by_stage[pp - 1]] if pp > 1 else [by_stage[0]])
    groups["embedding"] = sorted(embedding)
    return coords, groups


def test_factorizations_helper():
    assert sorted(factorizations(4, 2)) == [(1, 4), (2, 2), (4, 1)]
    assert len(factorizations(64)) == 84  # C(6+3, 3)


@pytest.mark.parametrize("world", [pytest.param(w, marks=pytest.mark.slow) if w > 32 else w for w in range(1, 65)])
def test_every_layout_matches_brute_force(world):
    for tp, cp, dp, pp in factorizations(world):
        coords, expected = brute_force(tp, cp, dp, pp)
        implicit = RankGrid(world, tp=tp, pp=pp, cp=cp)
        explicit = RankGrid(world, tp=tp, pp=pp, cp=cp, dp=dp)
        assert implicit == explicit and implicit.dp == dp
        grid = explicit
        for rank in range(world):
            c = grid.coords(rank)
            assert c == RankCoords(**coords[rank])
            assert grid.rank_of(tp=c.tp, cp=c.cp, dp=c.dp, pp=c.pp) == rank
        for kind in RankGrid.GROUP_KINDS:
            got = grid.groups(kind)
            assert got == expected[kind], (str(grid), kind)
            owner = {rank: g for g in got for rank in g}
            for rank in range(world):
                assert grid.group_of(kind, rank) == owner.get(rank), (str(grid), kind, rank)


@pytest.mark.parametrize("world", [1, 8, 12, 24, 48, 64])
def test_group_structure(world):
    for tp, cp, dp, pp in factorizations(world):
        grid = RankGrid(world, tp=tp, pp=pp, cp=cp)
        size = {"tp": tp, "cp": cp, "dp": dp, "pp": pp, "mp": tp * pp, "dp_cp": dp * cp, "tp_cp": tp * cp}
        for kind, n in size.items():
            groups = grid.groups(kind)
            assert all(len(g) == n for g in groups)
            assert sorted(r for g in groups for r in g) == list(range(world))  # a partition
            assert [g[0] for g in groups] == sorted(g[0] for g in groups)
        for g in grid.groups("tp"):  # tp varies fastest: neighbouring ranks
            assert g == list(range(g[0], g[0] + tp))
        embedding = grid.groups("embedding")
        assert len(embedding) == tp * cp * dp
        for e in embedding:
            stages = [grid.coords(r).pp for r in e]
            assert stages == ([0, pp - 1] if pp > 1 else [0])


def test_known_layout_and_str():
    grid = RankGrid(8, tp=2, pp=2)
    assert grid.dp == 2 and grid.ORDER == "tp-cp-dp-pp"
    assert str(grid) == "tp2.cp1.dp2.pp2 (world 8)"
    assert grid.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid.groups("embedding") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid.coords(5) == RankCoords(tp=1, cp=0, dp=0, pp=1)
    assert RankGrid(4, pp=4).group_of("embedding", 1) is None
    assert RankGrid(4, pp=4).group_of("embedding", 3) == [0, 3]


def assert_one_line_error(call, *mentions):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    for m in mentions:
        assert str(m) in message, (message, m)
    return message


def test_sizes_not_dividing_world():
    msg = assert_one_line_error(lambda: RankGrid(8, tp=3), "3", "8")
    assert "divide" in msg
    assert_one_line_error(lambda: RankGrid(12, tp=2, pp=2, cp=2), "2", "8", "12")


def test_explicit_dp_inconsistent():
    assert_one_line_error(lambda: RankGrid(8, tp=2, pp=2, dp=3), "2", "3", "12", "8")
    assert_one_line_error(lambda: RankGrid(8, tp=2, dp=2), "4", "8")


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"world_size": 0}, 0),
        ({"world_size": -4}, -4),
        ({"world_size": 4, "tp": 0}, 0),
        ({"world_size": 4, "pp": -1}, -1),
        ({"world_size": 4, "cp": 0}, 0),
        ({"world_size": 4, "dp": 0}, 0),
        ({"world_size": 4, "tp": 2.0}, 2.0),
        ({"world_size": 4, "tp": True}, True),
    ],
)
def test_non_positive_or_non_integer_sizes(kwargs, bad):
    assert_one_line_error(lambda: RankGrid(**kwargs), bad)


def test_out_of_range_coordinates():
    grid = RankGrid(8, tp=2, pp=2)
    assert_one_line_error(lambda: grid.coords(8), "8")
    assert_one_line_error(lambda: grid.coords(-1), "-1")
    assert_one_line_error(lambda: grid.rank_of(tp=2), "tp", "2")
    assert_one_line_error(lambda: grid.rank_of(pp=-1), "pp", "-1")
    assert_one_line_error(lambda: grid.group_of("tp", 9), "9")


def test_unknown_group_kind():
    grid = RankGrid(4, tp=2)
    msg = assert_one_line_error(lambda: grid.groups("ep"), "ep")
    assert all(kind in msg for kind in RankGrid.GROUP_KINDS)
    assert_one_line_error(lambda: grid.group_of("model", 0), "model", "embedding")
