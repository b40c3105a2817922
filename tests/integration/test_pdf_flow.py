"""The ``process-pdfs`` flow on a real Prefect server: mixed batches, failure messages, artifacts, caching."""

from __future__ import annotations

import asyncio
import json
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


def test_pdf_unstructured_returns_nothing_for_is_saved_from_pdfminer_and_the_report_says_so(tmp_path):
    from taskserver.flows.pdfs import process_pdfs

    paper = pdf_factory.text_pdf(tmp_path / "paper.pdf", pages=3, seed=7, figure_page=2)
    plain = pdf_factory.text_pdf(tmp_path / "notes.pdf", pages=2, seed=8)
    out = tmp_path / "out"

    state = process_pdfs(inputs=[str(paper), str(plain)], output_dir=str(out), max_characters=400, return_state=True)

    summary = state.result()
    extractors = {f.source: f.extractor for f in summary.files}
    assert extractors == {str(paper): "pdfminer", str(plain): "unstructured"}
    chunks = documents.load_chunks(summary.outputs[str(paper)])
    assert set().union(*(c.pages for c in chunks)) == {1, 2, 3}
    saved = [json.loads(line) for line in (out / "paper.elements.jsonl").read_text().splitlines()]
    assert {row["extractor"] for row in saved} == {"pdfminer"}
    report = next(a["data"] for a in _artifacts(state.state_details.flow_run_id) if a["key"] == "process-pdfs")
    assert "| extractor |" in report and "pdfminer" in report
    assert "because unstructured returned no elements: 1 of 2 files" in report


# --- passwords from Secret blocks ----------------------------------------------------------------

PASSWORDS = {"pdf-password-aes": "Aes-Pw-4417", "pdf-password-rc4": "Rc4-Pw-9932"}


def _save_secrets() -> None:
    from prefect.blocks.system import Secret

    for block_name, password in PASSWORDS.items():
        Secret(value=password).save(block_name, overwrite=True)


def _run_record(flow_run_id) -> str:
    """Everything Prefect holds about a run: the run and its parameters, task runs, logs, artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from server_context import drain_prefect_workers

    drain_prefect_workers()  # logs are sent in batches: make sure every line has reached the server

    async def read() -> str:
        async with get_client() as client:
            flow_run = await client.read_flow_run(flow_run_id)
            task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            parts = [flow_run.model_dump_json()] + [t.model_dump_json() for t in task_runs]
            return "\n".join(parts + [log.message for log in logs])

    return asyncio.run(read()) + "\n" + json.dumps(_artifacts(flow_run_id))


def test_encrypted_pdfs_open_with_passwords_from_secret_blocks_that_never_leak(tmp_path):
    from taskserver.flows.pdfs import process_pdfs

    _save_secrets()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    pdf_factory.encrypted_pdf(inbox / "aes.pdf", password=PASSWORDS["pdf-password-aes"], algorithm="AES-256")
    pdf_factory.encrypted_pdf(inbox / "rc4.pdf", password=PASSWORDS["pdf-password-rc4"], algorithm="RC4-128")
    pdf_factory.encrypted_pdf(inbox / "wrong.pdf", password="Other-Pw-1")  # gets the batch's password: wrong
    pdf_factory.text_pdf(inbox / "plain.pdf", pages=2, seed=9)
    out = tmp_path / "out"

    state = process_pdfs(
        inputs=str(inbox),
        output_dir=str(out),
        max_characters=400,
        workers=2,
        password_secret="pdf-password-aes",
        password_secrets={"rc4.pdf": "pdf-password-rc4"},
        return_state=True,
    )

    assert state.is_failed()
    assert "1 of 4 inputs" in state.message
    assert "wrong.pdf: encrypted PDF: the given password is wrong" in state.message
    error = state.result(raise_on_failure=False)
    summary = error.partial
    assert sorted(Path(f.source).name for f in summary.files) == ["aes.pdf", "plain.pdf", "rc4.pdf"]
    for name in ("aes", "rc4", "plain"):
        assert documents.load_chunks(str(out / f"{name}.chunks.jsonl"))

    record = _run_record(state.state_details.flow_run_id)
    assert "PDFs: 4 of 4 (100%)" in record and "process-pdf rc4" in record  # logs and task runs were read
    assert "pdf-password-aes" in record and "pdf-password-rc4" in record  # the block names are there ...
    outputs = "".join(p.read_text() for p in out.iterdir())
    for password in PASSWORDS.values():  # ... their values nowhere
        for place, text in [("run record", record), ("state", state.message), ("result", summary.model_dump_json()),
                            ("outputs", outputs)]:
            assert password not in text, place


def test_a_misnamed_secret_block_fails_the_run_before_any_file_is_processed(tmp_path):
    from taskserver.flows.pdfs import process_pdfs

    _save_secrets()
    locked = pdf_factory.encrypted_pdf(tmp_path / "locked.pdf", password=PASSWORDS["pdf-password-aes"])
    out = tmp_path / "out"

    state = process_pdfs(inputs=[str(locked)], output_dir=str(out), password_secret="no-such-block", return_state=True)
    assert state.is_failed()
    assert "Secret block 'no-such-block': not found" in state.message
    assert not out.exists()  # failed before the output directory was even made

    state = process_pdfs(
        inputs=[str(locked)], output_dir=str(out), password_secrets={"lokced.pdf": "pdf-password-aes"}, return_state=True
    )
    assert state.is_failed()
    assert "password_secrets: names no input file: lokced.pdf" in state.message
