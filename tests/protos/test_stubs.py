"""The committed Python stubs are exactly what protoc generates from protos/."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path) for p in _generator().generate(tmp_path)}
    committed = {
        p.relative_to(ROOT / "libs")
        for p in (ROOT / "libs" / "trellis").rglob("*_pb2*")
        if p.suffix in (".py", ".pyi")
    }
    assert fresh, "protoc generated nothing"
    assert committed == fresh, "stub files added or removed: run `make proto`"
    stale = [
        str(p)
        for p in sorted(fresh)
        if (tmp_path / p).read_bytes() != (ROOT / "libs" / p).read_bytes()
    ]
    assert not stale, f"stubs differ from protos/ (run `make proto`): {stale}"
