"""The optimizer registry: ``rule_for`` (live optimizers), ``rule_named`` (stores), and each rule's declared fields."""

import pytest
import torch

from hydra_nb.errors import TrackingConfigError
from hydra_nb.optim import RULES, AdamRule, SGDRule, rule_for, rule_named


def params():
    return [torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize("make,expected", [
    (lambda: torch.optim.SGD(params(), lr=0.1), SGDRule()),
    (lambda: torch.optim.SGD(params(), lr=0.1, momentum=0.9, nesterov=True), SGDRule()),
    (lambda: torch.optim.Adam(params()), AdamRule("Adam")),
    (lambda: torch.optim.Adam(params(), weight_decay=0.1), AdamRule("Adam")),
    (lambda: torch.optim.Adam(params(), decoupled_weight_decay=True), AdamRule("AdamW")),
    (lambda: torch.optim.AdamW(params()), AdamRule("AdamW")),
])
def test_rule_for_finds_the_rule_and_its_store_name(make, expected):
    rule = rule_for(make())
    assert rule == expected and type(rule) is type(expected) and rule.name == expected.name
    assert rule_named(rule.name) == rule


def test_rule_for_refuses_other_optimizers_listing_what_is_supported():
    with pytest.raises(TrackingConfigError) as info:
        rule_for(torch.optim.RMSprop(params()))
    assert str(info.value) == (
        "hydra_nb tracks torch.optim.SGD (with any momentum, dampening, Nesterov, weight decay and learning-rate "
        "schedule) and torch.optim.Adam/AdamW (fast mode); RMSprop is not supported yet. Train with one of these "
        "to use hydra_nb.")
    with pytest.raises(TrackingConfigError, match="optimizer must be a torch.optim.Optimizer, got str"):
        rule_for("sgd")


def test_rule_named_knows_every_name_once_and_refuses_others():
    names = [n for cls in RULES for n in cls.names]
    assert len(names) == len(set(names)) and {"SGD", "Adam", "AdamW"} <= set(names)
    for name in names:
        assert rule_named(name).name == name
    with pytest.raises(KeyError, match="unknown optimizer 'Lion'.*SGD, Adam, AdamW"):
        rule_named("Lion")


@pytest.mark.parametrize("rule", [rule_named(n) for cls in RULES for n in cls.names], ids=repr)
def test_declared_fields_are_consistent(rule):
    assert "active" in rule.fast_fields  # every torch optimizer skips a parameter without a gradient
    assert set(rule.fast_fields) <= set(rule.trace_fields) and rule.bool_fields <= set(rule.trace_fields)
    assert len(set(rule.trace_fields)) == len(rule.trace_fields)
    row = rule.empty_row(3)
    assert list(row) == list(rule.trace_fields)
    assert all(row[f].dtype.name == rule.field_dtype(f) and row[f].shape == (3,) for f in row)
    assert rule.state_fields
