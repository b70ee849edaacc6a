"""Layer splits over pipeline stages: even, uneven first/last, never a dropped layer."""

import itertools

import pytest

from megalith.errors import ConfigError
from megalith.parallel.pipeline.split import split_layers


@pytest.mark.parametrize("num_layers,pp,vpp", [(l, p, v) for l, p, v in itertools.product(range(1, 33), range(1, 9), range(1, 5))
                                               if l % (p * v) == 0 and not (v > 1 and p == 1)])
def test_even_splits_cover_every_layer_once(num_layers, pp, vpp):
    stages = split_layers(num_layers, pp, vpp)
    assert len(stages) == pp * vpp
    assert [i for stage in stages for i in stage] == list(range(num_layers))
    assert {len(s) for s in stages} == {num_layers // (pp * vpp)}


def test_uneven_first_and_last():
    assert split_layers(10, 4, first=1, last=3) == [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_layers(7, 2, 2, first=1) == [[0], [1, 2], [3, 4], [5, 6]]
    assert split_layers(5, 2, last=2) == [[0, 1, 2], [3, 4]]
    assert split_layers(4, 2, first=0, last=4) == [[], [0, 1, 2, 3]]


@pytest.mark.parametrize("args,fragment", [
    ((10, 4, 1), "10 layers do not split evenly over 4 pipeline stages"),
    ((8, 4, 2, 2, None), "leave 6 layers for 7 stages"),
    ((4, 2, 1, 1, 2), "add up to 3, not the 4 layers"),
    ((4, 2, 1, 5, None), "exceed the 4 layers"),
    ((4, 1, 2), "virtual pipeline stages (2) need a pipeline"),
])
def test_splits_that_do_not_add_up(args, fragment):
    with pytest.raises(ConfigError) as info:
        split_layers(*args)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
