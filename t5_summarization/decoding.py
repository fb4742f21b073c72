"""Decoding with the KV cache: greedy and beam search, written out. Greedy picks the most likely token at each
step. Beam search keeps the ``num_beams`` best partial outputs by summed log-probability; a finished one is
scored by sum / length^length_penalty (so ``length_penalty`` > 0 favours longer ones); ``no_repeat_ngram_size``
forbids any n-gram to appear twice; with ``early_stopping`` the search ends once ``num_beams`` outputs are
finished. These are the rules of transformers' ``generate``, and a test checks that both decoders give its
tokens. infer.py and train_summarize.py (its final scores) decode with these.
"""

from __future__ import annotations

import torch

from .dataset import EOS, PAD
from .model import T5ForConditionalGeneration


@torch.no_grad()
def greedy_decode(model: T5ForConditionalGeneration, ids: torch.Tensor, mask: torch.Tensor, max_len: int,
                  no_repeat_ngram_size: int = 0) -> list[list[int]]:
    """Batch greedy decoding with the KV cache; each row stops at </s> (then pads)."""
    model.eval()
    enc = model.encode(ids, mask)
    B = ids.shape[0]
    cur = torch.full((B, 1), model.config.decoder_start_token_id, dtype=torch.long, device=ids.device)
    out, done, cache = [], torch.zeros(B, dtype=torch.bool, device=ids.device), None
    seqs = cur
    for _ in range(max_len):
        logits, cache = model.decode(cur, enc, mask, cache)
        logp = logits[:, -1].float().log_softmax(-1)
        if no_repeat_ngram_size:
            logp = ban_repeated_ngrams(logp, seqs, no_repeat_ngram_size)
        nxt = logp.argmax(-1).masked_fill(done, PAD)
        out.append(nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == EOS
        cur = nxt[:, None]
        if done.all():
            break
    rows = torch.stack(out, dim=1).tolist()
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in rows]


def ban_repeated_ngrams(logp: torch.Tensor, seqs: torch.Tensor, n: int) -> torch.Tensor:
    """Set -inf on every token that would complete an n-gram already in the sequence (per row)."""
    logp = logp.clone()
    T = seqs.shape[1]
    if T + 1 < n:
        return logp
    for b, row in enumerate(seqs.tolist()):
        prefix = tuple(row[T - n + 1:])
        banned = [row[i + n - 1] for i in range(T - n + 1) if tuple(row[i: i + n - 1]) == prefix]
        if banned:
            logp[b, banned] = float("-inf")
    return logp


@torch.no_grad()
def beam_search(model: T5ForConditionalGeneration, ids: torch.Tensor, mask: torch.Tensor, max_len: int,
                num_beams: int = 4, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                early_stopping: bool = True) -> list[list[int]]:
    """Beam search for one source at a time (ids (1, S)); returns the best finished sequence (without
    the start token, ending in </s> unless ``max_len`` cut it)."""
    if ids.shape[0] != 1:
        return [beam_search(model, ids[i: i + 1], mask[i: i + 1], max_len, num_beams, length_penalty,
                            no_repeat_ngram_size, early_stopping)[0] for i in range(ids.shape[0])]
    model.eval()
    K = num_beams
    enc = model.encode(ids, mask).expand(K, -1, -1)
    enc_mask = mask.expand(K, -1)
    seqs = torch.full((K, 1), model.config.decoder_start_token_id, dtype=torch.long, device=ids.device)
    # all beams start identical: only the first may expand at step 1, or we would get K copies
    scores = torch.tensor([0.0] + [float("-inf")] * (K - 1), device=ids.device)
    finished: list[tuple[float, list[int]]] = []
    cache = None
    for step in range(max_len):
        logits, cache = model.decode(seqs[:, -1:], enc, enc_mask, cache)
        logp = logits[:, -1].float().log_softmax(-1)  # (K, V)
        if no_repeat_ngram_size:
            logp = ban_repeated_ngrams(logp, seqs, no_repeat_ngram_size)
        V = logp.shape[-1]
        # 1) every beam x every token; keep the 2K best so that K survive even if some end here
        cand = (scores[:, None] + logp).view(-1)
        top, idx = cand.topk(2 * K)
        beam, token = idx // V, idx % V
        # 2) a candidate ending in </s> (or reaching max_len) is finished, scored by its length-normalised
        #    log-probability; only candidates ranked among the top K may finish (the rest are spares)
        last = step == max_len - 1
        keep = []
        for rank, (s, b, t) in enumerate(zip(top.tolist(), beam.tolist(), token.tolist())):
            if t == EOS or last:
                if rank < K:
                    hyp = seqs[b, 1:].tolist() + [t]
                    finished.append((s / (len(hyp) ** length_penalty), hyp))
            elif len(keep) < K:
                keep.append((s, b, t))
        if last:
            break
        # 3) keep the K best finished; stop once K are finished (early stopping), or when the best running
        #    beam, even at its current length, cannot beat the worst finished one
        finished.sort(key=lambda x: -x[0])
        finished = finished[:K]
        if len(finished) == K:
            best_running = keep[0][0] / (seqs.shape[1] ** length_penalty)
            if early_stopping or finished[-1][0] >= best_running:
                break
        order = torch.tensor([b for _, b, _ in keep], device=ids.device)
        seqs = torch.cat([seqs[order], torch.tensor([[t] for _, _, t in keep], device=ids.device)], dim=1)
        scores = torch.tensor([s for s, _, _ in keep], device=ids.device)
        cache = [((sk[order], sv[order]), cc) for (sk, sv), cc in cache]
    return [max(finished, key=lambda x: x[0])[1]]
