"""The chart's CRD templates are the CRDs in crds/, and its values schema agrees with them.

No helm binary here: the templates are read as text. tests/integration/test_chart.py renders them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvpn_core import api, crdgen

REPO = Path(__file__).resolve().parents[3]
CRDS = REPO / "crds"
CHART = REPO / "helm" / "kvpn"
CHART_CRDS = CHART / "templates" / "crds"
KINDS = list(api.Kind)
STALE = "is stale: run `make crds`"


def file_name(kind: api.Kind) -> str:
    return f"{api.PLURALS[kind]}.{api.GROUP}.yaml"


def without_directives(template: str) -> str:
    """The template with its template-only lines removed: what it renders with crds.install and no labels."""
    kept = []
    for line in template.splitlines():
        stripped = line.strip()
        if stripped.startswith("{{") and stripped.endswith("}}"):
            continue
        if line in {"  labels:", "  annotations:", "    helm.sh/resource-policy: keep"}:  # metadata's, by indent
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


@pytest.mark.parametrize("kind", KINDS)
def test_chart_crd_template_is_freshly_generated(kind: api.Kind) -> None:
    path = CHART_CRDS / file_name(kind)
    assert path.is_file(), f"{path.relative_to(REPO)} is missing: run `make crds`"
    assert path.read_text("utf-8") == crdgen.render_chart_template(kind), f"{path.relative_to(REPO)} {STALE}"


@pytest.mark.parametrize("kind", KINDS)
def test_chart_crd_template_holds_the_crd_in_crds(kind: api.Kind) -> None:
    """Read independently of the generator: the template's object is crds/'s object, field for field."""
    checked_in = yaml.safe_load((CRDS / file_name(kind)).read_text("utf-8"))
    template = (CHART_CRDS / file_name(kind)).read_text("utf-8")
    from_chart = yaml.safe_load(without_directives(template))
    assert from_chart == checked_in, f"{file_name(kind)} in the chart differs from crds/: run `make crds`"


def test_chart_has_no_other_crd_templates() -> None:
    expected = {file_name(kind) for kind in KINDS}
    present = {p.name for p in CHART_CRDS.iterdir()}
    assert present == expected, f"unexpected files in {CHART_CRDS.relative_to(REPO)}: {sorted(present - expected)}"


@pytest.mark.parametrize("kind", KINDS)
def test_chart_crd_template_has_the_install_and_keep_toggles(kind: api.Kind) -> None:
    lines = (CHART_CRDS / file_name(kind)).read_text("utf-8").splitlines()
    # The whole object sits inside crds.install; the keep policy inside crds.keep.
    assert lines[1] == "{{- if .Values.crds.install }}"
    assert lines[-1] == "{{- end }}"
    keep = lines.index("  {{- if .Values.crds.keep }}")
    assert lines[keep + 1 : keep + 4] == ["  annotations:", "    helm.sh/resource-policy: keep", "  {{- end }}"]


def test_make_crds_writes_and_checks_the_chart_templates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, chart = tmp_path / "crds", tmp_path / "chart"
    out.mkdir()
    chart.mkdir()
    args = ["--out-dir", str(out), "--chart-dir", str(chart)]
    assert crdgen.main(["--check", *args]) == 1
    assert f"{chart / 'vpnpeers.kvpn.dev.yaml'} {STALE}" in capsys.readouterr().err
    assert crdgen.main(args) == 0
    assert sorted(p.name for p in chart.iterdir()) == sorted(file_name(k) for k in KINDS)
    assert crdgen.main(["--check", *args]) == 0


def test_chart_templates_are_the_default_next_to_the_default_crds(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make crds` (no flags, from the repository root) checks crds/ and the chart together."""
    monkeypatch.chdir(REPO)
    assert crdgen.main(["--check"]) == 0


def test_a_template_delimiter_in_a_schema_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = crdgen.build_crd

    def with_braces(kind: api.Kind | str) -> dict[str, Any]:
        crd = real(kind)
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = "see {{ .Values }}"
        return crd

    monkeypatch.setattr(crdgen, "build_crd", with_braces)
    with pytest.raises(crdgen.CrdGenError, match="template"):
        crdgen.render_chart_template(api.Kind.VPN_SERVER)


# --- values.schema.json --------------------------------------------------------------------------


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text("utf-8"))
    return loaded


def objects(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if node.get("type") == "object" or "properties" in node:
        yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from objects(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from objects(node[key], f"{path}[{key}]")
    for key in ("oneOf", "anyOf"):
        for i, sub in enumerate(node.get(key, [])):
            yield from objects(sub, f"{path}<{key}{i}>")


def test_values_schema_refuses_unknown_keys_everywhere() -> None:
    """Objects with known keys forbid others; maps say what their values are; nothing is open by omission."""
    problems = []
    for path, node in objects(schema()):
        extra = node.get("additionalProperties")
        if "properties" in node and extra is not False:
            problems.append(f"{path or '<root>'}: has properties but not additionalProperties: false")
        if "properties" not in node and extra is None:
            problems.append(f"{path or '<root>'}: an object without properties must say what its values are")
        if extra is True and "passed through" not in node.get("description", "") and path != ".global":
            problems.append(f"{path}: open object without a 'passed through' description")
    assert problems == []


def test_values_yaml_keys_are_in_the_schema() -> None:
    def missing(values: Any, node: dict[str, Any], path: str) -> Iterator[str]:
        if not isinstance(values, dict) or "properties" not in node:
            return
        for key, value in values.items():
            if key not in node["properties"]:
                yield f"{path}.{key}"
            else:
                yield from missing(value, node["properties"][key], f"{path}.{key}")

    values = yaml.safe_load((CHART / "values.yaml").read_text("utf-8"))
    assert list(missing(values, schema(), "")) == []


def test_server_values_are_the_vpnserver_spec() -> None:
    """server.* is the VpnServer's spec (plus create and name): a new spec field needs a value too."""
    crd = yaml.safe_load((CRDS / file_name(api.Kind.VPN_SERVER)).read_text("utf-8"))
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    server = schema()["properties"]["server"]
    assert set(server["properties"]) - {"create", "name"} == set(spec["properties"])
    for nested in ("expose", "dns"):
        assert set(server["properties"][nested]["properties"]) == set(spec["properties"][nested]["properties"])
    assert (
        server["properties"]["expose"]["properties"]["type"]["enum"]
        == (spec["properties"]["expose"]["properties"]["type"]["enum"])
    )
    values = yaml.safe_load((CHART / "values.yaml").read_text("utf-8"))["server"]
    assert set(values) == set(server["properties"])
