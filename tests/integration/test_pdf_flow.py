"""The ``process-pdfs`` flow on a real Prefect server: mixed batches, failure messages, artifacts, caching."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pdf_factory  # tests/ is on sys.path (conftest.py)
import pytest

from taskserver import documents

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _artifacts(flow_run_id) -> list[dict]:
    """The run's artifacts, read over the REST API: prefect 3.8.8's client sends null paging fields
    that its own server rejects (422)."""
    from prefect.client.orchestration import get_client

    async def read() -> list[dict]:
        async with get_client() as client:
            response = await client._client.post(
                "/artifacts/filter",
                json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 100, "offset": 0,
                      "sort": "CREATED_DESC"},
            )
            response.raise_for_status()
            return response.json()

    return asyncio.run(read())


def test_mixed_batch_saves_good_files_then_fails_naming_each_bad_file(tmp_path):
    from taskserver.flows.pdfs import process_pdfs

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = [
        pdf_factory.text_pdf(inbox / "alpha.pdf", pages=2, seed=1),
        pdf_factory.text_pdf(inbox / "beta.pdf", pages=3, seed=2),
    ]
    pdf_factory.corrupt_pdf(inbox / "broken.pdf")
    pdf_factory.encrypted_pdf(inbox / "locked.pdf")
    pdf_factory.image_only_pdf(inbox / "scan.pdf")
    out = tmp_path / "out"

    state = process_pdfs(inputs=str(inbox), output_dir=str(out), max_characters=400, workers=2, return_state=True)

    assert state.is_failed()
    message = state.message
    for name, reason in [
        ("broken.pdf", "damaged structure"),
        ("locked.pdf", "needs a password"),
        ("scan.pdf", "no text layer"),
    ]:
        assert f"{name}: " in message and reason in message, message
    assert "alpha.pdf" not in message and "beta.pdf" not in message
    assert "3 of 5 inputs" in message

    for pdf in good:  # the good files were saved before the run failed
        chunks = documents.load_chunks(str(out / f"{pdf.stem}.chunks.jsonl"))
        assert chunks and all(len(c.text) <= 400 and c.pages for c in chunks)
        assert chunks == documents.process_pdf(pdf, max_characters=400).chunks
    assert sorted(p.name for p in out.iterdir()) == [
        "alpha.chunks.jsonl", "alpha.elements.jsonl", "beta.chunks.jsonl", "beta.elements.jsonl",
    ]

    artifacts = _artifacts(state.state_details.flow_run_id)
    report = next(a["data"] for a in artifacts if a["key"] == "process-pdfs")
    assert "alpha.pdf" in report and "beta.pdf" in report
    assert "## Failed" in report and "locked.pdf" in report and "needs a password" in report
    assert any(a["type"] == "progress" and a["data"] == 100.0 for a in artifacts)


def test_good_batch_returns_outputs_and_a_rerun_is_served_from_cache_safely(tmp_path):
    from taskserver.flows.pdfs import process_pdfs

    pdfs = [str(pdf_factory.text_pdf(tmp_path / f"doc{i}.pdf", pages=2, seed=20 + i)) for i in range(2)]
    out = tmp_path / "out"

    first = process_pdfs(inputs=pdfs, output_dir=str(out), max_characters=500, workers=2)
    assert set(first.outputs) == set(pdfs)
    assert first.total_chunks == sum(len(documents.load_chunks(loc)) for loc in first.outputs.values())
    assert first.total_pages == 4 and not first.failures
    assert not any(f.cached for f in first.files)

    second = process_pdfs(inputs=pdfs, output_dir=str(out), max_characters=500, workers=2)
    assert all(f.cached for f in second.files)
    assert second.outputs == first.outputs

    # a cached result whose output was deleted is processed again, never reported as saved
    saved = documents.load_chunks(first.outputs[pdfs[0]])
    Path(first.outputs[pdfs[0]]).unlink()
    third = process_pdfs(inputs=pdfs, output_dir=str(out), max_characters=500, workers=2)
    assert documents.load_chunks(third.outputs[pdfs[0]]) == saved
    assert third.total_chunks == first.total_chunks

    # changing a file's bytes changes its cache key
    pdf_factory.text_pdf(pdfs[1], pages=3, seed=99)
    fourth = process_pdfs(inputs=pdfs, output_dir=str(out), max_characters=500, workers=2)
    changed = next(f for f in fourth.files if f.source == pdfs[1])
    assert not changed.cached and changed.page_count == 3
