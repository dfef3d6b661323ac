"""Check the encoder on a CUDA GPU: parity with transformers, and finite pooling in fp16/bf16.

    python scripts/cuda_check.py

The test suite runs on the CPU; the GPU picks other attention kernels, so
this repeats the key checks there. Needs torch with CUDA and transformers.
"""

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model import NORMS, POOLS, SentenceEncoder
from support.model_folder import load_pretrained


def padded_batch(lengths, vocab_size, device):
    """Random ids with the given numbers of real tokens; a length of 0 is an all-padding row."""
    input_ids = torch.randint(1000, vocab_size, (len(lengths), max(lengths)), device=device)
    mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return input_ids.masked_fill(mask == 0, 0), mask


def main():
    import transformers

    assert torch.cuda.is_available(), "no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the parity checks
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")

    golden = load_file(ROOT / "tests/fixtures/tiny_bert_reference.safetensors", device="cuda")
    tiny = load_pretrained(ROOT / "tests/fixtures/tiny_bert_legacy", device="cuda").eval()
    with torch.no_grad():
        hidden, pooled = tiny(golden["input_ids"], golden["attention_mask"], golden["token_type_ids"])
    print(f"tiny fixture vs golden (fp32): hidden {(hidden - golden['last_hidden_state']).abs().max():.2e}, "
          f"pooler {(pooled - golden['pooler_output']).abs().max():.2e}")

    torch.manual_seed(0)
    reference = transformers.BertModel(transformers.BertConfig()).eval()  # bert-base shape, random
    with tempfile.TemporaryDirectory() as tmp:
        reference.config.to_json_file(Path(tmp) / "config.json")
        state = {k: v.contiguous() for k, v in reference.state_dict().items()}
        save_file(state, Path(tmp) / "model.safetensors")
        ours = load_pretrained(tmp, device="cuda").eval()
    reference = reference.cuda()
    input_ids, mask = padded_batch([128, 97, 64, 33, 12, 5, 2, 1], 30522, "cuda")
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask)
        hidden, pooled = ours(input_ids, mask)
        print(f"bert-base shape vs transformers (fp32, no TF32): "
              f"hidden {(hidden - expected.last_hidden_state).abs().max():.2e}, "
              f"pooler {(pooled - expected.pooler_output).abs().max():.2e}")
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype):
                e = reference(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
                h = ours(input_ids, mask)[0].float()
            real = mask.bool()
            print(f"  autocast {dtype}: ours vs transformers on real tokens {(h - e)[real].abs().max():.2e}")

    input_ids, mask = padded_batch([40, 7, 0], 30522, "cuda")  # the last row is all padding
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = ours.to(dtype)
        for pool in POOLS:
            for norm in NORMS:
                with torch.no_grad():
                    out = SentenceEncoder(model, pool, normalize=norm).to("cuda", dtype)(input_ids, mask)
                finite = torch.isfinite(out).all().item()
                empty_is_zero = pool == "cls" or out[2].abs().max().item() == 0
                if not (finite and empty_is_zero):
                    failures += 1
                    print(f"  FAIL {dtype} {pool} {norm}: finite={finite} empty row zero={empty_is_zero}")
    print(f"pooling x normalization x dtype with an all-padding row: {27 - failures}/27 finite and correct")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
