"""Write the RoBERTa and DistilBERT golden fixtures in tests/fixtures/ from transformers.

Run by hand, where the reference packages are installed:

    pip install -r requirements-dev.txt
    python scripts/make_family_fixtures.py

It writes, for FAMILY in roberta and distilbert:
  tiny_FAMILY_plain/    a random 2-layer model (hidden 32, 4 heads) in the base-model
                        layout (RobertaModel / DistilBertModel), as a complete model folder
  tiny_FAMILY_hub/      the same encoder in the masked-LM layout the hub serves
                        (`roberta.` / `distilbert.` prefix, the pre-training head, no pooler)
  tiny_FAMILY_reference.safetensors
                        a padded batch of mixed lengths and the base model's
                        last_hidden_state (and RoBERTa's pooler_output) for it

RoBERTa gets a small byte-level BPE tokenizer trained here (vocab.json,
merges.txt and tokenizer.json); DistilBERT reuses the tiny BERT's vocab.txt.
And family_tokenizer_cases.json: transformers' ids for the strings of
make_fixtures.TOKENIZER_CASES (and a few RoBERTa-specific ones) from
RobertaTokenizer on the tiny vocab.json + merges.txt and from
DistilBertTokenizer on the bert-base-uncased vocab.txt, plus CoNLL sentences
as split words with RoBERTa's ids and character offsets for the same text,
and BertTokenizerFast's pair encoding (ids and segment ids, truncated to 24
pieces longest first) of sentence pairs in the STS-B fixture files.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from make_fixtures import TOKENIZER_CASES, perturb_
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (BertTokenizerFast, DistilBertConfig, DistilBertForMaskedLM, DistilBertModel,
                          DistilBertTokenizer, RobertaConfig, RobertaForMaskedLM, RobertaModel, RobertaTokenizer)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES.parent.parent))
from support.model_folder import ROBERTA_SPECIAL_TOKENS  # noqa: E402  (ids 0-4, as in roberta-base)
CORPUS = [
    "The cat sat on the mat. The dog sat on the rug.",
    "Stocks fell on Tuesday; stocks rose on Wednesday. The team won the game!",
    "EU rejects German call to boycott British lamb. Peter Blackburn reports from Brussels.",
    "Café naïve résumé, Zoë and Björk; 3.14 is pi, 1,000 people, 50% and $5.",
]


def byte_level_bpe(folder):
    """A small byte-level BPE tokenizer with RoBERTa's special tokens and template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(ROBERTA_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(folder))  # vocab.json, merges.txt
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def padded_batch(vocab_size, first, last, pad):
    """Rows of 11, 7, 3 and 1 real tokens, padded with `pad` to 11."""
    torch.manual_seed(1)
    lengths = [11, 7, 3, 1]
    input_ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(5, vocab_size, (n,))
        input_ids[row, 0] = first
        input_ids[row, n - 1] = last if n > 1 else first
        attention_mask[row, :n] = 1
    return input_ids, attention_mask


def write(folder, config, tensors, files=()):
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(folder / "config.json")
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    for source in files:
        shutil.copyfile(source, folder / source.name)


def roberta():
    tokenizer_dir = FIXTURES / "tiny_roberta_plain"
    vocab_size = byte_level_bpe(tokenizer_dir)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    masked_lm = RobertaForMaskedLM(config).eval()
    perturb_(masked_lm, scale=0.3)
    model = RobertaModel._from_config(config, attn_implementation="eager").eval()  # with a pooler
    model.load_state_dict(masked_lm.roberta.state_dict(), strict=False)
    perturb_(model.pooler, scale=0.3)
    files = [tokenizer_dir / name for name in ("vocab.json", "merges.txt", "tokenizer.json")]
    plain = {k: v for k, v in model.state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))}
    write(tokenizer_dir, config, plain)
    hub = {k: v for k, v in masked_lm.state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))}
    assert any(k.startswith("lm_head.") for k in hub) and not any("pooler" in k for k in hub)
    write(FIXTURES / "tiny_roberta_hub", config, hub, files)
    input_ids, attention_mask = padded_batch(vocab_size, first=0, last=2, pad=1)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    save_file({"input_ids": input_ids, "attention_mask": attention_mask,
               "last_hidden_state": out.last_hidden_state.contiguous(),
               "pooler_output": out.pooler_output.contiguous()},
              FIXTURES / "tiny_roberta_reference.safetensors", metadata=versions())


def distilbert():
    vocab = FIXTURES / "tiny_bert_plain" / "vocab.txt"
    vocab_size = len(vocab.read_text().splitlines())
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                              max_position_embeddings=64, pad_token_id=0)
    masked_lm = DistilBertForMaskedLM(config).eval()
    perturb_(masked_lm, scale=0.3)
    with torch.no_grad():  # perturb_ knows BERT's LayerNorm names; give DistilBERT's visible scales too
        for name, p in masked_lm.named_parameters():
            if name.endswith(("layer_norm.weight", "LayerNorm.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model = DistilBertModel._from_config(config, attn_implementation="eager").eval()
    model.load_state_dict(masked_lm.distilbert.state_dict())
    write(FIXTURES / "tiny_distilbert_plain", config,
          {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}, [vocab])
    hub = {k: v for k, v in masked_lm.state_dict().items() if not k.endswith("position_ids")}
    assert any(k.startswith("vocab_projector.") for k in hub)
    write(FIXTURES / "tiny_distilbert_hub", config, hub, [vocab])
    input_ids, attention_mask = padded_batch(vocab_size, first=2, last=3, pad=0)  # [CLS], [SEP], [PAD]
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    save_file({"input_ids": input_ids, "attention_mask": attention_mask,
               "last_hidden_state": out.last_hidden_state.contiguous()},
              FIXTURES / "tiny_distilbert_reference.safetensors", metadata=versions())


ROBERTA_CASES = ["The <mask> sat on the mat.", "<s> already here </s>", " leading space", "trailing space ",
                 "two  spaces", "Ġ is a letter here"]
SENTENCES = [["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
             ["Peter", "Blackburn"], ["BRUSSELS", "1996-08-22"], ["Zoë", "'s", "café", "(", "3.5", "%", ")", "!"],
             ["The", "cat", "sat", "on", "the", "mat", "."]]


def tokenizer_cases():
    only_files = FIXTURES.parent / ".bpe_files"  # RobertaTokenizer from vocab.json + merges.txt alone
    only_files.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(FIXTURES / "tiny_roberta_plain" / name, only_files / name)
    roberta = RobertaTokenizer.from_pretrained(str(only_files))
    shutil.rmtree(only_files)
    distilbert = DistilBertTokenizer.from_pretrained(str(FIXTURES / "bert_vocab"))
    assert len(distilbert.get_vocab()) == 30522
    cases = {"roberta": [{"text": t, "ids": roberta(t)["input_ids"]} for t in TOKENIZER_CASES + ROBERTA_CASES],
             "distilbert": [{"text": t, "ids": distilbert(t)["input_ids"]} for t in TOKENIZER_CASES],
             "roberta_words": []}
    for words in SENTENCES:
        encoding = roberta(" ".join(words), return_offsets_mapping=True)
        cases["roberta_words"].append({"words": words, "ids": encoding["input_ids"],
                                       "offsets": encoding["offset_mapping"]})
    bert = BertTokenizerFast.from_pretrained(str(FIXTURES / "bert_vocab"), do_lower_case=True)
    pairs = [tuple(line.split("\t")[5:7]) for split in ("train", "dev")
             for line in (FIXTURES / "data" / "stsb" / f"sts-{split}.csv").read_text().splitlines()]
    long = "a much longer first sentence that goes on and on about the weather in the hills"
    pairs += [(long, "short"), (long + " and the valleys below them", "a second sentence, long enough to be cut too")]
    cases["bert_pairs"] = []
    for a, b in pairs:
        encoding = bert(a, b, truncation="longest_first", max_length=24)
        cases["bert_pairs"].append({"a": a, "b": b, "ids": encoding["input_ids"],
                                    "type_ids": encoding["token_type_ids"]})
    (FIXTURES / "family_tokenizer_cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")


def versions():
    return {"transformers": __import__("transformers").__version__, "torch": torch.__version__}


if __name__ == "__main__":
    roberta()
    distilbert()
    tokenizer_cases()
    print(json.dumps(sorted(p.name for p in FIXTURES.glob("tiny_*"))))
