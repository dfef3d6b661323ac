"""Run folders in the tools people already use, and their folders here: sentence-transformers' modules.json,
CrossEncoder's sequence-classification layout, transformers' AutoModel; and folders written before."""

import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, ROOT, TINY_PLAIN
from safetensors.torch import load_file, save_file

import embed
from support import interop
import pairs
import predict
import train
from data import load_tokenizer
from support.model_folder import HEADS_FILE, load_multitask, load_pretrained
from support.runtime import CheckpointError
from support.sentence_pairs import collate_pairs, encode_pairs, load_pairs

sys.path.insert(0, str(ROOT / "scripts"))
import st_scores_run  # noqa: E402

SENTENCES = ["A cat sits on a mat.", "A boy rides a bike quickly today.", "Stocks fell in London."]
PAIRS = [("A cat sits on a mat.", "A cat is sitting."), ("A boy rides a bike.", "The stock market fell.")]
DATA = FIXTURES / "data"


def pair_run(out, encoder, *extra, model=TINY_PLAIN):
    argv = ["--encoder", encoder, "--model", str(model), "--data", str(DATA), "--out", str(out), "--max-len", "32",
            "--batch-size", "4", "--epochs", "1", "--lr", "1e-3", *map(str, extra)]
    assert pairs.main(argv) == 0
    return out


def train_run(out, *extra, model=TINY_PLAIN):
    argv = ["--model", str(model), "--data", str(DATA), "--out", str(out), "--max-len", "64", "--batch-size", "4",
            "--epochs", "1", "--no-data-cache", *map(str, extra)]
    assert train.main(argv) == 0
    return out


def embed_json(capsys, *args):
    capsys.readouterr()
    assert embed.main(["--json", *map(str, args)]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def st_vectors(folder, sentences=SENTENCES):
    st = pytest.importorskip("sentence_transformers", reason="pip install -r requirements-dev.txt")
    return st.SentenceTransformer(str(folder), device="cpu").encode(sentences, convert_to_tensor=True).cpu()


# --- What a run writes, and what its own tools read -------------------------------------

@pytest.mark.parametrize("pool, embed_dim, normalize, modules", [
    ("max", 8, "l2", ["Transformer", "Pooling", "Dense", "Normalize"]),
    ("cls", None, "none", ["Transformer", "Pooling", "Dense"]),  # the pooler, as a Dense with tanh
    ("mean", 8, "none", ["Transformer", "Pooling", "Dense"]),
])
def test_a_bi_encoder_run_writes_the_modules_of_its_sentence_vector(tmp_path, capsys, pool, embed_dim, normalize,
                                                                    modules):
    extra = ["--pool", pool, "--normalize", normalize] + (["--embed-dim", embed_dim] if embed_dim else [])
    run = pair_run(tmp_path / "bi", "bi", *extra)
    listed = json.loads((run / "modules.json").read_text())
    assert [entry["type"].rsplit(".", 1)[1] for entry in listed] == modules
    assert json.loads((run / "sentence_bert_config.json").read_text())["max_seq_length"] == 32
    read = interop.read_modules(run, 32)
    assert (read.pool, read.embed_dim, read.normalize) == (pool, embed_dim, normalize)
    trained = load_pairs(run).encoder
    if pool == "cls":
        assert torch.equal(read.pooler[0], trained.bert.pooler.weight)
    shown, _ = embed_json(capsys, "--model", run, *SENTENCES)  # embed.py: the run's own vector, without flags
    assert (shown["pool"], shown["embed_dim"], shown["normalize"]) == (pool, embed_dim or 32, normalize)
    expected = trained.encode(SENTENCES, load_tokenizer(run), max_len=32)
    assert torch.allclose(torch.tensor(shown["embeddings"]), expected, atol=1e-6)


def test_l1_has_no_module_so_the_run_writes_none_and_says_so(tmp_path, capsys):
    run = pair_run(tmp_path / "bi", "bi", "--normalize", "l1")
    assert "note: --normalize l1 has no sentence-transformers module" in capsys.readouterr().out
    assert not (run / "modules.json").exists() and not (run / "1_Pooling").exists()
    shown, _ = embed_json(capsys, "--model", run, *SENTENCES)  # embed.py still reads it as trained
    assert shown["normalize"] == "l1"
    assert torch.allclose(torch.tensor(shown["embeddings"]).abs().sum(dim=1), torch.ones(3), atol=1e-6)


def test_a_train_run_holds_its_heads_apart_and_its_sentence_vector_in_embed(tmp_path, capsys):
    run = train_run(tmp_path / "run", "--pool", "max", "--embed-dim", 8, "--normalize", "l2")
    encoder_keys = load_file(run / "model.safetensors").keys()
    assert not [k for k in encoder_keys if k.startswith("multitask.")]
    assert {".".join(k.split(".")[1:3]) for k in load_file(run / HEADS_FILE)} == {"heads.ag", "heads.ner", "encoder.project"}
    assert json.loads((run / "tokenizer_config.json").read_text())["model_max_length"] == 64
    model = load_multitask(run)
    shown, _ = embed_json(capsys, "--model", run, *SENTENCES)
    assert (shown["pool"], shown["embed_dim"], shown["normalize"], shown["max_len"]) == ("max", 8, "l2", 64)
    expected = model.encoder.encode(SENTENCES, load_tokenizer(run), max_len=64)
    assert torch.allclose(torch.tensor(shown["embeddings"]), expected, atol=1e-6)
    # A flag given wins, and a note says so.
    shown, err = embed_json(capsys, "--model", run, "--pool", "mean", *SENTENCES)
    assert err == f"note: {run} is a train.py run trained with --pool max; using --pool mean\n"
    assert shown["pool"] == "mean"
    assert embed.main(["--model", str(run), "--embed-dim", "4", "a"]) == 2
    assert capsys.readouterr().err == (f"error: argument --embed-dim: {run} is a train.py run trained with --embed-dim "
                                       "8; leave --embed-dim out\n")
    assert predict.main(["--model", str(run), "--json", "Apple opened a store in London."]) == 0


def test_a_folder_whose_save_was_cut_short_between_its_files_is_refused(tmp_path):
    run = train_run(tmp_path / "run")
    heads = load_file(run / HEADS_FILE)
    heads["multitask.heads.ag.out.bias"] += 1  # the heads of another save
    save_file(heads, run / HEADS_FILE)
    with pytest.raises(CheckpointError) as info:
        load_multitask(run)
    assert str(info.value) == (f"{run / HEADS_FILE}: not the heads that {run / 'config.json'} was saved with "
                               "(was a save cut short?); continue the run with --resume, or train it again")


def old_layout(run, out):
    """A copy of a run folder as runs were written before heads.safetensors and modules.json: the heads in
    model.safetensors, the encoder in its plain layout."""
    shutil.copytree(run, out)
    heads = load_file(run / HEADS_FILE) if (run / HEADS_FILE).exists() else {}
    tensors = {**load_file(run / "model.safetensors"), **heads}
    config = json.loads((run / "config.json").read_text())
    for key in ("architectures", "id2label", "label2id", "classifier_dropout", "sentence_transformers", "heads_digest"):
        config.pop(key, None)
    if "bert.pooler.dense.weight" in tensors:  # a cross-encoder, then in our own layout
        tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
        tensors = {k.replace("classifier.", "pairs.cls_head.out."): v for k, v in tensors.items()}
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, out / "model.safetensors")
    for name in ("modules.json", "sentence_bert_config.json", HEADS_FILE, "1_Pooling", "2_Dense", "3_Normalize"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return out


def test_folders_written_before_still_load_in_predict_and_embed(tmp_path, capsys):
    run = train_run(tmp_path / "run", "--pool", "max", "--embed-dim", 8)
    old = old_layout(run, tmp_path / "old")
    for args in (["--json", "Apple opened a store in London."],):
        capsys.readouterr()
        assert predict.main(["--model", str(run), *args]) == 0
        new_out = capsys.readouterr().out
        assert predict.main(["--model", str(old), *args]) == 0
        assert capsys.readouterr().out == new_out
    assert embed_json(capsys, "--model", old, *SENTENCES)[0]["embeddings"] == \
        embed_json(capsys, "--model", run, *SENTENCES)[0]["embeddings"]
    cross = pair_run(tmp_path / "cross", "cross")
    old_cross = old_layout(cross, tmp_path / "old-cross")
    new, before = load_pairs(cross).state_dict(), load_pairs(old_cross).state_dict()
    assert new.keys() == before.keys() and all(torch.equal(new[k], before[k]) for k in new)


# --- Reading sentence-transformers folders -----------------------------------------------

def st_folder(tmp_path, pool="mean", dense=None, normalize=True, name="st"):
    """The tiny BERT as sentence-transformers (every version) saves a model: modules.json, the Pooling
    settings, a Dense folder (dense: (out_features, activation)), Normalize."""
    folder = tmp_path / name
    shutil.copytree(TINY_PLAIN, folder)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")]
    (folder / "1_Pooling").mkdir()
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
            "weightedmean": "pooling_mode_weightedmean_tokens"}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, **{key: mode == pool for mode, key in keys.items()}}))
    if dense:
        (folder / "2_Dense").mkdir()
        torch.manual_seed(3)
        size, activation = dense
        save_file({"linear.weight": torch.randn(size, 32) / 6, "linear.bias": torch.randn(size) / 6},
                  folder / "2_Dense" / "model.safetensors")
        (folder / "2_Dense" / "config.json").write_text(json.dumps(
            {"in_features": 32, "out_features": size, "bias": True, "activation_function": activation}))
        modules.append(("2_Dense", "Dense"))
    if normalize:
        modules.append((f"{len(modules)}_Normalize", "Normalize"))
    (folder / "modules.json").write_text(json.dumps([{"idx": i, "name": str(i), "path": path,
                                                      "type": f"sentence_transformers.models.{kind}"}
                                                     for i, (path, kind) in enumerate(modules)]))
    return folder


def by_hand(folder, pool, dense=None, normalize=True, sentences=SENTENCES):
    """The sentence vectors of st_folder's modules, computed here from the encoder's token states."""
    bert, tokenizer = load_pretrained(folder).eval(), load_tokenizer(folder)
    rows = []
    for sentence in sentences:
        ids = torch.tensor([tokenizer.encode(sentence).ids])
        with torch.no_grad():
            hidden, pooled = bert(ids, torch.ones_like(ids))
        x = {"mean": hidden[0].mean(0), "max": hidden[0].max(0).values, "cls": hidden[0, 0]}[pool]
        if dense:
            weights = load_file(folder / "2_Dense" / "model.safetensors")
            x = weights["linear.weight"] @ x + weights["linear.bias"]
            x = torch.tanh(x) if dense[1].endswith("Tanh") else x
        rows.append(F.normalize(x, dim=0) if normalize else x)
    return torch.stack(rows)


@pytest.mark.parametrize("pool, dense, normalize", [
    ("mean", None, True),
    ("max", (8, interop.IDENTITY), False),
    ("cls", (32, interop.TANH), True),  # cls + Dense with tanh: BERT's pooler, with the Dense's weights
    ("cls", None, False),  # cls alone: the first token's state, without the pooler the weights hold
])
def test_embed_reads_a_sentence_transformers_folder_without_flags(tmp_path, capsys, pool, dense, normalize):
    folder = st_folder(tmp_path, pool, dense, normalize)
    shown, err = embed_json(capsys, "--model", folder, *SENTENCES)
    assert err == ""
    expected = by_hand(folder, pool, dense, normalize)
    assert torch.allclose(torch.tensor(shown["embeddings"]), expected, atol=1e-5)
    assert shown["normalize"] == ("l2" if normalize else "none")


def test_a_flag_given_wins_over_the_folder_and_says_so(tmp_path, capsys):
    folder = st_folder(tmp_path, "mean", normalize=True)
    shown, err = embed_json(capsys, "--model", folder, "--normalize", "none", "--pool", "max", *SENTENCES)
    assert err == (f"note: {folder / 'modules.json'} gives --pool mean; using --pool max\n"
                   f"note: {folder / 'modules.json'} gives --normalize l2; using --normalize none\n")
    assert torch.allclose(torch.tensor(shown["embeddings"]), by_hand(folder, "max", normalize=False), atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    ("weightedmean", "1_Pooling/config.json: pooling weightedmean_tokens is not one this encoder has (cls, mean, max, "
                     "one at a time)"),
    ("custom", "modules.json: module 2 (my_package.LayerScale) is not one this encoder has (Transformer, Pooling, "
               "Dense, Normalize); use sentence-transformers itself for this model"),
    ("relu", "modules.json: module 2 is a Dense layer with torch.nn.modules.activation.ReLU; this encoder's "
             "projection is linear (and tanh only as the pooler, right after cls pooling)"),
    ("after normalize", "modules.json: module 3 (Dense) comes after Normalize; this encoder normalizes last"),
    ("pickle", "2_Dense/model.safetensors: not found (its pytorch_model.bin is a pickle, which this project never "
               "loads); save the model again with a sentence-transformers version that writes safetensors"),
])
def test_modules_the_encoder_lacks_are_refused_in_one_line(tmp_path, capsys, edit, message):
    dense = (8, "torch.nn.modules.activation.ReLU" if edit == "relu" else interop.IDENTITY)
    folder = st_folder(tmp_path, "weightedmean" if edit == "weightedmean" else "mean", dense, normalize=True)
    listed = json.loads((folder / "modules.json").read_text())
    if edit == "custom":
        listed[2]["type"] = "my_package.LayerScale"
    if edit == "after normalize":
        listed[2], listed[3] = listed[3], listed[2]
    if edit == "pickle":
        (folder / "2_Dense" / "model.safetensors").rename(folder / "2_Dense" / "pytorch_model.bin")
    (folder / "modules.json").write_text(json.dumps(listed))
    capsys.readouterr()
    assert embed.main(["--model", str(folder), "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {folder}/") and err.endswith(message + "\n")
    # train.py reads the folder's pooling as --pool's default: the same line, and nothing written.
    assert train.main(["--model", str(folder), "--data", str(DATA), "--out", str(tmp_path / "run"),
                       "--max-len", "64"]) == 2
    assert capsys.readouterr().err.endswith(message + "\n") and not (tmp_path / "run").exists()


def test_train_takes_the_folders_pooling_as_its_default_and_a_flag_wins(tmp_path, capsys):
    folder = st_folder(tmp_path, "max", (8, interop.IDENTITY), normalize=True)
    run = train_run(tmp_path / "run", model=folder)
    out = capsys.readouterr().out
    assert (f"{folder / 'modules.json'}: pooling max, projection to 8, normalize l2; taken: --pool max; not taken by "
            "this script: --embed-dim 8, --normalize l2 (give them as flags)") in out
    assert json.loads((run / "summary.json").read_text())["config"]["pool"] == "max"
    train_run(tmp_path / "given", "--pool", "cls", model=folder)
    assert f"note: --pool cls given; {folder / 'modules.json'} gives max: using cls" in capsys.readouterr().out
    first_token = st_folder(tmp_path, "cls", normalize=False, name="first-token")
    assert train.main(["--model", str(first_token), "--data", str(DATA), "--out", str(tmp_path / "x"),
                       "--max-len", "64"]) == 2
    assert capsys.readouterr().err == (
        f"error: argument --pool: {first_token / 'modules.json'} pools the first token's state as it is, but the "
        "weights hold a pooler, which --pool cls reads (dense + tanh); give --pool cls to train with the pooler, "
        "or --pool mean or max\n")


def test_a_bi_encoder_starts_from_the_folders_modules(tmp_path, capsys):
    folder = st_folder(tmp_path, "max", (8, interop.IDENTITY), normalize=True)
    capsys.readouterr()
    assert pairs.main(["--encoder", "bi", "--model", str(folder), "--data", str(DATA), "--out", str(tmp_path / "zero"),
                       "--epochs", "0", "--max-len", "32"]) == 0
    out = capsys.readouterr().out
    assert f"{folder / 'modules.json'}: the bi-encoder starts from its projection to 8" in out
    settings = json.loads((tmp_path / "zero" / "config.json").read_text())["pairs"]
    assert settings == {"kind": "bi", "pool": "max", "embed_dim": 8, "normalize": "l2"}
    dense = load_file(folder / "2_Dense" / "model.safetensors")
    assert torch.equal(load_pairs(tmp_path / "zero").encoder.project.weight, dense["linear.weight"])


# --- Live: the tools themselves -----------------------------------------------------------

@pytest.mark.parametrize("pool, embed_dim, normalize", [("max", 8, "l2"), ("cls", None, "none"), ("mean", 4, "l2")])
def test_live_a_bi_encoder_run_in_sentence_transformers(tmp_path, capsys, pool, embed_dim, normalize):
    pytest.importorskip("sentence_transformers", reason="pip install -r requirements-dev.txt")
    extra = ["--pool", pool, "--normalize", normalize] + (["--embed-dim", embed_dim] if embed_dim else [])
    run = pair_run(tmp_path / "bi", "bi", *extra)
    shown, _ = embed_json(capsys, "--model", run, *SENTENCES)
    assert torch.allclose(st_vectors(run), torch.tensor(shown["embeddings"]), atol=1e-5)
    # And sentence-transformers' own evaluator gives the dev Spearman that summary.json holds.
    capsys.readouterr()
    assert st_scores_run.main([str(run), "--data", str(DATA), "--tolerance", "1e-9"]) == 0
    assert json.loads(capsys.readouterr().out)["sentence_transformers_spearman"] == \
        json.loads((run / "summary.json").read_text())["dev"]["spearman"]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_live_a_cross_encoder_run_in_cross_encoder(tmp_path, capsys, family):
    st = pytest.importorskip("sentence_transformers", reason="pip install -r requirements-dev.txt")
    run = pair_run(tmp_path / "cross", "cross", model=FIXTURES / f"tiny_{family}_plain")
    config = json.loads((run / "config.json").read_text())
    assert config["architectures"] == [{"bert": "Bert", "roberta": "Roberta"}[family] + "ForSequenceClassification"]
    pairs_long = PAIRS + [("A man is playing a large flute in the park today.", "A man plays the flute loudly "
                                                                                  "and a crowd listens to him.")]
    theirs = torch.tensor(st.CrossEncoder(str(run), device="cpu").predict(pairs_long))
    model = load_pairs(run).eval()
    data = encode_pairs([(a, b, 0.0) for a, b in pairs_long], load_tokenizer(run), 32)  # the last one is cut
    assert any(data.truncated)
    with torch.no_grad():
        ours = torch.sigmoid(model(collate_pairs(data, list(range(len(pairs_long))), model.bert.config.pad_token_id)))
    assert torch.allclose(ours, theirs, atol=1e-5)
    capsys.readouterr()
    assert st_scores_run.main([str(run), "--data", str(DATA), "--tolerance", "1e-9"]) == 0


def test_a_distilbert_cross_encoder_says_it_has_no_cross_encoder_layout(tmp_path, capsys):
    run = pair_run(tmp_path / "cross", "cross", model=FIXTURES / "tiny_distilbert_plain")
    assert ("note: transformers' distilbert sequence-classification model has a classifier with a ReLU, which ours "
            "lacks: CrossEncoder cannot load the run folder as trained") in capsys.readouterr().out
    assert "architectures" not in json.loads((run / "config.json").read_text())
    assert load_pairs(run).cls_head.out.weight.shape == (1, 32)  # in our own layout: heads.safetensors


def test_live_a_train_run_in_auto_model_and_sentence_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="pip install -r requirements-dev.txt")
    run = train_run(tmp_path / "run", "--pool", "max", "--embed-dim", 8, "--normalize", "l2")
    auto, info = transformers.AutoModel.from_pretrained(str(run), output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    ids = torch.tensor([[2, 7, 8, 9, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        theirs = auto.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        ours, _ = load_multitask(run).bert.eval()(ids, mask)
    assert torch.allclose(theirs[mask.bool()], ours[mask.bool()], atol=1e-5)
    shown, _ = embed_json(capsys, "--model", run, *SENTENCES)
    assert torch.allclose(st_vectors(run), torch.tensor(shown["embeddings"]), atol=1e-5)


@pytest.mark.parametrize("pool, dense, normalize", [("mean", None, True), ("max", (8, interop.IDENTITY), True),
                                                    ("cls", (32, interop.TANH), False), ("cls", None, True)])
def test_live_embed_equals_sentence_transformers_on_its_folders(tmp_path, capsys, pool, dense, normalize):
    folder = st_folder(tmp_path, pool, dense, normalize)
    shown, _ = embed_json(capsys, "--model", folder, *SENTENCES)
    assert torch.allclose(st_vectors(folder), torch.tensor(shown["embeddings"]), atol=1e-5)


def test_live_embed_equals_sentence_transformers_on_a_folder_it_saved(tmp_path, capsys):
    """sentence-transformers 6 writes its own names and settings (pooling_mode): read those too."""
    st = pytest.importorskip("sentence_transformers", reason="pip install -r requirements-dev.txt")
    modules = [st.models.Transformer(str(TINY_PLAIN)), st.models.Pooling(32, pooling_mode="max"),
               st.models.Dense(32, 8, activation_function=torch.nn.Identity()), st.models.Normalize()]
    st.SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "saved"))
    shown, err = embed_json(capsys, "--model", tmp_path / "saved", *SENTENCES)
    assert (shown["pool"], shown["embed_dim"], shown["normalize"]) == ("max", 8, "l2")
    assert torch.allclose(st_vectors(tmp_path / "saved"), torch.tensor(shown["embeddings"]), atol=1e-5)


def test_live_embed_equals_sentence_transformers_on_minilm(minilm_dir, capsys):
    shown, _ = embed_json(capsys, "--model", minilm_dir, *SENTENCES)
    assert (shown["pool"], shown["normalize"], shown["max_len"]) == ("mean", "l2", 256)
    assert torch.allclose(st_vectors(minilm_dir), torch.tensor(shown["embeddings"]), atol=1e-5)
