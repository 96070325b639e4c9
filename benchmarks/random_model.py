"""A randomly initialised model with Qwen3-0.6B's shape, for speed and memory (not for learning).

Qwen3-0.6B: 28 layers, hidden 1024, MLP 3072, 16 query / 8 key-value heads of 128, vocabulary
151,936, tied embeddings. The tokenizer (and chat template) is another model's, copied in: the
Hub is out of reach, and random weights make noise whatever the tokenizer. Its vocabulary is
smaller than the model's, so sampled ids above it decode to nothing; lengths are what count.

    python benchmarks/random_model.py --tokenizer /tmp/smollm2 --out /tmp/qwen3-0.6b-random
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks/

from benchmarks.common import QWEN3_0_6B  # noqa: E402

# beyond the shape: what a saved config of Qwen3-0.6B also says
QWEN3_EXTRA = dict(max_position_embeddings=40_960, rope_theta=1_000_000.0, rms_norm_eps=1e-6)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a model folder whose tokenizer is copied in")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = Qwen3Config(**QWEN3_0_6B, **QWEN3_EXTRA, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: Qwen3-0.6B shape, {n / 1e6:.0f}M parameters, random weights (seed {args.seed})")


if __name__ == "__main__":
    main()
