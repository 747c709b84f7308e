"""The audit log on a real file: lines follow log rotation (mv and rm), and a commit makes them durable."""

from __future__ import annotations

import asyncio

import pytest

from serving.audit import AuditError, AuditLog, read_audit


def _ids(path) -> list[int]:
    return [record["n"] for record in read_audit(path)]


@pytest.mark.parametrize("rotate", ["mv", "rm"])
def test_lines_go_to_the_new_file_after_rotation(tmp_path, rotate):
    path = tmp_path / "audit" / "decisions.jsonl"
    audit = AuditLog(path)
    audit.write({"n": 1})
    if rotate == "mv":
        path.rename(path.with_suffix(".jsonl.1"))
    else:
        path.unlink()
    audit.write({"n": 2})
    audit.write({"n": 3})
    asyncio.run(audit.commit(3))
    assert _ids(path) == [2, 3]
    if rotate == "mv":
        assert _ids(path.with_suffix(".jsonl.1")) == [1]
    audit.close()


def test_a_line_that_cannot_be_written_raises(tmp_path):
    path = tmp_path / "decisions.jsonl"
    audit = AuditLog(path)
    path.unlink()
    path.mkdir()  # the log's path is taken by something that is not a file
    with pytest.raises(AuditError, match="cannot open the audit log"):
        audit.write({"n": 1})
    path.rmdir()
    assert audit.write({"n": 2}) == 1
    asyncio.run(audit.commit(1))
    assert _ids(path) == [2]
    audit.close()
