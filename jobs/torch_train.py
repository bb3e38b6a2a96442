"""A toy model trained for a few steps with hpcattn.torch, the sequence sharded over the ranks.

Each rank holds a contiguous piece of one long token sequence; the attention (any mask and
variant) sees the whole sequence through hpcattn, and the parameters' gradients are summed
over the ranks (mpi4py Allreduce) before each optimizer step, so every rank keeps the same model.
Prints one JSON line per step on rank 0 (the loss over the whole sequence).

    mpiexec -n 2 python jobs/torch_train.py --seq 4096 --steps 5 --mask causal+window:128
"""
import argparse
import json

import numpy as np
import torch
from mpi4py import MPI

import hpcattn.torch as ht
from hpcattn.partition import segments


class Block(torch.nn.Module):
    """Embedding, one attention layer over the sharded sequence, a next-token head."""

    def __init__(self, vocab, dim, heads):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, mask, comm, variant):
        x = self.embed(tokens)[None]                               # (1, n, dim)
        q, k, v = self.qkv(x).view(1, x.shape[1], 3, self.heads, -1).unbind(2)  # (1, n, H, D) each
        o = ht.attention(q, k, v, mask=mask, comm=comm, variant=variant)
        return self.out(x + o.reshape(x.shape))[0]                 # (n, vocab) logits


def train(seq, steps, mask, variant="auto", comm=MPI.COMM_WORLD, dim=64, heads=4, vocab=97, seed=0):
    """Losses of `steps` SGD steps, the same on every rank (each sums its rows' losses)."""
    torch.manual_seed(seed)
    model = Block(vocab, dim, heads)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens = torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, seq + 1))
    (a, b), = segments(seq, comm.size, comm.rank, "contiguous")
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(tokens[a:b], mask, comm, variant)
        loss = torch.nn.functional.cross_entropy(logits, tokens[a + 1:b + 1], reduction="sum") / seq
        loss.backward()
        for p in model.parameters():  # the same update on every rank
            comm.Allreduce(MPI.IN_PLACE, p.grad.numpy(), op=MPI.SUM)
        opt.step()
        losses.append(comm.allreduce(loss.item(), op=MPI.SUM))
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mask", default="causal+window:128")
    ap.add_argument("--variant", default="auto")
    a = ap.parse_args()
    for step, loss in enumerate(train(a.seq, a.steps, a.mask, a.variant)):
        if MPI.COMM_WORLD.rank == 0:
            print(json.dumps({"step": step, "loss": loss, "ranks": MPI.COMM_WORLD.size}), flush=True)


if __name__ == "__main__":
    main()
