"""Shared helpers for the tiny family builders: word-level tokenizers, random images, processor construction."""

from __future__ import annotations

import contextlib

import numpy as np

N_WORDS = 240  # default: text words w0..w239 get ids 4..243


def word_tokenizer(specials: list[str], special_ids: dict[str, int], extra_special_tokens: dict | None = None,
                   newline_ids: tuple[int, int] | None = None, n_words: int = N_WORDS,
                   base=("<pad>", "<s>", "</s>", "<unk>"), **named):
    """A ``PreTrainedTokenizerFast`` over a word-level vocab: ``base`` tokens at 0..3, ``w{i}`` at 4.., and the
    family's special tokens at the ids given in ``special_ids`` (registered as special/added tokens so that they
    split out of text written without spaces, as in a real tokenizer). ``newline_ids``: "\\n" and "\\n\\n" become
    words of their own with these ids (a run of two newlines is ONE token, as in GPT-2-style BPE tokenizers)
    instead of being dropped as whitespace."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(base) + [f"w{i}" for i in range(n_words)])}
    if newline_ids:
        vocab.update({"\n": newline_ids[0], "\n\n": newline_ids[1]})
    vocab.update(special_ids)
    assert len(set(vocab.values())) == len(vocab), "id clash"
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if newline_ids:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated")])
    else:
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token=base[0], bos_token=base[1],
                                  eos_token=base[2], extra_special_tokens=extra_special_tokens or {}, **named)
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in tok.all_special_tokens]},
                           replace_extra_special_tokens=False)
    return tok


def words(n: int, start: int, n_words: int = N_WORDS) -> list[str]:
    return [f"w{(start + i) % n_words}" for i in range(n)]


def word_ids(n: int, start: int, n_words: int = N_WORDS) -> list[int]:
    return [4 + (start + i) % n_words for i in range(n)]


def images(sizes, seed):
    """Random RGB PIL images of the given (height, width) sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@contextlib.contextmanager
def images_only():
    """Builds / saves / loads a processor whose __init__ takes a ``video_processor`` without one.

    Without torchvision (not installed in this venv, and PyPI's build does not load beside torch 2.13+cpu)
    ``VideoProcessorMixin`` is not exported by ``transformers``, so ``ProcessorMixin.check_argument_for_proper_class``
    rejects *any* ``video_processor`` and ``AutoProcessor.from_pretrained`` fails. Inside this context
    ``ProcessorMixin.get_attributes`` leaves ``video_processor`` out: the processor is then the family's own class,
    with its own ``__call__`` / ``replace_image_token`` code, minus video support."""
    from transformers.processing_utils import ProcessorMixin

    orig = ProcessorMixin.__dict__["get_attributes"]

    @classmethod
    def get_attributes(cls):
        return [a for a in orig.__func__(cls) if a != "video_processor"]

    ProcessorMixin.get_attributes = get_attributes
    try:
        yield
    finally:
        ProcessorMixin.get_attributes = orig
