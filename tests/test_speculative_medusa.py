"""Medusa: tree attention equals running each path alone; greedy output equals plain greedy; heads match the model."""
import pytest
import torch

from core.errors import UserError
from core.generate import SamplingParams, chat_prompt, generate
from speculative.common import speculative_generate
from speculative.draft_vocab import DraftVocab, load_draft_vocab
from speculative.medusa import (TREES, DynamicTree, LookupBranch, MedusaHeads, Tree, TreeKVCache, committed_heads,
                                load_heads, run_medusa, save_heads, tree_choices)
from speculative.medusa_tree import best_tree, dynamic_expected_tokens, expected_tokens, path_counts


def _random_heads(model, num_heads=4, seed=0, token_conditioned=False, chained=False):
    torch.manual_seed(seed)
    heads = MedusaHeads(model.config.hidden_size, num_heads, token_conditioned, chained)
    for block in heads.blocks:
        torch.nn.init.normal_(block.weight, std=0.5)
    return heads


def test_tree_attention_equals_each_path_alone(tiny):
    m = tiny.model
    prefix, tree = [1, 5, 9, 13], Tree(TREES["small"], 4, "cpu")
    ids = torch.tensor([7] + [100 + i for i in range(len(TREES["small"]))])
    with torch.inference_mode():
        cache = TreeKVCache.for_model(m, 1, 64)
        m(torch.tensor([prefix]), cache=cache)
        cache.set_tree(tree.mask)
        tree_h = m.hidden_states(ids[None], (len(prefix) + tree.depth)[None], cache)[0]
        for node, path in enumerate(tree.ancestors):
            chain = [prefix + [7] + ids[path].tolist()]
            alone = m.hidden_states(torch.tensor(chain))[0, -1]
            assert torch.allclose(tree_h[node], alone, atol=1e-5), node


def test_greedy_identical_tiny_random_heads(tiny):
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    prompt = [1, 7, 8, 9, 7, 8]
    plain = speculative_generate(tiny.model, prompt, p).tokens
    for tree in TREES:
        assert run_medusa(tiny.model, _random_heads(tiny.model), prompt, p, TREES[tree]).tokens == plain, tree
    conditioned = _random_heads(tiny.model, token_conditioned=True)
    assert run_medusa(tiny.model, conditioned, prompt, p).tokens == plain
    chained = _random_heads(tiny.model, chained=True)
    for tree in TREES:
        assert run_medusa(tiny.model, chained, prompt, p, TREES[tree]).tokens == plain, tree


def test_dynamic_tree_is_the_most_probable_paths():
    """Against brute force over every rank path: the chosen paths are the `size` best products of the heads'
    probabilities, listed parents first."""
    import itertools
    torch.manual_seed(0)
    for _ in range(20):
        probs = torch.rand(3, 4).softmax(-1).sort(descending=True).values.tolist()  # 3 heads, top 4 guesses each
        paths = [c for d in range(1, 4) for c in itertools.product(range(4), repeat=d)]
        score = {c: float(torch.tensor([probs[k][r] for k, r in enumerate(c)]).prod()) for c in paths}
        for size in (1, 4, 7, 20):
            chosen = DynamicTree(size).choose(probs)
            assert len(chosen) == size
            assert sorted(score[c] for c in chosen) == pytest.approx(sorted(score.values())[-size:])
            assert all(c[:-1] in chosen[:i] for i, c in enumerate(chosen) if len(c) > 1)
    assert DynamicTree(4).choose([[0.9, 0.1], [0.9, 0.1]]) == [(0,), (0, 0), (1,), (0, 1)]


def test_dynamic_tree_replay_counts_the_deepest_accepted_path():
    """medusa_tree's replay of dynamic trees: per position, the deepest of the first n likeliest paths that the
    true ranks follow."""
    ranks = torch.tensor([[0, 0], [1, 0], [0, -1], [-1, 0]])
    probs = torch.tensor([[[0.9, 0.1], [0.9, 0.1]]] * 3 + [[[0.6, 0.4], [0.5, 0.5]]])
    # likeliest paths: (0,) (0, 0) (1,) then (0, 1) before (1, 0), except the last position: (0,) (1,) (0, 0) ...
    assert dynamic_expected_tokens(ranks, probs, [1, 2, 3, 5]) == {
        1: 1 + (1 + 0 + 1 + 0) / 4, 2: 1 + (2 + 0 + 1 + 0) / 4, 3: 1 + (2 + 1 + 1 + 0) / 4, 5: 1 + (2 + 2 + 1 + 0) / 4}


def test_greedy_identical_with_dynamic_trees(tiny):
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    prompt = [1, 7, 8, 9, 7, 8]
    plain = speculative_generate(tiny.model, prompt, p).tokens
    for heads in (_random_heads(tiny.model), _random_heads(tiny.model, token_conditioned=True)):
        for size in (1, 5, 12):
            assert run_medusa(tiny.model, heads, prompt, p, DynamicTree(size)).tokens == plain, size
    with pytest.raises(UserError, match="chained heads take a fixed tree"):
        run_medusa(tiny.model, _random_heads(tiny.model, chained=True), prompt, p, DynamicTree(4))


def test_lookup_branch_merges_into_the_tree_as_a_trie():
    """The lookup chain follows the heads' nodes while their tokens match and grows new nodes from where it leaves
    them; a chain the tree already holds changes nothing."""
    tree = Tree([(0,), (0, 0), (1,)], 2, "cpu")
    ids = torch.tensor([9, 20, 21, 30])  # root 9; (0,) = 20, (0, 0) = 21, (1,) = 30
    context = [5, 20, 40, 41, 9]  # ... 20 40 41 earlier, then the root 9: no match of "9"; of nothing shorter
    branch = LookupBranch(3)
    shape, toks = branch.graft(tree, ids, context)
    assert shape is tree and toks is ids  # no earlier occurrence of the last token: no chain
    context = [9, 20, 40, 41, 5, 9]  # the root 9 followed 20 40 41 before
    shape, toks = branch.graft(tree, ids, context)
    assert toks.tolist() == [9, 20, 21, 30, 40, 41]  # 20 is node (0,): 40 hangs under it, 41 under 40
    assert shape.parents == [0, 0, 1, 0, 1, 4]
    assert shape.ancestors[5] == [1, 4, 5] and shape.depth.tolist() == [0, 1, 2, 1, 2, 3]
    assert shape.mask[5].tolist() == [True, True, False, False, True, True]
    shape, toks = LookupBranch(2).graft(tree, ids, [9, 20, 21, 5, 9])
    assert shape is tree and toks is ids  # 20 21: already the chain of best guesses


def test_greedy_identical_with_lookup_branch(tiny):
    """A prompt that repeats itself, so the branch proposes: every tree and branch length still equals plain."""
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    prompt = [1, 7, 8, 9, 7, 8, 9, 10, 7, 8]
    plain = speculative_generate(tiny.model, prompt, p).tokens
    token_heads = _random_heads(tiny.model, token_conditioned=True)
    for heads, tree in ((_random_heads(tiny.model), TREES["small"]), (token_heads, DynamicTree(5)),
                        (_random_heads(tiny.model, chained=True), TREES["chain"])):
        alone = run_medusa(tiny.model, heads, prompt, p, tree).stats.mean_accepted_per_step
        for k in (1, 3, 8):
            result = run_medusa(tiny.model, heads, prompt, p, tree, lookup_k=k)
            assert result.tokens == plain, (tree, k)
            assert result.stats.mean_accepted_per_step > alone  # the model repeats itself: the branch is accepted
    with pytest.raises(UserError, match="lookup branch of -1"):
        run_medusa(tiny.model, token_heads, prompt, p, DynamicTree(5), lookup_k=-1)


def test_chained_tree_tokens_follow_each_parent():
    """Tree.tokens_chained feeds head d each parent's state and token: along the chain of best guesses, its tokens
    are what the teacher-forced forward (training's) ranks first given that same path, and a second-ranked child
    is the second best of its parent's head."""
    torch.manual_seed(0)
    hidden, vocab = 16, 50
    heads = MedusaHeads(hidden, 3, chained=True)
    for block in heads.blocks:
        torch.nn.init.normal_(block.weight, std=0.5)
    lm_head, embed = torch.nn.Linear(hidden, vocab, bias=False), torch.randn(vocab, hidden)
    choices = [(0,), (0, 0), (0, 0, 0), (0, 1), (1,)]
    tree, h = Tree(choices, 3, "cpu"), torch.randn(hidden)
    with torch.no_grad():
        toks = tree.tokens_chained(7, h, heads, lm_head, embed)
        chain = [7] + toks[1:4].tolist()  # root, (0,), (0, 0), (0, 0, 0)
        logits = heads(h, lm_head, path_embeddings=embed[chain])  # [3, V]
    order = logits.argsort(-1, descending=True)
    assert toks[1:4].tolist() == order[:, 0].tolist()
    assert toks[4] == order[1, 1] and toks[5] == order[0, 1]  # (0, 1) and (1,)
    # A draft vocabulary maps its columns back to token ids: all tokens in another order give the same tree.
    shuffled = DraftVocab(torch.randperm(vocab).tolist(), lm_head)
    with torch.no_grad():
        assert torch.equal(tree.tokens_chained(7, h, heads, shuffled.lm_head, embed, shuffled.ids), toks)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_packed_linears_keep_the_model_and_medusa_exact():
    """The CPU benchmark's model: every Linear prepacked for oneDNN (core.cpu_linear.pack_linears) computes what
    it did, and Medusa on it still equals plain greedy decoding of it."""
    from core.cpu_linear import PackedLinear, pack_linears
    from core.loading import load_model
    model = load_model("tiny", "cpu", "float32", random_weights=True).model  # its own copy: packing is in place
    ids = torch.tensor([[1, 7, 8, 9, 7, 8]])
    with torch.inference_mode():
        before = model(ids)
        pack_linears(model)
        after = model(ids)
    assert isinstance(model.lm_head, PackedLinear)
    assert all(isinstance(getattr(layer.self_attn, n), PackedLinear) for layer in model.layers
               for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(isinstance(getattr(layer.mlp, n), PackedLinear) for layer in model.layers
               for n in ("gate_proj", "up_proj", "down_proj"))
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    plain = speculative_generate(model, ids[0].tolist(), p).tokens
    assert run_medusa(model, _random_heads(model), ids[0].tolist(), p).tokens == plain


def test_accepted_path_off_the_chain_is_moved_into_place(smollm):
    """Heads whose best guesses are always wrong but whose second guesses are right: every accepted path leaves the
    chain of best guesses, so keep_path must move the tokens, and the output must still equal plain greedy."""
    p = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = chat_prompt(smollm.tokenizer, "What is machine learning?")
    plain = speculative_generate(smollm.model, prompt, p).tokens
    result = run_medusa(smollm.model, OracleHeads(smollm.model, prompt + plain), prompt, p, TREES["default"])
    assert result.tokens == plain
    assert result.stats.mean_accepted_per_step > 1.5  # the second guesses were accepted, so paths were moved


class OracleHeads(torch.nn.Module):
    """Test heads that know the answer: at the hidden state of position t, head k ranks the true token t+k+1
    second and a wrong token first. Positions are found by matching h against the hidden states of the sequence."""

    token_conditioned = chained = False

    def __init__(self, model, sequence: list[int], num_heads: int = 4):
        super().__init__()
        with torch.inference_mode():
            self.hidden = model.hidden_states(torch.tensor([sequence]))[0]
        self.sequence, self.blocks = sequence, [None] * num_heads

    def forward(self, h, lm_head, next_embedding=None):
        t = int((self.hidden - h).norm(dim=-1).argmin())
        logits = torch.zeros(len(self.blocks), lm_head.weight.shape[0])
        for k in range(len(self.blocks)):
            true = self.sequence[min(t + 2 + k, len(self.sequence) - 1)]
            logits[k, true], logits[k, (true + 1) % logits.shape[1]] = 1.0, 2.0
        return logits


def test_heads_file_must_match_model(tiny, smollm, tmp_path):
    path = tmp_path / "h.safetensors"
    save_heads(_random_heads(tiny.model, 2), tiny.model, "tiny", path, "test")
    assert len(load_heads(path, tiny.model).blocks) == 2
    packed = tmp_path / "h.safetensors.xz"  # compressed: the same tensors come back
    heads = _random_heads(tiny.model, 2, token_conditioned=True)
    save_heads(heads, tiny.model, "tiny", packed, "test")
    loaded = load_heads(packed, tiny.model)
    assert loaded.token_conditioned and torch.equal(loaded.blocks[1].weight, heads.blocks[1].weight.half().float())
    save_heads(_random_heads(tiny.model, 2, chained=True), tiny.model, "tiny", packed, "test")
    assert load_heads(packed, tiny.model).chained
    with pytest.raises(UserError, match="trained for tiny"):
        load_heads(path, smollm.model)


@pytest.mark.parametrize("path", committed_heads("smollm2-135m"), ids=lambda p: p.name)
def test_committed_heads_match_default_model_and_keep_greedy_output(smollm, path):
    heads = load_heads(path, smollm.model)  # raises if the file was trained for other weights
    assert (path.parent / (path.name + ".command.txt")).exists()
    p = SamplingParams(max_tokens=32)
    accepted = 0
    for text in ["Give me three tips for a successful job interview.", "What is machine learning?"]:
        prompt = chat_prompt(smollm.tokenizer, text)
        expected = generate(smollm.model, [prompt], p).tokens[0]
        for tree in (TREES["default"], tree_choices("fitted", path)):  # the fitted tree is committed beside it
            result = run_medusa(smollm.model, heads, prompt, p, tree)
            assert result.tokens == expected
            accepted += result.stats.num_accepted_tokens
    assert accepted > 0


def test_fitted_tree_is_the_most_hit_paths():
    """Ranks of the true tokens among each head's guesses per position (-1: not among them) -> hit counts of every
    rank path; the best tree of n nodes is the n most-hit paths, parents first, the chain of best guesses leading."""
    ranks = torch.tensor([[0, 0, 1], [0, 0, -1], [1, 0, 0], [0, 2, 0], [-1, 0, 0], [0, 0, 1]])
    counts = path_counts(ranks)
    assert counts[(0,)] == 4 and counts[(0, 0)] == 3 and counts[(0, 0, 1)] == 2 and counts[(1, 0, 0)] == 1
    assert (0, 0, 0) not in counts and not any(c[0] == -1 for c in counts)  # a miss ends the path
    assert best_tree(counts, 3) == [(0,), (0, 0), (0, 0, 1)]
    assert best_tree(counts, 6) == [(0,), (0, 0), (1,), (0, 2), (1, 0), (0, 0, 1)]  # ties: shorter, then smaller
    tree = best_tree(counts, len(counts))
    assert all(c[:-1] in tree[:i] for i, c in enumerate(tree) if len(c) > 1)  # parents before children
    assert expected_tokens(counts, best_tree(counts, 3), len(ranks)) == 1 + (4 + 3 + 2) / 6
    assert expected_tokens(counts, tree, len(ranks)) == 1 + 14 / 6  # every hit path in the tree


def test_bad_tree_name_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown tree"):
        tree_choices("bushy", tmp_path / "heads.safetensors")
    with pytest.raises(UserError, match="no fitted tree"):
        tree_choices("fitted", tmp_path / "heads.safetensors")
    assert len(tree_choices("dynamic:5", tmp_path / "heads.safetensors")) == 5
    for bad in ("dynamic", "dynamic:five", "dynamic:0"):
        with pytest.raises(UserError, match="dynamic"):
            tree_choices(bad, tmp_path / "heads.safetensors")


def test_typical_acceptance_sampling_runs(tiny):
    p = SamplingParams(max_tokens=20, temperature=0.7, seed=1, ignore_eos=True)
    a = run_medusa(tiny.model, _random_heads(tiny.model), [1, 2, 3], p).tokens
    assert len(a) == 20 and a == run_medusa(tiny.model, _random_heads(tiny.model), [1, 2, 3], p).tokens


def test_bad_tree_is_a_user_error():
    with pytest.raises(UserError):
        Tree([(0,), (0, 0, 0)], 4, "cpu")  # (0, 0) missing
    with pytest.raises(UserError):
        Tree([(0,), (0, 0), (0, 0, 0)], 2, "cpu")  # deeper than the heads


def test_draft_vocab_keeps_greedy_output_and_refuses_bad_sizes(smollm):
    """Heads scoring only the committed ranking's most frequent tokens propose from those alone; verification
    still sees every token, so the output is plain greedy's."""
    heads = load_heads(committed_heads("smollm2-135m")[0], smollm.model)
    vocab = load_draft_vocab("smollm2-135m", smollm.model.lm_head, 4096)
    assert len(vocab) == 4096 and len(set(vocab.ids.tolist())) == 4096
    torch.testing.assert_close(vocab.lm_head.weight, smollm.model.lm_head.weight[vocab.ids])
    p = SamplingParams(max_tokens=32)
    prompt = chat_prompt(smollm.tokenizer, "What is machine learning?")
    expected = generate(smollm.model, [prompt], p).tokens[0]
    assert run_medusa(smollm.model, heads, prompt, p, TREES["default"], vocab=vocab).tokens == expected
    assert load_draft_vocab("smollm2-135m", smollm.model.lm_head, 0) is None
    with pytest.raises(UserError, match="ranks only"):
        load_draft_vocab("smollm2-135m", smollm.model.lm_head, 10 ** 6)
    with pytest.raises(UserError, match="no draft vocabulary"):
        load_draft_vocab("tiny", smollm.model.lm_head, 16)
