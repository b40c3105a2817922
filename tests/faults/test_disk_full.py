"""A full disk under real flows: the run fails saying so, earlier results survive, nothing half-written stays.

The output directory is a small tmpfs (we run as root); the flows run on a real Prefect server.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pdf_factory
import pytest

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("prefect_harness")]

LEFT_FREE = 8 * 1024
"""Bytes left on the device before the failing run: less than any of the outputs below."""


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted whatever the test does."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1024k", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _fill(disk: Path, leave: int = LEFT_FREE) -> Path:
    """Fill the device, then give back about ``leave`` bytes."""
    filler = disk / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_encode_fails_naming_the_full_disk_and_keeps_earlier_results(small_disk, data_dir):
    from taskserver.encoding import load_embeddings
    from taskserver.flows.encode import encode

    first = encode(texts=["an earlier result", "kept as it was"], output=str(small_disk / "earlier.npz"),
                   return_state=True)
    assert first.is_completed(), first.message
    before = _digests(small_disk)
    filler = _fill(small_disk)

    texts = [f"text number {i} about rivers, queues and workers" for i in range(120)]  # ~180 kB of vectors
    target = small_disk / "big.npz"
    state = encode(texts=texts, output=str(target), use_cache=False, return_state=True)

    assert state.is_failed()
    assert "StorageFullError" in state.message, state.message
    assert f"{target}: no space left on the device" in state.message
    assert not target.exists()
    assert _leftovers(small_disk, {"earlier.npz", filler.name}) == []  # no temporary file either
    filler.unlink()
    assert {k: v for k, v in _digests(small_disk).items()} == before
    earlier = load_embeddings(str(small_disk / "earlier.npz"))
    assert earlier.ids == ["0", "1"] and np.isfinite(earlier.vectors).all()

    # With space again, the same run completes: nothing about the failure sticks.
    again = encode(texts=texts, output=str(target), use_cache=False, return_state=True)
    assert again.is_completed(), again.message
    assert len(load_embeddings(str(target))) == 120


def test_process_pdfs_fails_naming_the_full_disk_and_keeps_earlier_results(small_disk, tmp_path, data_dir):
    from taskserver import documents
    from taskserver.flows.pdfs import process_pdfs

    out = small_disk / "chunks"
    earlier_pdf = pdf_factory.text_pdf(tmp_path / "earlier.pdf", pages=1, seed=7)
    first = process_pdfs(inputs=[str(earlier_pdf)], output_dir=str(out), workers=1, return_state=True)
    assert first.is_completed(), first.message
    before = _digests(out)
    assert set(before) == {"earlier.chunks.jsonl", "earlier.elements.jsonl"}
    filler = _fill(small_disk)

    big = pdf_factory.text_pdf(tmp_path / "big.pdf", pages=4, seed=8)
    state = process_pdfs(inputs=[str(big)], output_dir=str(out), workers=1, return_state=True)

    assert state.is_failed()
    assert f"{big}: StorageFullError: {out}/big." in state.message, state.message
    assert "no space left on the device" in state.message
    assert _leftovers(out, set(before)) == []  # no temporary file and no half result (elements without chunks)
    filler.unlink()
    assert _digests(out) == before
    assert documents.load_chunks(str(out / "earlier.chunks.jsonl")) == documents.process_pdf(earlier_pdf).chunks


def test_process_pdfs_disk_full_after_the_elements_leaves_no_half_result(small_disk, tmp_path, data_dir):
    """Room for the elements file but not the chunks file: the elements must not stay behind alone."""
    from taskserver import documents
    from taskserver.flows.pdfs import process_pdfs

    pdf = pdf_factory.text_pdf(tmp_path / "doc.pdf", pages=3, seed=9)
    sizes = tmp_path / "sizes"
    documents.save_result(documents.process_pdf(pdf), str(sizes))
    pages = {kind: -(-(sizes / f"doc.{kind}.jsonl").stat().st_size // 4096) for kind in ("elements", "chunks")}
    out = small_disk / "chunks"
    out.mkdir()
    _fill(small_disk, leave=(pages["elements"] + pages["chunks"] - 1) * 4096)  # tmpfs allocates 4 kB pages

    state = process_pdfs(inputs=[str(pdf)], output_dir=str(out), workers=1, return_state=True)

    assert state.is_failed()
    assert f"{out}/doc.chunks.jsonl: no space left on the device" in state.message, state.message
    assert sorted(p.name for p in out.iterdir()) == []


def test_storage_full_names_a_half_written_result_without_leaving_it(small_disk, data_dir):
    """The library path the flows use: an interrupted atomic write leaves neither file nor temp."""
    from taskserver import storage
    from taskserver.errors import StorageFullError

    storage.write_text(str(small_disk / "kept.txt"), "kept")
    filler = _fill(small_disk)
    target = small_disk / "report.txt"
    with pytest.raises(StorageFullError) as raised:
        storage.write_bytes(str(target), b"x" * (64 * 1024))
    assert raised.value.input == str(target)
    assert "no space left on the device" in str(raised.value)
    assert _leftovers(small_disk, {"kept.txt", filler.name}) == []
    assert (small_disk / "kept.txt").read_text() == "kept"
