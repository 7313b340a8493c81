"""A GGUF's SentencePiece vocabulary (`tokenizer.ggml.model` "llama": Gemma, Llama 2, Mistral) as a
transformers tokenizer that splits text exactly as llama.cpp does.

llama.cpp's SPM tokenizer starts from single characters and repeatedly merges the adjacent pair whose
concatenation is the highest-scored vocabulary entry (the leftmost among equals); a character outside the
vocabulary falls back to its <0xXX> byte tokens; user-defined entries (Gemma's runs of newlines and spaces)
are split out of the raw text first. That is a BPE whose merges are every (left, right) split of each entry,
ranked by the entry's score, which `tokenizers` runs natively. transformers' own GGUF converter builds a
Unigram over the scores for gemma*, which splits text into single characters (a 99-character sentence:
99 tokens where llama.cpp gives 24).
"""

from __future__ import annotations

from pathlib import Path

# llama.cpp's token types (llama_token_type): normal, unknown, control, user-defined, unused, byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"  # SentencePiece's whitespace


def is_spm(gguf_path: str | Path) -> bool:
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.model")
    return field is not None and field.contents() == "llama"


def spm_tokenizer(gguf_path: str | Path):
    """The vocabulary of `gguf_path` as a PreTrainedTokenizerFast with llama.cpp's splits, BOS/EOS rules and
    special tokens."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    fields = gguf.GGUFReader(str(gguf_path)).fields

    def value(key, default=None):
        return fields[key].contents() if key in fields else default

    tokens, scores, kinds = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.scores"), value("tokenizer.ggml.token_type")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    merges = []
    for token, i in vocab.items():
        if kinds[i] in (CONTROL, USER_DEFINED):  # matched whole in the raw text, never built by merges
            continue
        merges += [((-scores[i], i), (token[:k], token[k:])) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
    merges.sort(key=lambda m: m[0])
    named = {role: tokens[i] for role in ("bos", "eos", "unknown", "padding") if (i := value(f"tokenizer.ggml.{role}_token_id")) is not None}
    model = Tokenizer(BPE(vocab, [pair for _, pair in merges], unk_token=named.get("unknown"), byte_fallback=True, fuse_unk=False))
    prefix = bool(value("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", SPACE)
    model.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    model.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    model.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == CONTROL])
    model.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, kinds) if k == USER_DEFINED])
    bos = "bos" in named and bool(value("tokenizer.ggml.add_bos_token", True))
    eos = "eos" in named and bool(value("tokenizer.ggml.add_eos_token", False))
    single = " ".join([f"{named['bos']}:0"] * bos + ["$A:0"] + [f"{named['eos']}:0"] * eos)
    pair = " ".join([single] + [f"{named['bos']}:1"] * bos + ["$B:1"] + [f"{named['eos']}:1"] * eos)
    model.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                         special_tokens=[(named[r], vocab[named[r]]) for r in ("bos",) * bos + ("eos",) * eos])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token=named.get("bos"), eos_token=named.get("eos"),
                                   unk_token=named.get("unknown"), pad_token=named.get("padding"))  # fmt: skip
