"""Shared fixtures: an isolated state directory per test, and a tiny real Llama checkpoint that uses
SmolLM2's real tokenizer (so every stage runs for real, in seconds)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Under pytest-xdist (scripts/test.sh runs two workers) each worker gets state of its own beside the shared
# model cache: its own QUANT_HOME, Airflow home and MLflow store, as two users on one machine would have.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER and os.environ.get("QUANT_HOME"):
    _home = Path(os.environ["QUANT_HOME"]) / WORKER
    _home.mkdir(parents=True, exist_ok=True)
    os.environ.update(QUANT_HOME=str(_home), AIRFLOW_HOME=str(_home / "airflow"), MLFLOW_TRACKING_URI=f"sqlite:///{_home / 'mlflow.db'}")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # the cores shared between the workers: oversubscribed OpenMP threads wait on each other
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


@pytest.fixture
def one_thread():
    """One torch thread for the test: 2 OpenMP threads on a shared, oversubscribed machine make every small op
    wait a scheduler tick (the profiling tests use it: `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def state(tmp_path, monkeypatch):
    """QUANT_HOME, artifacts and MLflow store under tmp_path; the model cache stays shared."""
    home = tmp_path / "state"
    monkeypatch.setenv("QUANT_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.delenv("QUANT_ARTIFACT_ROOT", raising=False)
    monkeypatch.setenv("QUANT_CACHE_DIR", os.environ.get("QUANT_CACHE_DIR", str(REPO / ".state" / "cache")))
    home.mkdir(parents=True)
    return home


@pytest.fixture(scope="session")
def embedded_model():
    """The real embedded SmolLM2 checkpoint (converted once into the shared cache)."""
    from tasks.model_io import resolve_model

    cache = os.environ.get("QUANT_CACHE_DIR", str(REPO / ".state" / "cache"))
    return resolve_model("embedded", cache_dir=cache)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model):
    """A 2-layer Llama with grouped-query attention, random weights, SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model.path / name, path / name)
    return path


WORD_VOCAB = 512  # vocabulary of `word_llama_dir`


@pytest.fixture(scope="session")
def word_llama_dir(tmp_path_factory):
    """2 layers, hidden 128 (wide enough for g128), MLP 256, 4 heads / 2 KV heads, random weights and a
    512-word tokenizer of its own (GPTQModel and llm-compressor insist on loading a tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("word-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=WORD_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, WORD_VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def word_llama(word_llama_dir):
    """`word_llama_dir` with what the backend tests compare against: calibration windows, a fixed
    prompt batch, the full-precision logits on it, and the linears' parameter counts."""
    from tasks.model_io import linear_param_counts, load_model, read_config

    gen = torch.Generator().manual_seed(1)
    calibration = torch.randint(3, WORD_VOCAB, (8, 64), generator=gen)  # 0-2 are special tokens
    ids = torch.randint(3, WORD_VOCAB, (2, 48), generator=gen)
    with torch.no_grad():
        reference = load_model(word_llama_dir)(ids).logits
    return {"path": word_llama_dir, "calibration": calibration, "ids": ids, "reference": reference,
            "params": linear_param_counts(read_config(word_llama_dir))}
