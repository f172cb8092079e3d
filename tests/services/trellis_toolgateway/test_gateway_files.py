"""read_file / list_dir against a real directory tree: reads inside the sandbox work,
and no path (``..``, absolute, symlinked file or directory) reaches the secret outside."""

import os
from pathlib import Path

import pytest

from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.tools.base import ToolError
from trellis_toolgateway.tools.files import ListDirTool, ReadFileTool
from trellis_toolgateway.tools.sandbox import Sandbox

SECRET = "TOP-SECRET-CONTENT"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """tmp/box (the sandbox) beside tmp/secret.txt and tmp/private/ (outside it)."""
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "key.txt").write_text(SECRET)
    box = tmp_path / "box"
    (box / "docs").mkdir(parents=True)
    (box / "hello.txt").write_text("hello, sandbox\n")
    (box / "docs" / "a.md").write_text("# A\n")
    (box / "big.txt").write_text("x" * 5000)
    (box / "link-out.txt").symlink_to(tmp_path / "secret.txt")
    (box / "link-out-dir").symlink_to(tmp_path / "private", target_is_directory=True)
    (box / "link-in.txt").symlink_to(box / "hello.txt")
    os.mkfifo(box / "pipe")
    return box


@pytest.fixture
def read(root: Path) -> ReadFileTool:
    return ReadFileTool(Sandbox(root), max_bytes=1000)


@pytest.fixture
def ls(root: Path) -> ListDirTool:
    return ListDirTool(Sandbox(root), max_entries=100)


async def test_read_file_inside_the_sandbox(read: ReadFileTool) -> None:
    assert await read.run({"path": "hello.txt"}) == {
        "path": "hello.txt",
        "content": "hello, sandbox\n",
        "size": 15,
        "truncated": False,
    }
    nested = await read.run({"path": "docs/../docs/./a.md"})
    assert (nested["path"], nested["content"]) == ("docs/a.md", "# A\n")
    # A symlink that stays inside is fine, and reported as what it resolves to.
    assert (await read.run({"path": "link-in.txt"}))["path"] == "hello.txt"


async def test_read_file_is_capped(read: ReadFileTool) -> None:
    out = await read.run({"path": "big.txt"})
    assert out["content"] == "x" * 1000
    assert (out["size"], out["truncated"]) == (5000, True)


ESCAPES = [
    "../secret.txt",
    "docs/../../secret.txt",
    "../private/key.txt",
    "link-out.txt",
    "link-out-dir/key.txt",
    "link-out-dir/../box/../secret.txt",
    "/etc/passwd",
    "{tmp}/secret.txt",
    "hello.txt\x00../secret.txt",
]


@pytest.mark.parametrize("path", ESCAPES)
async def test_paths_outside_the_sandbox_are_refused(
    path: str, root: Path, read: ReadFileTool, ls: ListDirTool
) -> None:
    path = path.replace("{tmp}", str(root.parent))
    for tool in (read, ls):
        with pytest.raises(InvalidArgument) as raised:
            await tool.run({"path": path})
        assert raised.value.reason == "PATH_OUTSIDE_SANDBOX"
        assert [v.field for v in raised.value.violations] == ["args.path"]
        assert SECRET not in str(raised.value)


async def test_read_file_failures_are_tool_errors(read: ReadFileTool) -> None:
    cases = {"missing.txt": "FILE_NOT_FOUND", "docs": "NOT_A_FILE", "pipe": "NOT_A_FILE"}
    for path, code in cases.items():
        with pytest.raises(ToolError) as raised:
            await read.run({"path": path})  # a FIFO must not block the call either
        assert raised.value.code == code, path


async def test_list_dir_names_and_types_sorted(ls: ListDirTool) -> None:
    out = await ls.run({})
    assert out["path"] == "." and out["truncated"] is False
    assert out["entries"] == [
        {"name": "big.txt", "type": "file", "size": 5000},
        {"name": "docs", "type": "dir"},
        {"name": "hello.txt", "type": "file", "size": 15},
        {"name": "link-in.txt", "type": "symlink"},
        {"name": "link-out-dir", "type": "symlink"},
        {"name": "link-out.txt", "type": "symlink"},
        {"name": "pipe", "type": "other"},
    ]
    assert (await ls.run({"path": "docs"}))["entries"] == [
        {"name": "a.md", "type": "file", "size": 4}
    ]


async def test_list_dir_is_capped_and_checks_it_lists_a_directory(root: Path) -> None:
    ls = ListDirTool(Sandbox(root), max_entries=2)
    out = await ls.run({"path": "."})
    assert [e["name"] for e in out["entries"]] == ["big.txt", "docs"]
    assert out["truncated"] is True
    with pytest.raises(ToolError) as raised:
        await ls.run({"path": "hello.txt"})
    assert raised.value.code == "NOT_A_DIRECTORY"


def test_sandbox_root_behind_a_symlink_still_works(root: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    sandbox = Sandbox(alias)
    assert sandbox.resolve("hello.txt") == os.path.join(os.path.realpath(root), "hello.txt")
    with pytest.raises(InvalidArgument):
        sandbox.resolve("../secret.txt")
