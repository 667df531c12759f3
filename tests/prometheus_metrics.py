"""Which Prometheus series the code exports, and which ones a PromQL expression selects.

The exported names are read from the source, not from a running process: every `Counter`, `Gauge`,
`Histogram` and `Summary` of prometheus_client constructed with a literal name in libs/ or services/.
A file that does not import prometheus_client is skipped (collections.Counter is not a metric).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (ROOT / "libs", ROOT / "services")
GENERATED = ROOT / "libs" / "protos"
METRIC_CLASSES = frozenset({"Counter", "Gauge", "Histogram", "Summary"})
# Series Prometheus itself adds to every scrape.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


def _metric_classes_imported(tree: ast.Module) -> dict[str, str]:
    """Local name -> prometheus_client class, for `from prometheus_client import ...` in the file."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client":
            for alias in node.names:
                if alias.name in METRIC_CLASSES:
                    names[alias.asname or alias.name] = alias.name
    return names


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def metric_definitions() -> dict[str, str]:
    """Metric name -> kind (Counter, Gauge, ...) of every metric defined in libs/ and services/."""
    found: dict[str, str] = {}
    for source_dir in SOURCE_DIRS:
        for path in sorted(source_dir.rglob("*.py")):
            if GENERATED in path.parents:
                continue
            tree = ast.parse(path.read_text(), str(path))
            classes = _metric_classes_imported(tree)
            modules = {
                alias.asname or alias.name
                for node in ast.walk(tree)
                if isinstance(node, ast.Import)
                for alias in node.names
                if alias.name == "prometheus_client"
            }
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                kind = None
                if isinstance(node.func, ast.Name) and node.func.id in classes:
                    kind = classes[node.func.id]
                elif (
                    isinstance(node.func, ast.Attribute)
                    and node.func.attr in METRIC_CLASSES
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in modules
                ):
                    kind = node.func.attr
                if kind is None:
                    continue
                keywords = {keyword.arg: keyword.value for keyword in node.keywords}
                name = _literal(node.args[0] if node.args else keywords.get("name"))
                assert name is not None, f"{path}:{node.lineno}: a {kind} without a literal name"
                parts = [_literal(keywords.get("namespace")), _literal(keywords.get("subsystem")), name]
                full = "_".join(part for part in parts if part)
                assert found.get(full, kind) == kind, f"{full} is defined as two kinds"
                found[full] = kind
    return found


def exported_series() -> set[str]:
    """Every series name a scrape of the services can show (as prometheus_client names them)."""
    series: set[str] = set()
    for name, kind in metric_definitions().items():
        if kind == "Counter":
            base = name.removesuffix("_total")
            series |= {f"{base}_total", f"{base}_created"}
        elif kind == "Gauge":
            series.add(name)
        elif kind == "Histogram":
            series |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        else:
            series |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
    return series


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges and groupings removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*(\()?", expr):
        if match[2] is None and match[1].lower() not in PROMQL_KEYWORDS:
            names.add(match[1])
    return names
