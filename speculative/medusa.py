"""Medusa (Cai et al. 2024): extra decoding heads on the frozen model guess tokens 2, 3, ... ahead; a tree of their
top candidates is verified in one forward pass with a tree attention mask; typical acceptance (Medusa-1) or greedy.

Head k maps the last hidden state h to h + SiLU(W_k h) (a residual block, W_k zero-initialised so an untrained
head starts as the base LM head) and then through the model's own frozen LM head. Sharing the LM head keeps each
head at hidden^2 parameters (0.3 M for SmolLM2-135M) instead of hidden x vocab; the paper trains a copy per head.
The heads file records the model it was trained for and refuses any other. Token-conditioned heads (train with
--token-conditioned) also read the embedding of the token the target has just chosen: a step towards Hydra's
sequentially dependent heads that keeps Medusa's tree and single verification pass; chained heads (--chained) are
Hydra's heads in the same residual form. A tree is fixed (hand-made, or fitted by medusa_tree.py) or dynamic
(DynamicTree: the likeliest paths under the heads' probabilities, chosen anew each step); either can carry one more
branch, prompt lookup's continuation (LookupBranch, --lookup K), which catches the runs of repeated text that the
heads rarely guess past their first token. On a CPU the heads score only the 16,384 most frequent tokens
(draft_vocab.py): their product with the full 49k-row LM head cost about a tenth of a step.

    python -m speculative.train_medusa                      # writes speculative/heads/smollm2-135m.medusa.safetensors
    python -m speculative.train_medusa --token-conditioned  # ... smollm2-135m.medusa-token.safetensors.xz
    python -m speculative.medusa --prompt "Give me three tips for a job interview."
    python -m speculative.medusa --lookup 3                  # plus a prompt lookup branch of 3 tokens
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import lzma
from pathlib import Path

import torch
from torch import nn

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.generate import SamplingParams, chat_prompt, probabilities
from core.kv_cache import attention
from core.model import Transformer
from speculative.common import (RollbackKVCache, SpecResult, SpecStats, check_prompt, finish, load_target, pick,
                                speculative_generate, stop_ids)
from speculative.draft_vocab import DraftVocab, default_size, load_draft_vocab
from speculative.prompt_lookup import PromptLookupProposer

HEADS_DIR = Path(__file__).parent / "heads"

# Candidate trees as paths of top-i choices per depth (Medusa's `medusa_choices`): (0, 1) is head 1's best token
# followed by head 2's second best. Parents come before children. Each tree starts with the chain of best guesses,
# the path accepted most often: its tokens then already sit in consecutive cache slots and need no moving.
TREES = {
    "chain": [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)],
    "small": [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (1,), (2,), (0, 1), (1, 0), (0, 0, 1)],
    "default": [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (1,), (2,), (3,), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
                (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0)],
}


class MedusaHeads(nn.Module):
    """K residual blocks; `forward(h [..., H], lm_head, next_embedding, path_embeddings) -> logits [..., K, V]` for
    t+2 .. t+K+1.

    token_conditioned: each block also reads the embedding of token t+1, which is known when the heads run (the
    target has just chosen it from h): head k then guesses t+k+1 knowing the token before the first guess, as
    Hydra's heads do for their first step. Same tree, same verification; only the heads' input grows to 2H.

    chained (Hydra's sequentially dependent heads, Ankner et al. 2024, in the same residual form): head k reads the
    state head k-1 produced and the embedding of the token at t+k, z_k = z_{k-1} + SiLU(W_k [z_{k-1}, e(x_{t+k})]),
    z_0 = h, so every guess knows the whole path before it. Training feeds the true path (`path_embeddings`
    [..., K, H]: the embeddings of tokens t+1 .. t+K); building a tree feeds each node's parent (Tree.tokens_chained),
    one head per depth.
    """

    def __init__(self, hidden_size: int, num_heads: int, token_conditioned: bool = False, chained: bool = False):
        super().__init__()
        self.token_conditioned, self.chained = token_conditioned or chained, chained
        width = 2 * hidden_size if self.token_conditioned else hidden_size
        self.blocks = nn.ModuleList(nn.Linear(width, hidden_size) for _ in range(num_heads))
        for block in self.blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    @property
    def kind(self) -> str:
        """"chained", "token" (token-conditioned) or "plain": the keys of HEADS_SUFFIX."""
        return "chained" if self.chained else "token" if self.token_conditioned else "plain"

    def step(self, k: int, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Chained head k (0-based): the state after one more token of the path."""
        return z + nn.functional.silu(self.blocks[k](torch.cat([z, embedding], dim=-1)))

    def forward(self, h: torch.Tensor, lm_head: nn.Module, next_embedding: torch.Tensor | None = None,
                path_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        if self.chained:
            z, states = h, []
            for k in range(len(self.blocks)):
                z = self.step(k, z, path_embeddings[..., k, :])
                states.append(z)
            return lm_head(torch.stack(states, dim=-2))
        x = torch.cat([h, next_embedding], dim=-1) if self.token_conditioned else h
        z = torch.stack([h + nn.functional.silu(block(x)) for block in self.blocks], dim=-2)
        return lm_head(z)  # one matmul for all heads: the LM head weight is read once


def model_fingerprint(model: Transformer) -> str:
    """Identifies the weights heads were trained on: config plus a hash of the final norm and LM head rows."""
    cfg = model.config
    h = hashlib.sha256(f"{cfg.hidden_size}/{cfg.vocab_size}/{cfg.num_layers}".encode())
    h.update(model.norm.weight.detach().float().cpu().numpy().tobytes())
    h.update(model.lm_head.weight[:256].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_heads(heads: MedusaHeads, model: Transformer, model_name: str, path: Path, command: str) -> None:
    """A safetensors file in float16 with the model's fingerprint; xz-compressed if `path` ends in .xz (the
    token-conditioned heads of SmolLM2 are 5.3 MB raw, 4.8 MB compressed: under the repository's 5 MB limit)."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in heads.state_dict().items()}
    data = save(tensors, metadata={"model": model_name, "fingerprint": model_fingerprint(model),
                                   "num_heads": str(len(heads.blocks)), "command": command,
                                   "token_conditioned": str(int(heads.token_conditioned)),
                                   "chained": str(int(heads.chained))})
    path.write_bytes(lzma.compress(data, preset=9) if path.suffix == ".xz" else data)


def load_heads(path: str | Path, model: Transformer) -> MedusaHeads:
    """Load heads for `model` (.safetensors or .safetensors.xz); a UserError if they were trained for other weights."""
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise UserError(f"no Medusa heads at {path}: train them with python -m speculative.train_medusa")
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    tensors = load(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # safetensors: length, then JSON header
    meta = header.get("__metadata__", {})
    if meta.get("fingerprint") != model_fingerprint(model):
        raise UserError(f"Medusa heads {path} were trained for {meta.get('model', 'another model')} "
                        f"(fingerprint {meta.get('fingerprint')}), not for these weights")
    p = next(model.parameters())
    heads = MedusaHeads(model.config.hidden_size, int(meta["num_heads"]), meta.get("token_conditioned") == "1",
                        meta.get("chained") == "1")
    heads.load_state_dict(tensors)
    return heads.to(device=p.device, dtype=p.dtype)


def tree_choices(name: str, heads_path: str | Path) -> list[tuple[int, ...]] | DynamicTree:
    """A hand-made tree of TREES by name, "fitted" / "fitted:N": the tree medusa_tree.py chose for these heads
    (of N nodes), or "dynamic:N": a DynamicTree of N nodes."""
    kind, _, size = name.partition(":")
    if kind in ("fitted", "dynamic") and size and not size.isdigit():
        raise UserError(f"bad tree {name!r}: {kind}:N wants a number of nodes")
    if kind == "fitted":
        from speculative.medusa_tree import load_fitted_tree
        return load_fitted_tree(heads_path, int(size) if size else None)
    if kind == "dynamic":
        if not size:
            raise UserError(f"bad tree {name!r}: say how many nodes, dynamic:N")
        return DynamicTree(int(size))
    if name not in TREES:
        raise UserError(f"unknown tree {name!r}: choose from {', '.join(TREES)}, fitted, fitted:N, dynamic:N")
    return TREES[name]


HEADS_SUFFIX = {"chained": ".medusa-chained.safetensors.xz", "token": ".medusa-token.safetensors.xz",
                "plain": ".medusa.safetensors"}  # the committed kinds, strongest first


def default_heads_path(model_name: str, kind: str = "plain") -> Path:
    return HEADS_DIR / (Path(model_name).name + HEADS_SUFFIX[kind])


def committed_heads(model_name: str) -> list[Path]:
    """The heads files committed for a model, the strongest first."""
    return [p for p in (default_heads_path(model_name, kind) for kind in HEADS_SUFFIX) if p.exists()]


class TreeKVCache(RollbackKVCache):
    """Batch 1. While a tree is set (`set_tree`), its T tokens see the whole cached prefix and their tree ancestors.

    The mask [T, prefix + T] is built once per pass, not once per layer: every layer sees the same prefix."""

    tree_mask: torch.Tensor | None = None

    def set_tree(self, tree_mask: torch.Tensor | None) -> None:
        if tree_mask is not None:  # the prefix holds only real tokens: keep() and truncate() leave no holes
            prefix = torch.ones(len(tree_mask), self.lengths[0], dtype=torch.bool, device=tree_mask.device)
            tree_mask = torch.cat([prefix, tree_mask], dim=-1)
        self.tree_mask = tree_mask

    def attend(self, layer, q, k, v, positions):
        if self.tree_mask is None:
            return super().attend(layer, q, k, v, positions)
        keys, values, _ = self.update(layer, k, v, positions)
        return attention(q, keys, values, self.tree_mask)

    def keep_path(self, start: int, slots: list[int]) -> None:
        """keep() for a path given on the host: a path already in consecutive slots from `start` moves nothing."""
        if slots == list(range(start, start + len(slots))):
            self.truncate(start + len(slots))
        else:
            self.keep(start, torch.tensor(slots, device=self.key_pos.device))


class TreeShape:
    """What verification needs of a tree, from each node's parent (node 0 is the root, the pending token; parents
    come before children): parent, depth, the attention mask (a node sees its ancestors and itself) and each node's
    path from the root (its ancestors after the root, itself last)."""

    def __init__(self, parents: list[int], device):
        paths = [[]]
        for node, parent in enumerate(parents[1:], start=1):
            paths.append(paths[parent] + [node])
        mask = torch.eye(len(parents), dtype=torch.bool)
        for node, path in enumerate(paths):
            mask[node, [0] + path] = True
        self.parents = parents
        self.parent = torch.tensor(parents, device=device)
        self.depth = torch.tensor([len(p) for p in paths], device=device)
        self.mask = mask.to(device)
        self.ancestors = paths
        self.max_depth = max(map(len, paths))


class Tree(TreeShape):
    """A candidate tree of the heads' guesses: node 0 is the root, nodes 1.. follow `choices` (rank paths)."""

    def __init__(self, choices: list[tuple[int, ...]], num_heads: int, device):
        if any(len(c) > num_heads for c in choices):
            raise UserError(f"the candidate tree is {max(map(len, choices))} deep but there are {num_heads} heads")
        index = {(): 0} | {c: i + 1 for i, c in enumerate(choices)}
        if any(c[:-1] not in index for c in choices):
            raise UserError("every tree path needs its parent path listed before it")
        super().__init__([0] + [index[c[:-1]] for c in choices], device)
        self.rank = torch.tensor([0] + [c[-1] for c in choices], device=device)  # top-i of its head
        self.topk = max(c[-1] for c in choices) + 1
        # For chained heads, per depth d: the nodes at depth d-1 with children; the children at depth d, each with
        # its parent's row among those and its rank; the most ranks any parent needs.
        self.levels = []
        for d in range(1, self.max_depth + 1):
            kids = [c for c in choices if len(c) == d]
            parents = sorted({index[c[:-1]] for c in kids})
            row = {p: i for i, p in enumerate(parents)}
            self.levels.append((*(torch.tensor(v, device=device) for v in (
                parents, [index[c] for c in kids], [row[index[c[:-1]]] for c in kids], [c[-1] for c in kids])),
                max(c[-1] for c in kids) + 1))

    def tokens(self, root: int, head_logits: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Node tokens [n]: the root, then the rank-th best token of head depth-1 for each node. vocab_ids: the
        token of each logit column when the heads scored a reduced vocabulary (draft_vocab.py)."""
        top = head_logits.topk(self.topk, dim=-1).indices  # [K, topk]
        if vocab_ids is not None:
            top = vocab_ids[top]
        toks = top[(self.depth - 1).clamp(min=0), self.rank]
        toks[0] = root
        return toks

    def tokens_chained(self, root: int, h: torch.Tensor, heads: MedusaHeads, lm_head: nn.Module,
                       embed: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Node tokens [n] from chained heads: depth by depth, head d reads each parent's state and token."""
        toks = torch.empty(len(self.depth), dtype=torch.long, device=h.device)
        toks[0] = root
        states = h.new_empty(len(self.depth), h.shape[-1])
        states[0] = h
        for d, (parents, kids, rows, ranks, topk) in enumerate(self.levels):
            z = heads.step(d, states[parents], embed[toks[parents]])  # [P, H]
            top = lm_head(z).topk(topk, dim=-1).indices
            if vocab_ids is not None:
                top = vocab_ids[top]
            toks[kids] = top[rows, ranks]
            states[kids] = z[rows]
        return toks


class LookupBranch:
    """Prompt lookup's continuation (prompt_lookup.py) as one more branch of each step's tree: the k tokens that
    followed the latest earlier match of the context's last n-gram, merged into the heads' tree as into a trie (it
    follows the nodes whose tokens match and grows new ones where it leaves them). The heads guess what is likely;
    the branch catches what the text is repeating, which heads rarely guess past their first token."""

    def __init__(self, k: int):
        self.k, self.propose = k, PromptLookupProposer()
        self.shapes: dict[tuple[int, ...], TreeShape] = {}

    def graft(self, tree: TreeShape, ids: torch.Tensor, context: list[int]) -> tuple[TreeShape, torch.Tensor]:
        """The tree and node tokens with the branch merged in (unchanged when the heads' tree already holds it)."""
        chain, _ = self.propose(context, self.k)
        parents, tokens, node = list(tree.parents), ids.tolist(), 0
        for token in chain:
            child = next((i for i in range(1, len(tokens)) if parents[i] == node and tokens[i] == token), None)
            if child is None:
                parents.append(node)
                tokens.append(token)
                child = len(tokens) - 1
            node = child
        if len(tokens) == len(ids):
            return tree, ids
        key = tuple(parents)
        if key not in self.shapes:
            self.shapes[key] = TreeShape(parents, ids.device)
        return self.shapes[key], torch.tensor(tokens, device=ids.device)


class DynamicTree:
    """EAGLE-2's dynamic tree (Li et al. 2024) for heads that guess independently (plain or token-conditioned): each
    step, the `size` rank paths whose product of the heads' probabilities is highest, instead of the same paths
    every step. A fitted tree spends its nodes where the heads were right on average; this one spends them where
    they are sure now: a deep chain when every head is confident, several first guesses when head 1 is not. Since
    a child's product never exceeds its parent's, the best paths always form a tree (parents first)."""

    def __init__(self, size: int, top: int = 10):
        if size < 1:
            raise UserError(f"a dynamic tree needs at least one node, not {size}")
        self.size, self.top = size, top  # top: the guesses of each head a path may take
        self.trees: dict[tuple, Tree] = {}  # shapes recur: their index tensors are built once

    def __len__(self) -> int:
        return self.size

    def choose(self, probs: list[list[float]]) -> list[tuple[int, ...]]:
        """The best `size` rank paths, given each head's probabilities of its top guesses, best first."""
        frontier = [(-p, (r,)) for r, p in enumerate(probs[0])]
        heapq.heapify(frontier)
        paths = []
        while len(paths) < self.size and frontier:
            score, path = heapq.heappop(frontier)  # ties: the shorter path (a parent) first
            paths.append(path)
            if len(path) < len(probs):
                for r, p in enumerate(probs[len(path)]):
                    heapq.heappush(frontier, (score * p, path + (r,)))
        return paths

    def tree(self, head_logits: torch.Tensor) -> Tree:
        """This step's tree from the heads' logits [K, V]."""
        probs = head_logits.float().softmax(-1).topk(self.top, dim=-1).values
        choices = tuple(self.choose(probs.tolist()))
        if choices not in self.trees:
            self.trees[choices] = Tree(list(choices), len(head_logits), head_logits.device)
        return self.trees[choices]


def accepts(tokens: torch.Tensor, parent_logits: torch.Tensor, params: SamplingParams,
            posterior_threshold: float, posterior_alpha: float) -> torch.Tensor:
    """Per node: would the target keep this token after its parent? Greedy: it is the argmax. Otherwise Medusa-1's
    typical acceptance: p(token) > min(threshold, alpha * exp(-entropy(p)))."""
    if params.temperature <= 0:
        return tokens == parent_logits.argmax(-1)
    p = probabilities(parent_logits, params)
    entropy = -(p * p.clamp(min=1e-10).log()).sum(-1)
    limit = torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy))
    return p.gather(-1, tokens[:, None])[:, 0] > limit


@torch.inference_mode()
def run_medusa(model: Transformer, heads: MedusaHeads, prompt: list[int], params: SamplingParams,
               choices: list[tuple[int, ...]] | DynamicTree = TREES["default"], posterior_threshold: float = 0.09,
               posterior_alpha: float = 0.3, vocab: DraftVocab | None = None, lookup_k: int = 0) -> SpecResult:
    """Medusa decoding of one prompt (batch 1). Greedy: the output equals plain greedy decoding.
    choices: a fixed tree, or a DynamicTree chosen anew each step from the heads' probabilities.
    vocab: the heads score only these tokens (a reduced draft vocabulary); verification still sees all.
    lookup_k: also verify prompt lookup's k-token continuation, as one more branch (LookupBranch)."""
    import time

    device = next(model.parameters()).device
    dynamic = choices if isinstance(choices, DynamicTree) else None
    if dynamic and heads.chained:
        raise UserError("a dynamic tree needs heads that guess independently (plain or token-conditioned); "
                        "chained heads take a fixed tree")
    tree = None if dynamic else Tree(choices, len(heads.blocks), device)
    if lookup_k < 0:
        raise UserError(f"a lookup branch of {lookup_k} tokens: give 0 (none) or more")
    lookup = LookupBranch(lookup_k) if lookup_k else None
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    cache = TreeKVCache.for_model(model, 1, check_prompt(model, prompt, params, len(choices) + 1 + lookup_k))
    stop, stats, new = stop_ids(model, params), SpecStats(), []
    heads_lm_head, vocab_ids = (vocab.lm_head, vocab.ids) if vocab else (model.lm_head, None)

    t0 = time.perf_counter()
    h = model.hidden_states(torch.tensor([prompt], device=device), cache=cache)[0, -1]
    done = finish(new, [pick(model.lm_head(h).float(), params, gen)], stop, params.max_tokens)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    while not done:
        cached = len(prompt) + len(new) - 1
        # new[-1] is the pending token (the root): chosen from h, not yet in the cache.
        if heads.chained:
            ids = tree.tokens_chained(new[-1], h, heads, heads_lm_head, model.embed_tokens.weight, vocab_ids)
        else:
            emb = model.embed_tokens.weight[new[-1]] if heads.token_conditioned else None
            head_logits = heads(h, heads_lm_head, emb)
            tree = dynamic.tree(head_logits) if dynamic else tree
            ids = tree.tokens(new[-1], head_logits, vocab_ids)
        shape, ids = lookup.graft(tree, ids, prompt + new) if lookup else (tree, ids)
        cache.set_tree(shape.mask)
        hs = model.hidden_states(ids[None], (cached + shape.depth)[None], cache)[0]
        cache.set_tree(None)
        logits = model.lm_head(hs).float()  # [n, V]
        ok = accepts(ids, logits[shape.parent], params, posterior_threshold, posterior_alpha)
        ok[0] = True
        path_ok = ~(shape.mask & ~ok).any(-1)  # a node counts only if it and all its ancestors are accepted
        # Deepest accepted node. Greedy has at most one per depth; sampling breaks ties by the target's preference.
        score = shape.depth.to(logits.dtype)
        if params.temperature > 0:
            score = score * 1e4 + logits[shape.parent].log_softmax(-1).gather(-1, ids[:, None])[:, 0]
        best = int(torch.where(path_ok, score, torch.full_like(score, -1e9)).argmax())
        path = shape.ancestors[best]
        cache.keep_path(cached + 1, [cached + node for node in path])
        stats.record(shape.max_depth, len(path))
        done = finish(new, ids[path].tolist() + [pick(logits[best], params, gen)], stop, params.max_tokens)
        h = hs[best]
    return SpecResult(new, ttft, time.perf_counter() - t0, stats)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--heads", default=None,
                        help="heads file (default: the committed ones, speculative/heads/<model>.medusa-token...)")
    parser.add_argument("--tree", default=None,
                        help=f"candidate tree: {', '.join(TREES)}, fitted[:N] (medusa_tree.py's, N nodes) or dynamic:N "
                             "(the N likeliest paths each step); default fitted on a GPU, dynamic:5 on a CPU (fitted:4 "
                             "for chained heads), where each token a pass verifies costs more")
    parser.add_argument("--draft-vocab", type=int, default=None,
                        help="the heads score only the N most frequent tokens (draft_vocab.py; 0: all). Default "
                             "16384 on a CPU (where the model has a ranking), all on a GPU")
    parser.add_argument("--lookup", type=int, default=0,
                        help="also verify prompt lookup's continuation of this many tokens as one more tree branch")
    parser.add_argument("--prompt", default="Give me three tips for a successful job interview.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    lm = load_target(args)
    found = committed_heads(lm.name)
    heads_path = args.heads or (found[0] if found else default_heads_path(lm.name))
    on_gpu = next(lm.model.parameters()).is_cuda
    heads = load_heads(heads_path, lm.model)
    tree = args.tree or ("fitted" if on_gpu else "fitted:4" if heads.chained else "dynamic:5")
    choices = tree_choices(tree, heads_path)
    vocab_size = args.draft_vocab if args.draft_vocab is not None else default_size(lm.name, on_gpu)
    vocab = load_draft_vocab(lm.name, lm.model.lm_head, vocab_size)
    prompt = chat_prompt(lm.tokenizer, args.prompt)
    params = SamplingParams(args.max_tokens, args.temperature, seed=args.seed)
    plain = speculative_generate(lm.model, prompt, params)
    spec = run_medusa(lm.model, heads, prompt, params, choices, vocab=vocab, lookup_k=args.lookup)
    print(lm.tokenizer.decode(spec.tokens))
    s = spec.stats
    print(f"\n{lm.label}; Medusa {len(heads.blocks)} heads, tree {tree!r} ({len(choices)} nodes), heads scoring "
          f"{len(vocab) if vocab else lm.model.config.vocab_size} tokens"
          + (f", plus a prompt lookup branch of {args.lookup}" if args.lookup else ""))
    print(f"plain {plain.decode_tokens_per_s:.1f} tokens/s, Medusa {spec.decode_tokens_per_s:.1f} tokens/s, "
          f"{s.mean_accepted_per_step:.2f} tokens per target pass, acceptance per depth "
          + " ".join(f"{a:.2f}" for a in s.acceptance_rate_per_pos))
    if args.temperature <= 0:
        print(f"identical to plain greedy: {spec.tokens == plain.tokens}")


if __name__ == "__main__":
    main()
