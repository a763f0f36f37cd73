"""The induction-2l tokenizer: one short English word per token id, split on whitespace.

Id 0 is ``<bos>`` (also end-of-text and padding); ids 1..63 are the words below, so a prompt is
text like ``"cat dog red cat dog"``. The tokenizer is built with ``tokenizers`` (WordLevel +
WhitespaceSplit), shipped saved in ``induction_2l/``, and loaded from there: TransformerLens
needs the ``name_or_path`` that only a loaded tokenizer carries.
"""

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from ..errors import RatLensError

BOS_TOKEN = "<bos>"
# fmt: off
WORDS = (
    "cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee", "ant", "elk",
    "red", "blue", "green", "pink", "gray", "gold", "tan",
    "sun", "moon", "star", "sky", "rain", "snow", "wind", "fog", "ice",
    "tree", "leaf", "rose", "oak", "fern", "moss",
    "box", "cup", "pen", "key", "map", "hat", "bag", "car", "bus", "van",
    "one", "two", "six", "ten",
    "run", "sit", "jump", "walk", "swim", "fly",
    "big", "old", "new", "hot", "cold", "wet", "dry",
    "hill", "lake", "sea",
    "a",  # TransformerLens's bridge encodes "a" to find out whether the tokenizer adds BOS
)
# fmt: on
VOCAB = {BOS_TOKEN: 0, **{word: i for i, word in enumerate(WORDS, start=1)}}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tokenizer in memory (the training script saves it next to the weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if len(set(WORDS)) != 63:
        raise RuntimeError(f"WORDS must be 63 distinct words, got {len(set(WORDS))}")
    backend = Tokenizer(models.WordLevel(VOCAB))  # no unk token: unknown words are errors
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        pad_token=BOS_TOKEN,
        add_bos_token=True,
        model_max_length=64,
    )


class InductionTokenizer(PreTrainedTokenizerFast):
    """The shipped tokenizer, with an unknown word reported by name instead of the backend's
    ``WordLevel error: Missing [UNK] token``."""

    def _encode_plus(self, *args, **kwargs):
        try:
            return super()._encode_plus(*args, **kwargs)
        except Exception as err:  # the Rust backend raises a bare Exception
            if not _is_unknown_word(err):
                raise
            raise _unknown_word_error(args[0] if args else kwargs.get("text")) from err

    # transformers 4.x encodes batches here (5.x routes everything through _encode_plus).
    def _batch_encode_plus(self, *args, **kwargs):
        try:
            return super()._batch_encode_plus(*args, **kwargs)
        except Exception as err:
            if not _is_unknown_word(err):
                raise
            texts = args[0] if args else kwargs.get("batch_text_or_text_pairs")
            raise _unknown_word_error(texts) from err


def _is_unknown_word(err: Exception) -> bool:
    return "Missing [UNK]" in str(err)


def _unknown_word_error(text: object) -> RatLensError:
    unknown = sorted({word for word in _words(text) if word not in VOCAB})
    return RatLensError(
        f"unknown word(s) {unknown} for the induction-2l tokenizer; its vocabulary is "
        f"{BOS_TOKEN!r} and the 63 words of rat_lens.models.WORDS: {' '.join(WORDS)}"
    )


def _words(text: object) -> list[str]:
    if isinstance(text, str):
        return text.split()
    if isinstance(text, (list, tuple)):
        return [word for item in text for word in _words(item)]
    return []


def load_tokenizer(folder: Path) -> InductionTokenizer:
    """Load the saved tokenizer from ``folder`` (which is what TransformerLens needs)."""
    # transformers 5 does not save add_bos_token; TL re-loads by name_or_path if it reads False.
    return InductionTokenizer.from_pretrained(str(folder), add_bos_token=True)
