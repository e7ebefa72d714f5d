"""The sweep's search space: fields checked against the recipe, grids, values written into a
copy of the recipe's YAML."""

from __future__ import annotations

import pytest

from domainlm.errors import UserError
from domainlm.recipe import SweepParam
from domainlm.sweep.space import check_field, grid, grid_values, with_values


def test_fields_must_be_recipe_settings():
    check_field("finetune.full.lr", "here")
    check_field("train.early_stopping.patience", "here")
    with pytest.raises(UserError, match="'finetune.full.rate' is not a recipe field"):
        check_field("finetune.full.rate", "here")
    with pytest.raises(UserError, match="is a whole section"):
        check_field("finetune.lora", "here")
    with pytest.raises(UserError, match="is a setting, not a section"):
        check_field("train.lr.peak", "here")


def test_grid_values_spread_over_ranges_and_keep_choices():
    assert grid_values(SweepParam(low=1e-4, high=1e-2, log=True, points=3)) == [1e-4, 1e-3, 1e-2]
    assert grid_values(SweepParam(low=0.0, high=1.0, points=5)) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert grid_values(SweepParam(low=1, high=8, log=True, points=4)) == [1, 2, 4, 8]
    assert grid_values(SweepParam(choices=["a", "b"])) == ["a", "b"]
    combos = grid({"x": SweepParam(choices=[1, 2]), "y": SweepParam(choices=["a", "b"])})
    assert combos == [{"x": 1, "y": "a"}, {"x": 1, "y": "b"}, {"x": 2, "y": "a"},
                      {"x": 2, "y": "b"}]


def test_values_go_into_a_copy_of_the_yaml():
    data = {"finetune": {"full": {"lr": 1e-4}}, "seed": 1}
    out = with_values(data, {"finetune.full.lr": 3e-4, "train.lr": 1e-3, "seed": 2})
    assert out == {"finetune": {"full": {"lr": 3e-4}}, "train": {"lr": 1e-3}, "seed": 2}
    assert data == {"finetune": {"full": {"lr": 1e-4}}, "seed": 1}
