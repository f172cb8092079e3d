"""README.md stays true: its configuration table is the one the settings classes give,
and the commands it tells users to run exist."""

import re
import subprocess
from pathlib import Path

from trellis_cli.app import app
from trellis_cli.config_table import markdown
from trellis_toolgateway.loader import LoadOptions, declared_registry, read_tools_file

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_configuration_table_matches_settings() -> None:
    assert markdown() in README, "regenerate with: python -m trellis_cli.config_table"


def test_make_targets_in_readme_exist() -> None:
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    mentioned = set(re.findall(r"\bmake ([a-z]+)\b", README))
    assert mentioned and mentioned <= targets


def test_trellis_commands_in_readme_exist() -> None:
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    commands |= {group.name for group in app.registered_groups}
    mentioned = set(re.findall(r"trellis (demo|run|up|[a-z]+)\b", README)) - {"is", "runs"}
    assert mentioned <= commands, mentioned - commands


def test_service_console_scripts_in_readme_are_installed() -> None:
    for script in re.findall(r"`(trellis-[a-z-]+)`", README):
        result = subprocess.run(
            ["bash", "-c", f"command -v {script} || ls .venv/bin/{script}"],
            cwd=ROOT,
            capture_output=True,
        )
        assert result.returncode == 0, script


#: Top-level directories whose paths the README may name.
_PATH_ROOTS = (
    "bench",
    "clients",
    "deploy",
    "docs",
    "examples",
    "protos",
    "services",
    "tests",
    "third_party",
)
_PATH = re.compile(r"(?<![\w/.])((?:" + "|".join(_PATH_ROOTS) + r")/[\w./-]*\w)")


def test_paths_in_readme_exist() -> None:
    """Every repository path the README names (in code spans, links or commands) exists."""
    named = set(_PATH.findall(README))
    # Not checked: templates (services/trellis_<name>/), outputs the README tells you to make.
    named = {p for p in named if not p.endswith(("_", ".binpb")) and "/results" not in p}
    assert named, "the pattern found no paths: is it still right?"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


def test_deployment_commands_name_real_services_and_overlays() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in re.findall(r"docker compose up (?:-d )?([a-z][\w-]*)", README):
        assert name in compose, f"`docker compose up {name}`: no such service"
    overlays = re.findall(r"kubectl apply -k (\S+)", README)
    assert overlays
    for overlay in overlays:
        assert (ROOT / overlay / "kustomization.yaml").exists(), overlay


def test_the_cache_freshness_example_is_a_tools_file_whose_rules_reach_its_tools(
    tmp_path: Path,
) -> None:
    (example,) = [b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if "invalidates:" in b]
    (tmp_path / "sandbox").mkdir()
    file = tmp_path / "tools.yaml"
    file.write_text(example)
    registry = declared_registry(file, LoadOptions())
    assert registry.invalidation.invalidates("copy_file")
    assert registry.invalidation.path_args == {"read_file": {"path"}, "list_dir": {"path"}}
    assert registry.get("list_dir").tool.spec.refresh_ahead == 0.2
    assert [(w.tool, w.tenants) for w in read_tools_file(file).warm] == [
        ("run_command", ["default", "acme"])
    ]


def _section(title: str) -> str:
    """The README's text from heading ``title`` to the next heading of its level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^\1 )", README, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(2)


def test_the_model_tools_and_batching_example_loads(tmp_path) -> None:
    """The section's tools.yaml is a file the gateway takes as it is."""
    from trellis_toolgateway.loader import LoadOptions, declared_tools, parse_tools_file

    (example,) = re.findall(r"```yaml\n(.*?)```", _section("Model tools and batching"), re.S)
    registry = declared_tools(
        parse_tools_file(example, "README.md"), tmp_path / "tools.yaml", LoadOptions()
    )
    specs = {spec.name: spec for spec in registry.specs()}
    assert set(specs) == {"summarize", "embed", "get_stock_price"}
    assert all(spec.batched for spec in specs.values())
    assert specs["summarize"].calls_model and specs["embed"].calls_model
    assert specs["summarize"].cacheable and specs["summarize"].batch_max_items == 16
    assert specs["get_stock_price"].request_cost(1) == 100_000
    assert specs["get_stock_price"].request_cost(7) == 500_000
