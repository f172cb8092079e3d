"""`trellis demo` (what `make run` runs): answer, totals and trace id; the rerun hits the cache."""

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.model_script import script_of

TRELLIS = Path(sys.executable).parent / "trellis"


def test_demo_prints_answer_trace_id_and_cache_hits_on_the_second_run(tmp_path: Path) -> None:
    trellis = Path(sys.executable).parent / "trellis"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS_", "OPENAI_"))}
    result = subprocess.run(
        [str(trellis), "demo", "--times", "2", "--pace-ms", "0"],
        cwd=tmp_path,
        env={**env, "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert len(re.findall(r"^trace_id: [0-9a-f]{32}$", out, re.M)) == 2
    assert out.count("status: succeeded") == 2
    assert "uname -a" in out and "df -h" in out and "uptime" in out
    hits = re.findall(r"^cache hits: (\d+) of (\d+) tool calls$", out, re.M)
    assert hits[0] == ("0", "3") and int(hits[1][0]) >= 2
    assert re.search(r"^cost: \$0\.\d{6} \([1-9]\d* nano-USD\)$", out, re.M)
    assert (tmp_path / ".trellis" / "trellis.db").exists()  # runs and ledger are stored


def test_demo_says_it_uses_the_offline_model(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--times", "1")
    assert result.returncode == 0, result.stderr
    assert "model: trellis-offline-rules-v1 (the offline rules model" in result.stdout


async def test_demo_uses_the_endpoint_openai_base_url_names(tmp_path: Path, model) -> None:
    """OPENAI_BASE_URL/OPENAI_API_KEY/TRELLIS_MODEL reach the planner: the plan and the
    answer come from that endpoint (here a scripted server of the test's own)."""
    script = script_of(model)
    script.plan({"node_id": "n1", "tool": "echo", "args": {"value": "from the endpoint"}})
    script.reply("Answered by the endpoint the demo was pointed at.")
    process = await asyncio.create_subprocess_exec(
        str(TRELLIS),
        "demo",
        "--times",
        "1",
        "--pace-ms",
        "0",
        "say hello",
        cwd=tmp_path,
        env=_env(
            OPENAI_BASE_URL=model.base_url, OPENAI_API_KEY="sk-test", TRELLIS_MODEL="gpt-4o-mini"
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    out = stdout.decode()
    assert process.returncode == 0, stderr.decode()
    assert f"model: gpt-4o-mini at {model.base_url} (OPENAI_BASE_URL)" in out
    assert "from the endpoint" in out and "Answered by the endpoint" in out


def test_a_model_without_an_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    result = _demo(tmp_path, TRELLIS_MODEL="gpt-4o-mini")
    assert result.returncode == 2
    assert result.stderr.startswith("error TRELLIS_MODEL=gpt-4o-mini needs OPENAI_BASE_URL")
    assert result.stdout == ""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS_", "OPENAI_"))}
    return {**env, "COLUMNS": "160", **extra}


def _demo(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TRELLIS), "demo", "--pace-ms", "0", *args],
        cwd=tmp_path,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_with_tool_calls_plans_in_rounds(tmp_path: Path) -> None:
    trellis = Path(sys.executable).parent / "trellis"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS_", "OPENAI_"))}
    goal = "compute 6*7 then echo the result"
    args = ["demo", "--plan-format", "tool_calls", "--times", "1", "--pace-ms", "0", goal]
    result = subprocess.run(
        [str(trellis), *args],
        cwd=tmp_path,
        env={**env, "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "plan format tool_calls" in out and "status: succeeded" in out
    # round 2's echo got round 1's result itself (the conversation), not a reference
    assert '- echo {"value": {"result": 42}}: 42' in out
    bad = subprocess.run(
        [str(trellis), "demo", "--plan-format", "yaml"], cwd=tmp_path, env=env, capture_output=True
    )
    assert bad.returncode == 2
