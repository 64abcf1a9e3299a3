"""Train Medusa heads on the frozen model by self-distillation on the ShareGPT training split.

1. Take first user turns of training-split conversations as chat prompts and let the model answer them greedily:
   the labels are the model's own outputs, so the heads learn what this model will say (no teacher text needed).
2. Run each prompt + answer once through the frozen model and keep the final hidden states of the answer.
3. Head k learns to predict the token k+1 places after each hidden state (cross-entropy, weighted 0.8^k).
A progress bar shows the loss; the loss curve goes to a PNG; the heads are saved in float16 with the model's
fingerprint and the exact command. Held-out sequences give each head's top-1 accuracy.

    python -m speculative.train_medusa                                  # CPU: a few minutes
    python -m speculative.train_medusa --device cuda --num-prompts 2000 --gen-len 192 --epochs 3   # GPU
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from core.__main__ import add_model_args
from core.data import conversations
from core.errors import UserError, cli
from core.generate import SamplingParams, chat_prompt, generate
from core.loading import load_model
from speculative.medusa import MedusaHeads, default_heads_path, save_heads


def self_distillation_data(lm, num_prompts: int, gen_len: int, max_input_len: int, batch_size: int):
    """[(hidden [T, H], labels [T]) per answer]: hidden states of the last prompt token and each answer token,
    labels[t] = the answer token after hidden t (the model's own greedy output)."""
    prompts = []
    for conv in conversations("training"):
        if len(prompts) == num_prompts:
            break
        ids = chat_prompt(lm.tokenizer, conv["turns"][0][1])
        if 4 <= len(ids) <= max_input_len:
            prompts.append(ids)
    if len(prompts) < num_prompts:
        raise UserError(f"only {len(prompts)} training prompts fit --max-input-len {max_input_len}")
    prompts.sort(key=len)  # similar lengths per batch: less left padding
    device = next(lm.model.parameters()).device
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="self-distillation answers"):
        batch = prompts[i:i + batch_size]
        answers = generate(lm.model, batch, SamplingParams(max_tokens=gen_len)).tokens
        for prompt, answer in zip(batch, answers):
            with torch.inference_mode():
                h = lm.model.hidden_states(torch.tensor([prompt + answer], device=device))[0]
            out.append((h[len(prompt) - 1:].float().clone(), torch.tensor(answer, device=device)))
    return out


def head_batches(data, num_heads: int):
    """Flatten to (hidden [N, H], targets [N, K]) with -100 where the answer ends before the k-th next token."""
    hs, ys = [], []
    for h, answer in data:
        n = len(answer)
        y = torch.full((n, num_heads), -100, dtype=torch.long, device=answer.device)
        for k in range(1, num_heads + 1):  # hidden t (its next token is answer[t]) -> head k predicts answer[t+k]
            y[: max(n - k, 0), k - 1] = answer[k:]
        hs.append(h[:n])
        ys.append(y)
    return torch.cat(hs), torch.cat(ys)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=48, help="training-split prompts to answer")
    parser.add_argument("--gen-len", type=int, default=96, help="tokens per self-distilled answer")
    parser.add_argument("--max-input-len", type=int, default=192)
    parser.add_argument("--gen-batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="hidden states per optimiser step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--holdout", type=float, default=0.1, help="fraction of answers kept for accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="heads file (default speculative/heads/<model>.medusa...)")
    parser.add_argument("--plot", default="speculative/medusa_loss.png")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    model = lm.model
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    data = self_distillation_data(lm, args.num_prompts, args.gen_len, args.max_input_len, args.gen_batch_size)
    n_hold = max(1, int(len(data) * args.holdout))
    train_h, train_y = head_batches(data[n_hold:], args.num_heads)
    hold_h, hold_y = head_batches(data[:n_hold], args.num_heads)
    print(f"{len(train_h)} training positions, {len(hold_h)} held out ({time.perf_counter() - t0:.0f} s)")

    heads = MedusaHeads(model.config.hidden_size, args.num_heads).to(train_h.device)
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0)
    weights = torch.tensor([0.8 ** k for k in range(args.num_heads)], device=train_h.device)
    lm_head = model.lm_head.float() if model.lm_head.weight.dtype != torch.float32 else model.lm_head
    steps = args.epochs * ((len(train_h) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)
    losses = []
    bar = tqdm(total=steps, desc="training Medusa heads")
    for _epoch in range(args.epochs):
        order = torch.randperm(len(train_h), device=train_h.device)
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            logits = heads(train_h[idx], lm_head)  # [B, K, V]
            per_head = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), train_y[idx], ignore_index=-100, reduction="none").mean(0)
            loss = (per_head * weights).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    with torch.no_grad():
        pred = torch.cat([heads(hold_h[i:i + 256], lm_head).argmax(-1) for i in range(0, len(hold_h), 256)])
        valid = hold_y != -100
        acc = ((pred == hold_y) & valid).sum(0).float() / valid.sum(0).clamp(min=1)
    out = Path(args.out) if args.out else default_heads_path(lm.name)
    command = "python -m speculative.train_medusa " + shlex.join(argv if argv is not None else sys.argv[1:])
    save_heads(heads, model, lm.name, out, command)
    (out.parent / (out.name + ".command.txt")).write_text(
        f"{command}\n# {lm.label}; trained on ShareGPT training split, self-distillation; "
        f"held-out top-1 accuracy per head: {', '.join(f'{a:.3f}' for a in acc.tolist())}\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("weighted cross-entropy (sum over heads)")
    ax.set_title(f"Medusa heads, self-distillation: {lm.name}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\n{lm.label}: {args.num_heads} Medusa heads, {len(train_h)} positions x {args.epochs} epochs, "
          f"{time.perf_counter() - t0:.0f} s")
    print("held-out top-1 accuracy per head (token t+2, t+3, ...): " + ", ".join(f"{a:.3f}" for a in acc.tolist()))
    print(f"heads: {out} ({out.stat().st_size / 1e6:.1f} MB), loss curve: {args.plot}")


if __name__ == "__main__":
    main()
