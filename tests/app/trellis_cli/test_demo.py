"""`trellis demo` (what `make run` runs): answer, totals and trace id; the rerun hits the cache."""

import os
import re
import subprocess
import sys
from pathlib import Path


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
