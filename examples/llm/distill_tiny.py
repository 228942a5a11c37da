"""Distil a tiny randomly initialised causal language model into a smaller one with wk.VocabOTLoss, on CPU.

Nothing is downloaded: teacher and student are plain torch modules (token embedding, a few Transformer encoder
layers with a causal mask, an lm_head), the "corpus" random token sequences with padding. The k-NN cost comes from
the teacher's token embeddings (wk.knn_kernel), as WASD does; the student is trained on cross-entropy + the
Sinkhorn divergence between its next-token distribution and the teacher's, the latter through the fused lm_head
path (VocabOTLoss.forward_hidden: the student's logits exist one chunk of tokens at a time). Run:

    python -m examples.llm.distill_tiny --steps 20

Hugging Face Trainer (documentation only; `transformers` is not a dependency of this package):

    class WassersteinDistillTrainer(transformers.Trainer):
        def __init__(self, *args, teacher, vocab_loss, alpha=1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.vocab_loss, self.alpha = teacher.eval(), vocab_loss, alpha

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = model(**inputs)                       # inputs carry "labels": out.loss is the LM loss
            with torch.no_grad():
                t_logits = self.teacher(**inputs).logits
            labels = inputs["labels"][:, 1:]            # next-token targets; -100 marks padding / prompt
            ot = self.vocab_loss(out.logits[:, :-1], t_logits[:, :-1], labels)
            loss = out.loss + self.alpha * ot
            return (loss, out) if return_outputs else loss

    vocab_loss = wk.VocabOTLoss(wk.knn_kernel(teacher.get_input_embeddings().weight.detach().float(), k=8),
                                reg=1e-3, num_iters=10, chunk_size=256).to(device)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import wkd_kernels as wk


class TinyCausalLM(nn.Module):
    """Token embedding + causal Transformer encoder layers + lm_head (no weight tying)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int = 2, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        causal = torch.triu(torch.full((L, L), float("-inf"), device=tokens.device), diagonal=1)
        return self.norm(self.body(self.embed(tokens) + self.pos[:L], mask=causal))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens))


def random_batch(batch: int, length: int, vocab: int, pad: int, generator: torch.Generator):
    """Random sequences with a random amount of right padding; labels = next token, -100 on padding."""
    tokens = torch.randint(1, vocab, (batch, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    pos = torch.arange(length)
    tokens = torch.where(pos[None] < lengths[:, None], tokens, torch.full_like(tokens, pad))
    labels = tokens[:, 1:].masked_fill(tokens[:, 1:] == pad, -100)
    return tokens, labels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--reg", type=float, default=0.05)
    ap.add_argument("--alpha", type=float, default=1.0, help="weight of the Wasserstein term")
    ap.add_argument("--ce", type=float, default=1.0, help="weight of the cross-entropy term")
    ap.add_argument("--fixed-batch", action="store_true", help="one batch every step (overfitting check)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    pad = 0
    teacher = TinyCausalLM(args.vocab, 64, 3).eval()
    student = TinyCausalLM(args.vocab, 32, 1)
    cost = wk.knn_kernel(teacher.embed.weight.detach(), args.k)
    vocab_loss = wk.VocabOTLoss(cost, reg=args.reg, num_iters=10, chunk_size=64)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    history = []
    batch = random_batch(args.batch, args.length, args.vocab, pad, gen)
    for step in range(args.steps):
        tokens, labels = batch if args.fixed_batch else random_batch(args.batch, args.length, args.vocab, pad, gen)
        with torch.no_grad():
            t_logits = teacher(tokens)[:, :-1]
        h = student.hidden(tokens)[:, :-1]
        ce = F.cross_entropy(student.lm_head(h).flatten(0, 1), labels.flatten(), ignore_index=-100)
        ot = vocab_loss.forward_hidden(h, student.lm_head.weight, t_logits, labels)
        loss = args.ce * ce + args.alpha * ot
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(ot.item())
        print(f"step {step:3d}  ce {ce.item():.4f}  sinkhorn divergence {ot.item():.5f}")
    return history


if __name__ == "__main__":
    main()
