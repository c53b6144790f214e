"""`findlady demo` end to end: the README's first command must say what it promises."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from findlady_cli.demo import run_demo


@pytest.mark.slow
def test_demo_recognises_the_copy_and_not_the_unrelated_model(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    status = run_demo(data_dir=tmp_path, device="cpu", out=out, err=err)
    text = out.getvalue()
    assert status == 0, text + err.getvalue()[-3000:]
    assert "result: OK: suspect -> match" in text and "unrelated -> no_match" in text
    assert "0 of 64 after" in text  # the watermark reads perfectly once re-synchronized
    assert "hash chain verified: True" in text
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/ui/verifications/[0-9a-f-]{36}\n", text), text
