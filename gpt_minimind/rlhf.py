"""The pieces GRPO, PPO and the evaluation share: sampled answers with the KV cache, prompt + answer rows
with labels on the answer only, per-token log-probabilities, reward-model scores, and the KL to the
reference model measured on the policy's own samples.

A row is the prompt's ids (the chat template with the assistant header) followed by the answer's tokens,
up to and including the end-of-turn token when the model produced it. The reward model reads the same
row, so what it scores in PPO is exactly what the policy wrote (no decode and re-encode on the way).
"""

from __future__ import annotations

import torch

from . import engine
from .finetune import encode_chat
from .model import MiniMindForCausalLM, MiniMindForSequenceClassification
from .tasks import NEWS_LABELS, Example


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The conversation so far, rendered with the chat template and the assistant header."""
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


@torch.no_grad()
def sample_answers(model: MiniMindForCausalLM, tok, ids: list[int], n: int, max_new_tokens: int,
                   temperature: float, generator: torch.Generator | None) -> list[list[int]]:
    """``n`` answers to one prompt, sampled together (one batch through the KV cache); each is cut after
    its first end-of-turn token (kept: the model chose to stop there)."""
    device = model.lm_head.weight.device
    prompt = torch.tensor([ids] * n, device=device)
    steps = list(engine.generate(model, prompt, max_new_tokens, temperature=temperature,
                                 eos_token_id=tok.eos_token_id, generator=generator))
    tokens = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(n)]
    return [row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in tokens]


def answer_text(tok, answer: list[int]) -> str:
    return tok.decode([t for t in answer if t != tok.eos_token_id], skip_special_tokens=True)


def collate(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows prompt + answer as (x, y) for a causal LM: x the row without its last token, y the next tokens
    with -100 everywhere but the answer (label t is token t + 1). Right-padded."""
    rows = [p + a for p, a in zip(prompts, answers)]
    T = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        r = p + a
        x[i, :len(r) - 1] = torch.tensor(r[:-1])
        y[i, len(p) - 1:len(r) - 1] = torch.tensor(a)
    return x, y


def full_rows(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, T) prompt + answer, right-padded: what a reward model reads (its score sits on the last token)."""
    rows = [p + a for p, a in zip(prompts, answers)]
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def token_logps(model: MiniMindForCausalLM, x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0
                ) -> torch.Tensor:
    """(B, T) log p(y_t | x_<=t); zero where y is -100. ``temperature``: of the distribution the answers
    were sampled from (PPO's ratio and KL must use the policy that actually sampled)."""
    logp = (model(x)["logits"].float() / temperature).log_softmax(-1)
    return logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)


@torch.no_grad()
def score_answers(rm: MiniMindForSequenceClassification, tok, prompts: list[list[dict]], answers: list[str],
                  batch_size: int = 32) -> torch.Tensor:
    """(N,) reward-model scores of text answers, each rendered as the reward model was trained on them:
    the chat template of prompt + answer, up to the answer's end-of-turn token."""
    rm.eval()
    max_len = rm.config.max_position_embeddings
    rows = [encode_chat(tok, p + [{"role": "assistant", "content": a}], max_len)[0] for p, a in zip(prompts, answers)]
    device = rm.score.weight.device
    out = []
    for i in range(0, len(rows), batch_size):
        x = full_rows(rows[i:i + batch_size], [[] for _ in rows[i:i + batch_size]], tok.pad_token_id)
        out.append(rm(x.to(device))["scores"].cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def kl_to_reference(policy: MiniMindForCausalLM, reference: MiniMindForCausalLM, tok, prompts: list[list[dict]],
                    max_new_tokens: int, seed: int = 0) -> float:
    """KL(policy || reference) per answer, in nats, on one answer per prompt sampled from the policy at
    temperature 1: at every answer position the exact KL between the two next-token distributions, summed
    over the answer, averaged over prompts. By the chain rule its expectation is the KL between the two
    models' answer distributions; it is never negative and varies far less than the sampled log-ratio.
    The quantity PPO's KL penalty holds down and DPO's beta implicitly bounds."""
    device = policy.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for messages in prompts:
        ids = prompt_ids(tok, messages)
        ans = sample_answers(policy, tok, ids, 1, max_new_tokens, 1.0, gen)[0]
        if not ans:
            continue
        x, y = collate([ids], [ans], tok.pad_token_id)
        x, on_answer = x.to(device), (y != -100).to(device)
        logp = policy(x)["logits"].float().log_softmax(-1)
        logq = reference(x)["logits"].float().log_softmax(-1)
        total += ((logp.exp() * (logp - logq)).sum(-1) * on_answer).sum().item()
    return total / max(len(prompts), 1)


@torch.no_grad()
def label_choices(score, tests: list[Example], per_task: int) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """For the two label tasks, every candidate label scored as the answer to each of the first ``per_task``
    held-out questions by ``score(prompts, answers) -> (N,)``: (how often each label scores highest, how often
    the highest is the reference). 中性 is offered for reviews too, a label the reward model almost never saw
    there. With a reward model's score, the second number is the accuracy of a policy that maximised it; a
    reward model that prefers one label whatever the question invites a policy to say only that."""
    counts, accuracy = {}, {}
    for task, labels in (("news_sentiment", NEWS_LABELS), ("review_sentiment", ("好评", "差评", "中性"))):
        examples = [ex for ex in tests if ex.task == task][:per_task]
        prompts = [ex.prompt for ex in examples]
        best = torch.stack([score(prompts, [label] * len(prompts)) for label in labels], 1).argmax(1)
        counts[task] = {label: int((best == i).sum()) for i, label in enumerate(labels)}
        accuracy[task] = sum(labels[int(b)] == ex.answer for b, ex in zip(best, examples)) / max(len(examples), 1)
    return counts, accuracy


def reward_label_preference(rm: MiniMindForSequenceClassification, tok, tests: list[Example], per_task: int
                            ) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """label_choices by the reward model's score."""
    return label_choices(lambda prompts, answers: score_answers(rm, tok, prompts, answers), tests, per_task)


@torch.no_grad()
def answer_logps(model: MiniMindForCausalLM, tok, prompts: list[list[dict]], answers: list[str],
                 batch_size: int = 32) -> torch.Tensor:
    """(N,) the language model's summed log-probability of each answer (and its end-of-turn token)."""
    model.eval()
    max_len = model.config.max_position_embeddings
    device = model.lm_head.weight.device
    rows = [encode_chat(tok, p + [{"role": "assistant", "content": a}], max_len) for p, a in zip(prompts, answers)]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        x = full_rows([r[0] for r in chunk], [[] for _ in chunk], tok.pad_token_id)
        y = torch.full_like(x, -100)
        for b, (_, labels) in enumerate(chunk):
            y[b, :len(labels)] = torch.tensor(labels)
        out.append(token_logps(model, x.to(device), y.to(device)).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)
