"""Text in, token ids out: the tokenizer shared by both tasks.

BERT's tokenizer (Devlin et al., 2019; Wu et al., 2016 for WordPiece) runs in
four steps, each one a component of the `tokenizers` library:
normalize (clean control characters, lower-case, strip accents, space out CJK
characters) -> pre-tokenize (split on whitespace and punctuation) -> WordPiece
(greedy longest match against vocab.txt, '##' marks a word's continuation)
-> post-process ([CLS] text [SEP]).
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class DataError(ValueError):
    """An input file that cannot be used; the message is one line naming the file."""


def _wordpiece_from_vocab(path):
    """The lower-casing BERT WordPiece tokenizer, built from a vocab.txt (one piece per line)."""
    vocab = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\n")] = index  # a repeated line keeps its last index, as in BertTokenizer
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(f"{path}: lacks the special tokens {', '.join(missing)}")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # strip_accents=None means "follow lowercase", so accents are stripped, as in uncased BERT.
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # Special tokens written in the text ("[MASK]") map to their ids, unsplit.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def load_tokenizer(model_dir):
    """The tokenizer of a BERT model folder: tokenizer.json if present, else vocab.txt.

    Padding and truncation are switched off whatever the file says: the
    callers pad per batch and truncate to their own --max-len.
    """
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists():
        path = model_dir / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise DataError(f"{path}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None
    elif (model_dir / "vocab.txt").exists():
        tokenizer = _wordpiece_from_vocab(model_dir / "vocab.txt")
    else:
        raise DataError(f"{model_dir}: has neither tokenizer.json nor vocab.txt")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
