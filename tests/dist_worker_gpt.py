"""Run under torchrun by test_distributed.py: a few pretraining steps of gpt_minimind (character
tokenizer on a small text file) on 2 CPU ranks, then every rank writes a fingerprint of its weights."""

import hashlib
import json
import os
import sys

from common.config import apply_overrides
from common.distributed import cleanup
from gpt_minimind.train_pretrain import PretrainConfig, main

out_dir, text_file, strategy = sys.argv[1], sys.argv[2], sys.argv[3]
strategy, _, chunk = strategy.partition(":")  # "fsdp:8": FSDP with the head and loss in chunks of 8
cfg = apply_overrides(PretrainConfig(), dict(loss_chunk_size=int(chunk or 0),
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    batch_size=8, lr=3e-3, warmup_iters=2, max_iters=6,
    eval_every=6, save_every=6, log_every=2, eval_blocks=8, threads=1, out_dir=out_dir, text_file=text_file,
    tokenizer="char", distributed=strategy, device="cpu", dtype="fp32", samples=[]))
result = main(cfg)
digest = hashlib.sha256()
for name, p in sorted(result["model"].named_parameters()):
    full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP: gather the shards (a collective)
    digest.update(name.encode())
    digest.update(full.detach().numpy().tobytes())
with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"sha256": digest.hexdigest(), "losses": result["losses"]}, f)
cleanup()
