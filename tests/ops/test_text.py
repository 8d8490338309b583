"""TfIdfVectorizer vs onnxruntime on random token streams."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import check_model, make_node_model


@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
@pytest.mark.parametrize("min_n, max_n, skip", [(1, 1, 0), (2, 2, 0), (1, 2, 2), (2, 3, 1)])
@pytest.mark.parametrize("batch", [False, True])
def test_tfidf_matches_onnxruntime(mode, min_n, max_n, skip, batch):
    rng = np.random.default_rng()
    vocab = 6
    pool, counts, n_grams = [], [], 0
    for n in range(1, 4):
        counts.append(len(pool))
        grams = {tuple(rng.integers(0, vocab, n).tolist()) for _ in range(4)}
        for g in sorted(grams):
            pool.extend(g)
            n_grams += 1
    indexes = rng.permutation(n_grams).tolist()
    attrs = dict(mode=mode, min_gram_length=min_n, max_gram_length=max_n, max_skip_count=skip,
                 ngram_counts=counts, ngram_indexes=indexes, pool_int64s=pool,
                 weights=rng.uniform(0.5, 2.0, n_grams).astype(np.float32).tolist())
    x = rng.integers(0, vocab, (3, 12) if batch else (12,)).astype(np.int64)
    check_model(make_node_model("TfIdfVectorizer", {"x": x}, 1, attrs, opset=9), {"x": x}, rtol=1e-6, atol=1e-6)
