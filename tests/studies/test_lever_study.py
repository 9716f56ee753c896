"""studies/lever_study.sh: every lever it trains is an option `train` still takes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pneumonia.cli import build_parser

SCRIPT = (Path(__file__).parents[2] / "studies" / "lever_study.sh").read_text()
LEVERS = dict(re.findall(r'^\s+\[([\w-]+)\]="([^"]*)"', SCRIPT, re.M))
COMMON = shlex.split(re.search(r"^common=\((.*)\)$", SCRIPT, re.M).group(1))


def test_the_study_names_its_levers_and_its_order_uses_only_them():
    order = re.search(r"order=\(\$\{@:-(.*?)\}\)", SCRIPT, re.S).group(1).split()
    assert LEVERS and set(order) == set(LEVERS)


@pytest.mark.parametrize("name", sorted(LEVERS))
def test_train_accepts_the_lever(name):
    build_parser().parse_args(["train", "DATA", *COMMON, *shlex.split(LEVERS[name]), "--out", "OUT", "--resume"])
