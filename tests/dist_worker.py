"""Run under torchrun by test_distributed.py: a few training steps of transformer_basics on 2 CPU
ranks (gloo), then every rank writes a fingerprint of its weights for the test to compare."""

import hashlib
import json
import os
import sys

from common.config import apply_overrides
from common.distributed import cleanup
from transformer_basics.train_translate import TrainConfig, main

out_dir, data_file, strategy = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = apply_overrides(TrainConfig(), dict(
    d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, src_vocab_size=60, batch_size=16,
    schedule="cosine", lr=3e-3, warmup_iters=2, max_iters=6, eval_every=6, save_every=6, log_every=2,
    threads=1, dropout=0.0, out_dir=out_dir, data_file=data_file, distributed=strategy, device="cpu"))
result = main(cfg)
digest = hashlib.sha256()
for name, p in sorted(result["model"].named_parameters()):
    # FSDP keeps a shard per rank: gather the full tensor (a collective) before comparing
    full = p.full_tensor() if hasattr(p, "full_tensor") else p
    digest.update(name.encode())
    digest.update(full.detach().numpy().tobytes())
rank = os.environ["RANK"]
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"sha256": digest.hexdigest(), "losses": result["losses"]}, f)
cleanup()
