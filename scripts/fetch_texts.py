"""Assemble the offline text corpora from real text that registry packages ship as test data.

Run once by `make install`. Writes plain UTF-8 files into --out and a `.complete` marker last,
so an interrupted run is redone rather than half-used. Sources (see docs/jobs.md, "Texts"):

  gensim==4.4.0 wheel      gensim/test/test_data/lee_background.cor   300 news articles
                           gensim/test/test_data/lee.cor              50 more (latin-1)
                           gensim/test/test_data/pang_lee_polarity.cor 200 labelled review sentences
  brotli==1.2.1 sdist      tests/testdata/alice29.txt, asyoulik.txt   Canterbury corpus
  sentencepiece==0.2.3     test/botchan.txt                           Soseki, Botchan (English)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# (package spec, pip download flags, {member path suffix: (output name, source encoding)})
SOURCES = [
    ("gensim==4.4.0", ["--only-binary=:all:"], {
        "gensim/test/test_data/lee_background.cor": ("lee_background.txt", "utf-8"),
        "gensim/test/test_data/lee.cor": ("lee.txt", "latin-1"),
        "gensim/test/test_data/pang_lee_polarity.cor": ("pang_lee_polarity.txt", "latin-1"),
    }),
    ("brotli==1.2.1", ["--no-binary=:all:"], {
        "tests/testdata/alice29.txt": ("alice29.txt", "utf-8"),
        "tests/testdata/asyoulik.txt": ("asyoulik.txt", "utf-8"),
    }),
    ("sentencepiece==0.2.3", ["--no-binary=:all:"], {
        "test/botchan.txt": ("botchan.txt", "utf-8-sig"),
    }),
]


def _members(archive: Path) -> dict[str, bytes]:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return {n: z.read(n) for n in z.namelist() if n.endswith((".cor", ".txt"))}
    with tarfile.open(archive) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()
                if m.isfile() and m.name.endswith((".cor", ".txt"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    out: Path = ap.parse_args().out
    (out / ".complete").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec, flags, wanted in SOURCES:
            dl = Path(tmp) / spec.split("==")[0]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *flags,
                            spec, "-d", str(dl)], check=True)
            (archive,) = list(dl.iterdir())
            members = _members(archive)
            for suffix, (name, encoding) in wanted.items():
                hits = [data for path, data in members.items() if path.endswith(suffix)]
                if len(hits) != 1:
                    sys.exit(f"fetch_texts: {suffix} not found in {archive.name}; the package changed?")
                text = hits[0].decode(encoding).replace("\r\n", "\n")
                tmp_file = out / (name + ".tmp")
                tmp_file.write_text(text, encoding="utf-8")
                tmp_file.replace(out / name)
                print(f"{name:24s} {len(text):8d} chars  from {spec}")
    (out / ".complete").touch()


if __name__ == "__main__":
    main()
