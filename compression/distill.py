"""Knowledge distillation: the losses and the student.

    loss = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))      (Hinton et al. 2015)
         + (1 - alpha) * CE(z_student, next token)
         + beta * mean over mapped layers of ||P h_student - h_teacher||^2 / ||h_teacher||^2        (FitNets-style)

The KL is averaged over tokens ("batchmean" over the flattened tokens: the sum over the vocabulary, the mean over
positions), and multiplied by T^2 because the gradient of the softened KL scales as 1 / T^2: without it, raising T
would quietly lower the distillation term's weight against the CE. P is a learned linear projection of the
student's hidden state into the teacher's width (the shared space; identity-initialised when the widths agree).
The feature term is the *relative* squared error: an LLM's residual stream grows to norms in the hundreds (a plain
MSE on SmolLM2's hidden states starts near 4,000 and, through gradient clipping, drowns the other two terms: the
first kd_feat run measured exactly that, README), while the ratio starts below 1 whatever the model's scale.

The student is the teacher with layers removed (every k-th kept, the embedding and final norm copied): it starts
close to the teacher's function, which is why distilling into it converges in few steps (DistilBERT initialises
its student this way, from every other layer of BERT).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T), summed over the vocabulary and averaged over tokens."""
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, V).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, V).float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def kept_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers, the first and the last included."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def student_from_teacher(teacher: nn.Module, n_layers: int) -> tuple[nn.Module, list[int]]:
    """A copy of the teacher that keeps ``n_layers`` of its decoder layers (kept_layers), as a plain transformers
    model of the same class (its config says the new depth). Returns (student, the teacher layer of each)."""
    keep = kept_layers(len(teacher.model.layers), n_layers)
    student = copy.deepcopy(teacher)
    student.model.layers = nn.ModuleList(student.model.layers[i] for i in keep)
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i  # the KV cache indexes layers by this
    student.config.num_hidden_layers = n_layers
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student, keep


class FeatureProjector(nn.Module):
    """P: student hidden states -> the teacher's width, one linear map per distilled layer (identity at start
    when the widths agree, so the feature loss starts at the true distance)."""

    def __init__(self, d_student: int, d_teacher: int, n: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d_student, d_teacher, bias=False) for _ in range(n))
        if d_student == d_teacher:
            for p in self.proj:
                nn.init.eye_(p.weight)

    def forward(self, hs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """Mean over layers of ||P h - t||^2 / ||t||^2 (over every position and channel)."""
        return sum((p(h) - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-12)
                   for p, h, t in zip(self.proj, hs, targets)) / len(hs)
