"""WordNet 3.0 nouns (their offsets are ImageNet's wnids) and the ImageNet class lists, offline.

WordNet comes from Debian's ``wordnet-base`` (+ ``wordnet-sense-index``), installed by
``make setup`` in /usr/share/wordnet. NLTK cannot read that folder as installed: it lacks the
``lexnames`` table and NLTK only reads corpora under ``nltk.data.path``. So the stage copies the
files once into ``<bulk>/wordnet/<key>/corpora/wordnet/`` with the fixed 45-line ``lexnames``
table kept in this repository (prep/data/wordnet-lexnames.tsv).

The ImageNet wnid lists (1k and 21k) and their lemmas ship in ``timm`` (data/_info/), read by path.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.report import Reporter
from storage.stage import StageSpec

log = logging.getLogger(__name__)

WORDNET_ENV = "IMAGESMITH_WORDNET_DIR"
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
LEXNAMES = Path(__file__).parent / "data" / "wordnet-lexnames.tsv"
REQUIRED_FILES = ("data.noun", "index.noun", "data.verb", "index.verb", "data.adj", "index.adj",
                  "data.adv", "index.adv", "index.sense", "noun.exc")
WORDNET_NOUNS = 82_115  # noun synsets in WordNet 3.0


def wordnet_source() -> Path:
    """The installed WordNet 3.0 database folder (``IMAGESMITH_WORDNET_DIR`` or /usr/share/wordnet)."""
    source = Path(os.environ.get(WORDNET_ENV) or DEFAULT_WORDNET_DIR)
    missing = [f for f in REQUIRED_FILES if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet 3.0 database not found in {source} (missing {', '.join(missing)}). Install it with "
            f"`apt-get install wordnet-base wordnet-sense-index` (make setup does, as root) or set {WORDNET_ENV}"
        )
    return source


@dataclass(frozen=True)
class WordnetStage(StageSpec):
    """WordNet 3.0 from ``source`` (the installed database folder) in NLTK's layout, on the bulk tier."""

    name = "wordnet"
    tier = "bulk"
    version = 1
    clean = True
    source: str

    def key_params(self) -> dict[str, Any]:
        source = Path(self.source)
        files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(source.iterdir()) if p.is_file()}
        return {**super().key_params(), "files": files}

    def build(self, out: Path, report: Reporter) -> dict[str, Any]:
        """Copy the database and the lexnames table into the NLTK layout, check it reads."""
        source = Path(self.source)
        target = out / "corpora" / "wordnet"
        target.mkdir(parents=True)
        for f in sorted(source.iterdir()):
            if f.is_file():
                shutil.copyfile(f, target / f.name)
        shutil.copyfile(LEXNAMES, target / "lexnames")
        wn = open_wordnet(out)
        nouns = sum(1 for _ in wn.all_synsets("n"))
        if nouns != WORDNET_NOUNS:
            raise ValueError(f"{source} holds {nouns} noun synsets; WordNet 3.0 has {WORDNET_NOUNS}")
        log.info("wordnet: %d noun synsets copied to %s", nouns, out)
        return {"version": wn.get_version(), "nouns": nouns, "source": str(source)}


@functools.lru_cache(maxsize=2)
def open_wordnet(stage_path: Path | str):
    """An NLTK WordNet reader over a WordNet stage directory (the folder holding corpora/)."""
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = str(Path(stage_path).resolve())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)  # NLTK reads corpora only below nltk.data.path
    with warnings.catch_warnings():  # "multilingual functions are not available": we use English only
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(nltk.data.find("corpora/wordnet", paths=[root]), None)


def wnid(offset: int) -> str:
    return f"n{offset:08d}"


def _timm_info() -> Path:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'timm' (source of the ImageNet class lists) is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"


def imagenet_wnids(which: str = "1k") -> list[str]:
    """The ImageNet class wnids in their standard order: ``1k`` (1,000) or ``21k`` (21,843)."""
    files = {"1k": "imagenet_synsets.txt", "21k": "imagenet21k_goog_synsets.txt"}
    if which not in files:
        raise ValueError(f"unknown ImageNet class list {which!r}; choose one of {sorted(files)}")
    return (_timm_info() / files[which]).read_text().split()


def imagenet_lemmas() -> dict[str, str]:
    """wnid -> its words as ImageNet lists them (e.g. 'tabby, tabby cat'), for all 21k classes."""
    lines = (_timm_info() / "imagenet_synset_to_lemma.txt").read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines if "\t" in line)
