"""The model-support tables in README.md and docs/supported_models.md are the generator's output
(python/sglang/srt/models/support_table.py), cover every registered architecture, and name only
test files that exist."""

from __future__ import annotations

import shutil
from pathlib import Path

from sglang.srt.models import support_table
from sglang.srt.models.registry import supported_architectures

REPO = Path(__file__).resolve().parents[2]


def _table_part(text: str) -> str:
    return text[text.index(support_table.BEGIN) : text.index(support_table.END)]


def test_docs_tables_are_generated():
    for path, expected in support_table.expected_files(REPO).items():
        assert path.read_text() == expected, (
            f"{path.relative_to(REPO)} is stale: run python -m sglang.srt.models.support_table"
        )


def test_every_registered_architecture_is_in_both_tables():
    assert set(support_table.SUPPORT) == set(supported_architectures())
    for name in (support_table.README, support_table.DOCS):
        table = _table_part((REPO / name).read_text())
        for arch in supported_architectures():
            assert f"| `{arch}` |" in table, f"{arch} missing from {name}"


def test_named_test_files_exist():
    for arch, s in support_table.SUPPORT.items():
        assert s.parity, f"{arch}: no parity test named"
        for name in (*s.parity, *s.capture, *s.tp):
            assert (REPO / "test" / "srt" / name).is_file(), f"{arch}: {name} does not exist"


def test_check_mode_flags_a_stale_table_and_rewrite_fixes_it(tmp_path):
    (tmp_path / "docs").mkdir()
    for name in (support_table.README, support_table.DOCS):
        shutil.copy(REPO / name, tmp_path / name)
    docs = tmp_path / support_table.DOCS
    docs.write_text(docs.read_text().replace("| `GPT2LMHeadModel` |", "| `GPT2` |"))
    assert support_table.main(["--root", str(tmp_path), "--check"]) == 1
    assert support_table.main(["--root", str(tmp_path)]) == 0
    assert support_table.main(["--root", str(tmp_path), "--check"]) == 0
    assert docs.read_text() == (REPO / support_table.DOCS).read_text()
