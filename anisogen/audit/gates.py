"""Quality gates: ``--fail-if "delta_mu>0.05"`` rules evaluated against every audited shard folder.

A rule is ``METRIC OP NUMBER`` with OP one of ``>``, ``>=``, ``<``, ``<=``, ``==``, ``!=`` (spaces allowed)
and METRIC a scalar metric name of the report (``delta_mu``, ``M_k_Z``, ``JS_cos``, ``Phi``,
``paired_A_r_T``, ...; :data:`METRIC_ALIASES` maps a few spellings such as ``M_k^Z`` or ``Δμ``). The rule
*fails* a folder when the condition is true, when the metric is NaN, or when the folder lacks the metric
(e.g. ``Phi`` without ``src.npy``). Unknown metric names are rejected before the audit runs.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..cli import UserError

OPERATORS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
             "<": operator.lt}

METRIC_ALIASES = {
    "M_k^Z": "M_k_Z", "M_k^X": "M_k_X", "Δμ": "delta_mu", "Δµ": "delta_mu", "dmu": "delta_mu", "Φ": "Phi",
    "Ψ": "Psi", "Ω_k": "Omega_k", "G_Σ": "G_Sigma", "C_λ": "C_lambda", "JS": "JS_cos",
}

_RULE = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class GateError(UserError):
    """A ``--fail-if`` rule that cannot be parsed or names an unknown metric."""


@dataclass(frozen=True)
class Gate:
    """``metric op threshold``; :meth:`fails` is True when the data should be stopped."""

    metric: str
    op: str
    threshold: float
    text: str

    def fails(self, value) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return True
        return bool(OPERATORS[self.op](float(value), self.threshold))


def parse_gate(text: str, known: Iterable[str] | None = None) -> Gate:
    """Parse one rule such as ``"delta_mu>0.05"``; with ``known`` the metric name must be one of them."""
    match = _RULE.match(text)
    if not match:
        raise GateError(f"cannot parse --fail-if {text!r}: expected METRIC OP NUMBER, e.g. \"delta_mu>0.05\" "
                        f"(OP one of {', '.join(OPERATORS)})")
    metric, op, number = match.groups()
    metric = METRIC_ALIASES.get(metric, metric)
    if known is not None:
        known = sorted(set(known))
        if metric not in known:
            raise GateError(f"--fail-if {text!r}: unknown metric {metric!r}; known metrics: {', '.join(known)}")
    return Gate(metric, op, float(number), text.strip())


def evaluate_gates(gates: Iterable[Gate], folders: Mapping[str, Mapping[str, float]]) -> dict:
    """Check every gate against every folder's scalar metrics.

    Returns ``{"passed": bool, "rules": [...], "failures": [{"folder", "metric", "value", "rule",
    "message"}]}``; ``message`` is a one-line human explanation.
    """
    gates = list(gates)
    failures = []
    for label, metrics in folders.items():
        for gate in gates:
            value = metrics.get(gate.metric)
            if not gate.fails(value):
                continue
            if value is None:
                why = f"metric {gate.metric} is not available for this folder"
            elif isinstance(value, float) and math.isnan(value):
                why = f"{gate.metric} is NaN"
            else:
                why = f"{gate.metric} = {value:.6g} {gate.op} {gate.threshold:g}"
            failures.append({"folder": label, "metric": gate.metric, "value": value, "rule": gate.text,
                             "message": f"GATE FAILED [{label}] {gate.text}: {why}"})
    return {"passed": not failures, "rules": [g.text for g in gates], "failures": failures}
