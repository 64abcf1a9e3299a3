"""Train Medusa heads on the frozen model by self-distillation on the ShareGPT training split.

1. Take the first user turn of training-split conversations as chat prompts and let the model answer them greedily
   (static batches, sorted by prompt length): the labels are the model's own outputs, so the heads learn what this
   model will say (no teacher text needed).
2. Run each prompt + answer through the frozen model (batched) and keep the final hidden states of the answer.
3. Head k learns to predict the token k+1 places after each hidden state (cross-entropy, weighted 0.8^k).
A progress bar shows the loss; the loss curve goes to a PNG; the heads are saved in float16 with the model's
fingerprint and the exact command. Held-out answers (the first --holdout of the prompts, in file order) give each
head's top-1 and top-5 accuracy, printed and written to <heads>.train.json with the token counts and times.

    python -m speculative.train_medusa                                  # CPU: a few minutes
    python -m speculative.train_medusa --chained                        # Hydra-style heads (MedusaHeads)

A machine without the ShareGPT package (the offline GPU machine) reads prompts exported as token ids beforehand:

    python -m speculative.train_medusa --export-prompts .device-kit/medusa_prompts.json --num-prompts 4000
    python -m speculative.train_medusa --device cuda --dtype float32 \\
        --prompts-file .device-kit/medusa_prompts.json --num-prompts 4000 --gen-len 256 --gen-batch-size 256 \\
        --epochs 3 --batch-size 1024 --lr 1e-3 \\
        --out "$OUT/smollm2-135m.medusa.safetensors" --plot "$OUT/medusa_loss.png"     # one H100: about 2 minutes

float32 on the GPU: the heads file records the fingerprint of the weights it was trained on, and the tests and the
benchmarks load the model in float32 (bfloat16-rounded weights would give another fingerprint).
"""
from __future__ import annotations

import argparse
import copy
import json
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
from core.loading import find_model_dir, load_model, load_tokenizer
from core.model import Transformer
from speculative.medusa import MedusaHeads, default_heads_path, save_heads

PROMPTS_SOURCE = "ShareGPT training split, first user turn of each conversation"


def training_prompts(tokenizer, num_prompts: int, max_input_len: int) -> list[list[int]]:
    """Chat prompts (token ids, chat template applied) of at most max_input_len tokens, in file order."""
    prompts = []
    for conv in conversations("training"):
        # Some conversations open with the assistant's turn: take the first turn a user wrote.
        text = next((t for speaker, t in conv["turns"] if speaker in ("human", "user") and t.strip()), None)
        ids = chat_prompt(tokenizer, text) if text else []
        if 4 <= len(ids) <= max_input_len:
            prompts.append(ids)
            if len(prompts) == num_prompts:
                return prompts
    raise UserError(f"only {len(prompts)} training prompts fit --max-input-len {max_input_len}")


def export_prompts(path: Path, model_name: str, prompts: list[list[int]], max_input_len: int) -> None:
    """Token ids are only meaningful for one tokenizer: the file names the model they were made for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": model_name, "source": PROMPTS_SOURCE, "max_input_len": max_input_len, "prompts": prompts}
    path.write_text(json.dumps(record, separators=(",", ":")))


def read_prompts(path: str, model_name: str, num_prompts: int, vocab_size: int) -> list[list[int]]:
    """The first num_prompts prompts of a file written by --export-prompts, checked against the model."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read prompts from {path}: {e}") from None
    if record.get("model") != model_name:
        raise UserError(f"{path} holds token ids for {record.get('model')!r}, not for {model_name!r}")
    prompts = record["prompts"][:num_prompts]
    if len(prompts) < num_prompts:
        raise UserError(f"{path} has {len(prompts)} prompts, fewer than --num-prompts {num_prompts}")
    if max(max(p) for p in prompts) >= vocab_size:
        raise UserError(f"{path} has token ids outside the model's vocabulary of {vocab_size}")
    return prompts


def self_distillation_data(model: Transformer, prompts: list[list[int]], gen_len: int, batch_size: int,
                           cuda_graph: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(hidden [A, H], answer [A]) per prompt, in prompt order]: answer = the model's greedy continuation (at most
    gen_len tokens, EOS included), hidden[t] = final hidden state of the token before answer[t] (the last prompt
    token, then each answer token but the last), in the model's dtype, on its device."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths per batch: less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    answers: list[list[int]] = [[] for _ in prompts]
    for rows in tqdm(batches, desc="self-distillation answers"):
        out = generate(model, [prompts[r] for r in rows], SamplingParams(max_tokens=gen_len), cuda_graph=cuda_graph)
        for r, answer in zip(rows, out.tokens):
            answers[r] = answer
    data: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(prompts)  # type: ignore[list-item]
    for rows in tqdm(batches, desc="hidden states"):
        seqs = [prompts[r] + answers[r][:-1] for r in rows]
        # Right padding: positions start at 0 in every row and causal attention keeps the pad tokens at the end
        # out of every real token's hidden state.
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
        with torch.inference_mode():
            h = model.hidden_states(ids.to(device))
        for j, r in enumerate(rows):
            start = len(prompts[r]) - 1
            data[r] = (h[j, start:start + len(answers[r])].clone(), torch.tensor(answers[r], device=device))
    return data


def head_batches(data, num_heads: int):
    """Flatten to (hidden [N, H], next token [N], targets [N, K]) with -100 where the answer ends before the k-th
    token after the next one. The next token is what the target picks from the hidden state (token-conditioned
    heads read it)."""
    hs, nexts, ys = [], [], []
    for h, answer in data:
        n = len(answer)
        y = torch.full((n, num_heads), -100, dtype=torch.long, device=answer.device)
        for k in range(1, num_heads + 1):  # hidden t (its next token is answer[t]) -> head k predicts answer[t+k]
            y[: max(n - k, 0), k - 1] = answer[k:]
        hs.append(h[:n])
        nexts.append(answer)
        ys.append(y)
    return torch.cat(hs), torch.cat(nexts), torch.cat(ys)


def teacher_forced_logits(heads: MedusaHeads, lm_head: torch.nn.Module, embed: torch.Tensor, hidden: torch.Tensor,
                          nexts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The heads' logits [N, K, V] at recorded positions. Chained heads read the true path: tokens t+1 .. t+K are
    the next token and the targets of heads 1 .. K-1 (where the answer has ended, token 0 stands in: its head's
    target is -100 then, and so is every later one)."""
    if not heads.chained:
        return heads(hidden, lm_head, embed[nexts])
    path = torch.cat([nexts[:, None], targets[:, :-1].clamp(min=0)], dim=1)
    return heads(hidden, lm_head, path_embeddings=embed[path])


@torch.no_grad()
def head_accuracy(heads: MedusaHeads, lm_head: torch.nn.Linear, embed: torch.Tensor, hidden: torch.Tensor,
                  nexts: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per head, the fraction of positions whose target token is the head's best guess (top-1) or among its best
    five (top-5: the candidate tree draws on a head's top few)."""
    top1 = torch.zeros(targets.shape[1], device=targets.device)
    top5 = torch.zeros_like(top1)
    for i in range(0, len(hidden), chunk):
        y = targets[i:i + chunk]
        best = teacher_forced_logits(heads, lm_head, embed, hidden[i:i + chunk].float(), nexts[i:i + chunk],
                                     y).topk(5, dim=-1).indices
        top1 += (best[..., 0] == y).sum(0)
        top5 += (best == y[..., None]).any(-1).sum(0)
    valid = (targets != -100).sum(0).clamp(min=1)
    return (top1 / valid).tolist(), (top5 / valid).tolist()


def seconds_since(t0: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
    return time.perf_counter() - t0


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--token-conditioned", action="store_true",
                        help="heads also read the embedding of the next token (see MedusaHeads)")
    parser.add_argument("--chained", action="store_true",
                        help="Hydra-style heads: head k reads head k-1's state and the token before its guess")
    parser.add_argument("--num-prompts", type=int, default=48, help="training-split prompts to answer")
    parser.add_argument("--prompts-file", default=None,
                        help="token-id prompts written by --export-prompts (default: ShareGPT via core.data)")
    parser.add_argument("--export-prompts", default=None, metavar="PATH",
                        help="write --num-prompts training prompts as token ids to PATH and exit")
    parser.add_argument("--gen-len", type=int, default=96, help="tokens per self-distilled answer")
    parser.add_argument("--max-input-len", type=int, default=192)
    parser.add_argument("--gen-batch-size", type=int, default=8, help="prompts per static generation batch")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for generation on a GPU")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="hidden states per optimiser step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warm-up, then cosine decay)")
    parser.add_argument("--holdout", type=float, default=0.1, help="fraction of answers kept for accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="heads file (default speculative/heads/<model>.medusa...)")
    parser.add_argument("--plot", default="speculative/medusa_loss.png")
    args = parser.parse_args(argv)
    if args.export_prompts:
        prompts = training_prompts(load_tokenizer(find_model_dir(args.model)), args.num_prompts, args.max_input_len)
        path = Path(args.export_prompts)
        export_prompts(path, args.model, prompts, args.max_input_len)
        print(f"{len(prompts)} prompts ({PROMPTS_SOURCE}, at most {args.max_input_len} tokens, "
              f"{sum(map(len, prompts))} tokens in all) -> {path} ({path.stat().st_size / 1e6:.2f} MB)")
        return

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    model = lm.model
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    if args.prompts_file:
        prompts = read_prompts(args.prompts_file, lm.name, args.num_prompts, model.config.vocab_size)
    else:
        prompts = training_prompts(lm.tokenizer, args.num_prompts, args.max_input_len)
    t_data = time.perf_counter()
    cuda_graph = device.type == "cuda" and not args.enforce_eager
    data = self_distillation_data(model, prompts, args.gen_len, args.gen_batch_size, cuda_graph)
    n_hold = max(1, int(len(data) * args.holdout))
    train_h, train_next, train_y = head_batches(data[n_hold:], args.num_heads)
    hold_h, hold_next, hold_y = head_batches(data[:n_hold], args.num_heads)
    del data
    data_s = seconds_since(t_data, device)
    print(f"{len(train_h)} training positions, {len(hold_h)} held out ({data_s:.0f} s)")

    t_train = time.perf_counter()
    heads = MedusaHeads(model.config.hidden_size, args.num_heads, args.token_conditioned, args.chained).to(device)
    # Float32 copies of the frozen LM head and embeddings, so the model itself is left as it is (its LM head shares
    # its weight with the embeddings).
    lm_head = copy.deepcopy(model.lm_head).float()
    embed = model.embed_tokens.weight.detach().float()
    # On a GPU the matmuls run in bfloat16 (the LM head over 49k tokens is nearly all the work); the heads'
    # weights, the optimiser and the loss stay float32.
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0)
    weights = torch.tensor([0.8 ** k for k in range(args.num_heads)], device=device)
    steps = args.epochs * ((len(train_h) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)
    losses = []
    bar = tqdm(total=steps, desc="training Medusa heads")
    for _epoch in range(args.epochs):
        order = torch.randperm(len(train_h), device=device)
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            y = train_y[idx]
            with autocast:
                logits = teacher_forced_logits(heads, lm_head, embed, train_h[idx].float(), train_next[idx],
                                               y)  # [B, K, V]
            ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-100,
                                                   reduction="none")  # [B, K], 0 where there is no target
            per_head = ce.sum(0) / (y != -100).sum(0).clamp(min=1)
            loss = (per_head * weights).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
            bar.update()
            if len(losses) % 20 == 1:  # reading the loss waits for the GPU: not every step
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    losses = torch.stack(losses).tolist()
    train_s = seconds_since(t_train, device)
    top1, top5 = head_accuracy(heads, lm_head, embed, hold_h, hold_next, hold_y)

    out = Path(args.out) if args.out else default_heads_path(lm.name, heads.kind)
    command = "python -m speculative.train_medusa " + shlex.join(argv if argv is not None else sys.argv[1:])
    source = PROMPTS_SOURCE + (f" (token ids from {args.prompts_file})" if args.prompts_file else "")
    save_heads(heads, model, lm.name, out, command)
    (out.parent / (out.name + ".command.txt")).write_text(
        f"{command}\n# {lm.label}; {source}; self-distillation; "
        f"held-out top-1 accuracy per head: {', '.join(f'{a:.3f}' for a in top1)}\n")
    record_path = out.parent / (out.name + ".train.json")
    record = {
        "model": lm.label, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "command": command, "prompts": source, "date": time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime()),
        "num_heads": args.num_heads, "token_conditioned": heads.token_conditioned, "chained": heads.chained,
        "num_prompts": len(prompts),
        "gen_len": args.gen_len,
        "num_train_answers": len(prompts) - n_hold, "num_heldout_answers": n_hold,
        "num_train_tokens": len(train_h), "num_heldout_tokens": len(hold_h),
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "steps": steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_top1_accuracy_per_head": top1, "heldout_top5_accuracy_per_head": top5,
        "data_s": data_s, "train_s": train_s, "total_s": time.perf_counter() - t0}
    record_path.write_text(json.dumps(record, indent=2) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("weighted cross-entropy (sum over heads)")
    ax.set_title(f"Medusa heads, self-distillation: {lm.name}")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"\n{lm.label}: {args.num_heads} Medusa heads, {len(prompts) - n_hold} answers = {len(train_h)} positions "
          f"x {args.epochs} epochs; data {data_s:.0f} s, training {train_s:.0f} s, total {record['total_s']:.0f} s")
    print(f"held-out ({n_hold} answers, {len(hold_h)} positions) accuracy per head (token t+2, t+3, ...):")
    print("  top-1: " + ", ".join(f"{a:.3f}" for a in top1))
    print("  top-5: " + ", ".join(f"{a:.3f}" for a in top5))
    print(f"heads: {out} ({out.stat().st_size / 1e6:.1f} MB), record: {record_path}, loss curve: {args.plot}")


if __name__ == "__main__":
    main()
