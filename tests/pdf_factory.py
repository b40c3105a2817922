"""Test PDFs made on the spot: good text PDFs with titles, and each kind of bad input.

Real files written with fpdf2 and pypdf, so tests exercise the same parsers that production
input meets. Every function writes to ``path`` and returns it.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from fpdf import FPDF
from pypdf import PdfReader, PdfWriter

_WORDS = (
    "server schedules task priority result storage worker restart queue urgent routine batch "
    "model embedding cluster index search document page section chapter report figure table "
    "value measure sample training inference pipeline cache retry failure success latency "
    "throughput memory processor network request response client operator engineer analyst "
    "customer invoice contract policy budget forecast quarter revenue margin growth risk "
    "review approval deadline schedule meeting summary decision owner team project release "
    "version change update record archive backup restore security access permission audit "
    "river mountain forest village harbour weather season garden kitchen library museum "
    "careful quiet steady rapid simple complex useful modern early late large small"
).split()
_VERBS = "keeps moves reads writes checks builds sends holds shows needs finds uses".split()


def paragraph(seed: int, sentences: int = 4) -> str:
    """Deterministic, varied prose: narrative sentences that unstructured classifies as text.

    Varied on purpose: unstructured caches spaCy results per text, so repeated sentences would
    make benchmarks look faster than real documents.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 9))]
        words.insert(2, rng.choice(_VERBS))
        words = ["the"] + words[:2] + [words[2], "the"] + words[3:] + ["and", rng.choice(_WORDS)]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def text_pdf(
    path: str | Path,
    pages: int = 3,
    sections_per_page: int = 2,
    title: str = "Report",
    seed: int = 0,
    figure_page: int | None = None,
) -> Path:
    """A text PDF: each page has titled sections, each followed by two paragraphs; ``seed`` varies the prose.

    ``figure_page`` (1-based) also gets a plotted figure below its sections (see ``plot_figure``).
    """
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(False)
    for page in range(1, pages + 1):
        pdf.add_page()
        for section in range(1, sections_per_page + 1):
            pdf.set_font("Helvetica", "B", 16)
            pdf.multi_cell(0, 9, f"{title} Section {page}.{section}", new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
            pdf.set_font("Helvetica", "", 11)
            for p in range(2):
                pdf.multi_cell(0, 5, paragraph(seed * 100003 + page * 31 + section * 7 + p), new_x="LMARGIN", new_y="NEXT")
                pdf.ln(3)
        if page == figure_page:
            plot_figure(pdf, seed)
    path = Path(path)
    pdf.output(str(path))
    return path


FIGURE_SEGMENTS = 4000
"""Line segments in ``plot_figure``: 3 graphics operators each, so 12,000 on the page."""


def plot_figure(pdf: FPDF, seed: int, segments: int = FIGURE_SEGMENTS) -> None:
    """A plotted figure in the lower part of the current page, drawn as a statistics package draws one.

    Thousands of short vector line segments and a caption: like page 39 of lme4's ``lmer.pdf``
    (24,516 graphics operators, 126 text operators), it passes unstructured 0.27.32's
    ``is_pdf_too_complex`` limits (over 10,000 graphics operators at over 20 per text operator in
    a content stream of over 100 KB).
    """
    rng = random.Random(seed)
    left, top, width, height = 20.0, 170.0, 170.0, 95.0
    pdf.set_line_width(0.1)
    x, y = left, top + height / 2
    for step in range(1, segments + 1):
        next_x = left + width * step / segments
        next_y = min(top + height, max(top, y + rng.uniform(-1.5, 1.5)))
        pdf.line(x, y, next_x, next_y)
        x, y = next_x, next_y
    pdf.set_xy(left, top + height + 3)
    pdf.set_font("Helvetica", "", 9)
    pdf.multi_cell(0, 4, f"Figure {seed}: profile of the deviance over {segments} evaluations.", new_x="LMARGIN", new_y="NEXT")


def image_only_pdf(path: str | Path, pages: int = 2) -> Path:
    """A scanned-looking PDF: each page is one picture of text, with no text layer."""
    from PIL import Image, ImageDraw

    pdf = FPDF(format="A4")
    for page in range(pages):
        image = Image.new("RGB", (600, 800), "white")
        draw = ImageDraw.Draw(image)
        for line in range(20):
            draw.text((40, 40 + line * 35), f"Scanned page {page + 1} line {line + 1}", fill="black")
        pdf.add_page()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        buffer.seek(0)
        pdf.image(buffer, x=10, y=10, w=190)
    path = Path(path)
    pdf.output(str(path))
    return path


def encrypted_pdf(path: str | Path, password: str = "secret", pages: int = 2, algorithm: str = "AES-256") -> Path:
    """A text PDF that needs ``password`` to open, encrypted with ``algorithm`` (pypdf's names: AES-256, RC4-128, ...)."""
    source = io.BytesIO()
    text_pdf(_scratch := Path(str(path) + ".plain"), pages=pages)
    source.write(_scratch.read_bytes())
    _scratch.unlink()
    writer = PdfWriter(clone_from=PdfReader(source))
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm=algorithm)
    path = Path(path)
    with open(path, "wb") as handle:
        writer.write(handle)
    return path


def empty_file(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def not_a_pdf(path: str | Path) -> Path:
    """A file named .pdf that holds something else entirely (here, a small HTML page)."""
    path = Path(path)
    path.write_bytes(b"<html><body><p>This is a web page saved with the wrong name.</p></body></html>\n")
    return path


def truncated_pdf(path: str | Path, keep: float = 0.4) -> Path:
    """The first ``keep`` fraction of a good PDF, as an interrupted download leaves it."""
    path = Path(path)
    text_pdf(path, pages=3)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def corrupt_pdf(path: str | Path) -> Path:
    """A PDF header followed by damaged structure: no readable objects, no trailer."""
    path = Path(path)
    path.write_bytes(
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
        + bytes((i * 37 + 11) % 256 for i in range(4096))
        + b"\nxref\n0 3\ngarbage\ntrailer\n<< /Root 9 0 R >>\nstartxref\n99999\n%%EOF\n"
    )
    return path
