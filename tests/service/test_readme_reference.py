"""The README's configuration and metrics references match the code."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from detector import STAGES
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_and_its_variable_is_documented():
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| `(ADVDETECT_\w+)` \|", README, re.M)}
    assert set(rows) == set(ServiceSettings.model_fields)
    assert all(env == f"ADVDETECT_{name.upper()}" for name, env in rows.items())


def test_every_metric_and_stage_is_documented():
    names = {family.name for family in ServiceMetrics(CollectorRegistry()).registry.collect()}
    documented = set(re.findall(r"^\| `(advdetect_\w+)` \|", README, re.M))
    # prometheus_client names counter families without _total
    expected = {n + "_total" if n in ("advdetect_requests", "advdetect_inputs", "advdetect_flags") else n for n in names}
    assert documented == expected
    for stage in STAGES:
        assert f"`{stage}`" in README
